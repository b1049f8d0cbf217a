import copy
import json
import pickle
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import cv2
import numpy as np
import pytest
import torch

from exemplar_desc import ExemplarDescriptor, int8
from exemplar_desc.checks import OptionError
from exemplar_desc.descriptor import native_bf16, resolve_precision
from exemplar_desc.int8 import ENGINES, activation_max, int8_available, native_int8


@pytest.fixture(scope="module")
def descriptor(random_model):
    return ExemplarDescriptor(random_model, precision="fp32")  # exact comparisons need float32


@pytest.fixture(scope="module")
def keypoints(photo_bgr):
    return cv2.SIFT_create(nfeatures=300).detect(photo_bgr, None)


def test_feature2d_interface(descriptor):
    assert descriptor.descriptorSize() == 128
    assert descriptor.descriptorType() == cv2.CV_32F
    assert descriptor.defaultNorm() == cv2.NORM_L2
    assert descriptor.getDefaultName() == "Feature2D.ExemplarDescriptor"


def test_the_256_d_model_gives_256_d_unit_descriptors(photo_bgr, keypoints):
    wide = ExemplarDescriptor("exemplar-fast-t005-d256")
    assert wide.descriptorSize() == 256
    _, desc = wide.compute(photo_bgr, keypoints[:50])
    assert desc.shape == (50, 256) and desc.dtype == np.float32
    assert np.allclose(np.linalg.norm(desc, axis=1), 1, atol=1e-5)


def test_compute_returns_every_keypoint_in_order(descriptor, photo_bgr, keypoints):
    border = [cv2.KeyPoint(0.0, 0.0, 10.0), cv2.KeyPoint(600.0, -20.0, 30.0, 45.0)]  # on and beyond the border
    kps = list(keypoints) + border
    out_kps, desc = descriptor.compute(photo_bgr, kps)
    assert out_kps == kps
    assert desc.shape == (len(kps), 128) and desc.dtype == np.float32
    assert np.allclose(np.linalg.norm(desc, axis=1), 1, atol=1e-5)


def test_image_types_give_the_same_descriptors(descriptor, photo_bgr, keypoints):
    _, ref = descriptor.compute(photo_bgr, keypoints)
    gray = cv2.cvtColor(photo_bgr, cv2.COLOR_BGR2GRAY)
    variants = [
        cv2.cvtColor(photo_bgr, cv2.COLOR_BGR2BGRA),
        photo_bgr.astype(np.uint16) * 257,
        photo_bgr.astype(np.float32) / 255,
    ]
    for image in variants:
        assert np.allclose(descriptor.compute(image, keypoints)[1], ref, atol=1e-4)
    assert np.abs(descriptor.compute(gray, keypoints)[1] - ref).max() < 0.05  # uint8 grey rounding only


def test_deterministic_and_batch_independent(random_model, photo_bgr, keypoints):
    a = ExemplarDescriptor(random_model, batch_size=1024, precision="fp32").compute(photo_bgr, keypoints)[1]
    b = ExemplarDescriptor(random_model, batch_size=1024, precision="fp32").compute(photo_bgr, keypoints)[1]
    c = ExemplarDescriptor(random_model, batch_size=7, precision="fp32").compute(photo_bgr, keypoints)[1]
    assert np.array_equal(a, b)
    assert np.allclose(a, c, atol=1e-5)


def test_empty_keypoints(descriptor, photo_bgr):
    assert descriptor.compute(photo_bgr, []) == ([], None)
    assert descriptor.compute(photo_bgr, ()) == ([], None)


@pytest.mark.parametrize(
    "image, error",
    [(None, TypeError), (np.zeros((0, 0), np.uint8), ValueError), (np.zeros((4, 4, 2), np.uint8), ValueError),
     (np.full((8, 8), np.inf, np.float32), ValueError), (np.zeros((8, 8), np.int64), TypeError), ("img.png", TypeError)],
)
def test_bad_images_are_refused(descriptor, image, error):
    with pytest.raises(error):
        descriptor.compute(image, [cv2.KeyPoint(1.0, 1.0, 2.0)])


def test_bad_keypoints_and_mask(descriptor, photo_bgr):
    with pytest.raises(TypeError):
        descriptor.compute(photo_bgr, None)
    with pytest.raises(TypeError, match="cv2.KeyPoint"):
        descriptor.compute(photo_bgr, [(10, 10)])
    with pytest.raises(ValueError, match="mask"):
        descriptor.detect(photo_bgr, np.ones((10, 10), np.uint8))
    with pytest.raises(FileNotFoundError, match="unknown model"):
        ExemplarDescriptor(descriptor.card["name"] + "-missing")


def test_detect_and_mask(descriptor, photo_bgr):
    mask = np.zeros(photo_bgr.shape[:2], np.uint8)
    mask[:, :256] = 255
    kps = descriptor.detect(photo_bgr, mask)
    assert kps and all(kp.pt[0] < 256 for kp in kps)
    kps2, desc = descriptor.detectAndCompute(photo_bgr, mask)
    assert len(kps2) == len(kps) == len(desc)
    given = list(kps[:5])
    assert descriptor.detectAndCompute(photo_bgr, None, given, useProvidedKeypoints=True)[0] == given


def test_detector_is_replaceable(random_model, photo_bgr):
    orb = ExemplarDescriptor(random_model, detector=cv2.ORB_create(50))
    kps, desc = orb.detectAndCompute(photo_bgr)
    assert 0 < len(kps) <= 50 and desc.shape == (len(kps), 128)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_pickled_copies_compute_the_same_descriptors(random_model, photo_bgr, keypoints, precision):
    if precision == "int8" and not int8_available():
        pytest.skip("int8 does not run on this CPU")
    original = ExemplarDescriptor(random_model, upright=True, magnification=8, min_patch_side=20, batch_size=64,
                                  output_dtype=np.uint8, precision=precision)
    want = original.compute(photo_bgr, keypoints)[1]
    for twin in (pickle.loads(pickle.dumps(original)), copy.deepcopy(original)):
        assert repr(twin) == repr(original)
        assert (twin.min_patch_side, twin.batch_size, twin.output_dtype) == (20, 64, np.uint8)
        assert np.array_equal(twin.compute(photo_bgr, keypoints)[1], want)


def _describe_in_worker(descriptor, image, points, threads):
    torch.set_num_threads(threads)
    return descriptor.compute(image, [cv2.KeyPoint(x, y, size, angle) for x, y, size, angle in points])[1]


def test_a_pickled_copy_describes_in_a_spawned_process(descriptor, photo_bgr, keypoints):
    points = [(*kp.pt, kp.size, kp.angle) for kp in keypoints]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        theirs = pool.submit(_describe_in_worker, descriptor, photo_bgr, points, torch.get_num_threads()).result()
    # The same float32 arithmetic on the same CPU and thread count; a library that summed in
    # another order would still stay within float32's rounding of unit vectors (< 1e-5).
    assert np.abs(theirs - descriptor.compute(photo_bgr, keypoints)[1]).max() < 1e-5


def test_a_descriptor_with_its_own_detector_is_not_pickled(random_model):
    with pytest.raises(TypeError, match="own detector"):
        pickle.dumps(ExemplarDescriptor(random_model, detector=cv2.ORB_create(50)))


def test_upright_ignores_angles(random_model, photo_bgr, keypoints):
    upright = ExemplarDescriptor(random_model, upright=True)
    turned = [cv2.KeyPoint(kp.pt[0], kp.pt[1], kp.size, (kp.angle + 90) % 360) for kp in keypoints]
    assert np.array_equal(upright.compute(photo_bgr, keypoints)[1], upright.compute(photo_bgr, turned)[1])


def test_works_with_opencv_matchers(descriptor, photo_bgr, keypoints):
    _, desc = descriptor.compute(photo_bgr, keypoints)
    matches = cv2.BFMatcher(descriptor.defaultNorm(), crossCheck=True).match(desc, desc)
    assert len(matches) == len(desc) and all(m.queryIdx == m.trainIdx for m in matches)
    flann = cv2.FlannBasedMatcher({"algorithm": 1, "trees": 4}, {"checks": 64})
    assert len(flann.knnMatch(desc, desc, k=2)) == len(desc)


def test_uint8_output(random_model, photo_bgr, keypoints):
    quantised = ExemplarDescriptor(random_model, output_dtype=np.uint8)
    assert quantised.descriptorType() == cv2.CV_8U
    _, q = quantised.compute(photo_bgr, keypoints)
    assert q.dtype == np.uint8 and q.shape == (len(keypoints), 128)
    matches = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(q, q)
    assert all(m.queryIdx == m.trainIdx for m in matches)


def test_kornia_lafs_match_keypoints(descriptor, photo_bgr, keypoints):
    import kornia.feature as KF

    kps = list(keypoints[:50])
    _, ref = descriptor.compute(photo_bgr, kps)
    xy = torch.tensor([kp.pt for kp in kps], dtype=torch.float64)[None]
    # kornia's patch covers c + A [-1, 1]^2: scale = magnification * size / 2; its angle is anticlockwise.
    scale = torch.tensor([descriptor.magnification * kp.size / 2 for kp in kps], dtype=torch.float64)[None, :, None, None]
    ori = torch.tensor([-kp.angle for kp in kps], dtype=torch.float64)[None, :, None]
    lafs = KF.laf_from_center_scale_ori(xy, scale, ori)
    rgb = torch.from_numpy(cv2.cvtColor(photo_bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)[None].float() / 255
    out = descriptor.compute_lafs(rgb, lafs)
    assert out.shape == (1, 50, 128)
    assert np.allclose(out[0].numpy(), ref, atol=1e-3)
    with pytest.raises(ValueError, match="lafs"):
        descriptor.compute_lafs(rgb, lafs[0])


def test_shipped_model_matches_a_synthetic_warp(photo_bgr):
    """Under a known homography the same point's descriptors are nearer than other points'."""
    descriptor = ExemplarDescriptor()
    h, w = photo_bgr.shape[:2]
    hom = cv2.getPerspectiveTransform(
        np.float32([[0, 0], [w, 0], [w, h], [0, h]]), np.float32([[30, 10], [w - 20, 40], [w - 40, h - 10], [10, h - 30]])
    )
    warped = cv2.warpPerspective(photo_bgr, hom, (w, h))
    kps = cv2.SIFT_create(nfeatures=400).detect(photo_bgr, None)
    moved = cv2.perspectiveTransform(np.float32([kp.pt for kp in kps])[:, None], hom)[:, 0]
    inside = (moved[:, 0] > 20) & (moved[:, 0] < w - 20) & (moved[:, 1] > 20) & (moved[:, 1] < h - 20)
    kps = [kp for kp, keep in zip(kps, inside) if keep]
    # The warp's local scale is close to 1: keep the size, carry the angle by the local rotation.
    angle = np.degrees(np.arctan2(hom[1, 0], hom[0, 0]))
    warped_kps = [cv2.KeyPoint(float(x), float(y), kp.size, (kp.angle + angle) % 360) for kp, (x, y) in zip(kps, moved[inside])]
    _, d1 = descriptor.compute(photo_bgr, kps)
    _, d2 = descriptor.compute(warped, warped_kps)
    dist = np.linalg.norm(d1[:, None] - d2[None], axis=2)
    nearest_is_self = (dist.argmin(1) == np.arange(len(kps))).mean()
    assert nearest_is_self > 0.8
    assert np.median(np.diag(dist)) < np.median(dist)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_descriptors(random_model, photo_bgr, keypoints):
    cpu = ExemplarDescriptor(random_model).compute(photo_bgr, keypoints)[1]
    gpu = ExemplarDescriptor(random_model, device="cuda").compute(photo_bgr, keypoints)[1]
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)


def test_list_compute_equals_per_image_compute(random_model, photo_bgr, keypoints):
    """Many images in OpenCV's list convention, described in shared batches, as one at a time."""
    descriptor = ExemplarDescriptor(random_model, batch_size=64)  # batches span image boundaries
    gray = cv2.cvtColor(photo_bgr, cv2.COLOR_BGR2GRAY)
    images = [photo_bgr, gray[::-1].copy(), gray[:300, :200].copy(), photo_bgr, photo_bgr]
    few = [cv2.KeyPoint(50.0, 60.0, 8.0, 30.0)] * 3
    kps = [list(keypoints[:100]), list(keypoints[100:137]), few, [], list(keypoints[:50])]
    out_kps, descs = descriptor.compute(images, kps)
    assert isinstance(out_kps, list) and isinstance(descs, list) and len(descs) == len(images)
    for image, given, got_kps, got in zip(images, kps, out_kps, descs):
        ref_kps, ref = descriptor.compute(image, given)
        assert got_kps == ref_kps == given
        if ref is None:
            assert got is None
        else:
            assert got.shape == ref.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, ref, atol=1e-5)


def test_list_compute_checks_its_arguments(descriptor, photo_bgr, keypoints):
    with pytest.raises(TypeError, match="2 keypoint lists"):
        descriptor.compute([photo_bgr, photo_bgr], [keypoints])
    with pytest.raises(TypeError, match=r"images\[1\]"):
        descriptor.compute([photo_bgr, "x.png"], [keypoints, keypoints])
    with pytest.raises(TypeError, match=r"keypoints\[1\]\[0\]"):
        descriptor.compute([photo_bgr, photo_bgr], [keypoints, [(1, 2)]])


@pytest.mark.parametrize(
    "bad, field",
    [(cv2.KeyPoint(10.0, 10.0, 5.0, float("nan")), "angle"), (cv2.KeyPoint(10.0, 10.0, 5.0, float("inf")), "angle"),
     (cv2.KeyPoint(10.0, 10.0, float("nan")), "size"), (cv2.KeyPoint(10.0, 10.0, float("inf")), "size"),
     (cv2.KeyPoint(10.0, 10.0, -2.0), "size"), (cv2.KeyPoint(float("nan"), 10.0, 5.0), "pt"),
     (cv2.KeyPoint(10.0, float("-inf"), 5.0), "pt")],
)
def test_non_finite_keypoints_are_named_by_index(descriptor, photo_bgr, bad, field):
    good = [cv2.KeyPoint(20.0, 20.0, 5.0, 10.0)] * 3
    with pytest.raises(ValueError, match=rf"keypoints\[3\]\.{field} = "):
        descriptor.compute(photo_bgr, good + [bad])
    with pytest.raises(ValueError, match=rf"keypoints\[1\]\[2\]\.{field} = "):
        descriptor.compute([photo_bgr, photo_bgr], [good, good[:2] + [bad]])


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0, -3.0, "12"])
def test_bad_magnification_is_refused(random_model, value):
    with pytest.raises(ValueError, match="magnification"):
        ExemplarDescriptor(random_model, magnification=value)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, "24"])
def test_bad_min_patch_side_is_refused(random_model, value):
    with pytest.raises(ValueError, match="min_patch_side"):
        ExemplarDescriptor(random_model, min_patch_side=value)


def test_min_patch_side_changes_only_the_smallest_keypoints(random_model, photo_bgr):
    """A floor of 30 px at magnification 12 widens the patches of keypoints under 2.5 px and no others."""
    keypoints = cv2.SIFT_create(nfeatures=300).detect(photo_bgr, None)
    plain = ExemplarDescriptor(random_model, precision="fp32", magnification=12).compute(photo_bgr, keypoints)[1]
    floored = ExemplarDescriptor(random_model, precision="fp32", magnification=12, min_patch_side=30)
    assert floored.min_patch_side == 30.0
    out = floored.compute(photo_bgr, keypoints)[1]
    small = np.array([k.size < 2.5 for k in keypoints])
    assert 0 < small.sum() < len(small)
    np.testing.assert_array_equal(out[~small], plain[~small])
    assert np.all(np.abs(out[small] - plain[small]).max(axis=1) > 1e-3)


@pytest.mark.parametrize("value", [2.5, 0, -1, float("inf"), "64", True])
def test_bad_batch_size_is_refused(random_model, value):
    with pytest.raises(ValueError, match="batch_size"):
        ExemplarDescriptor(random_model, batch_size=value)


def test_non_finite_laf_is_named_by_index(descriptor):
    image = torch.rand(2, 1, 64, 64)
    lafs = torch.tensor([[[4.0, 0, 32], [0, 4.0, 32]]]).repeat(2, 3, 1, 1)
    assert descriptor.compute_lafs(image, lafs).shape == (2, 3, 128)
    lafs[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"lafs\[1, 2\]"):
        descriptor.compute_lafs(image, lafs)


def test_bf16_stays_within_cosine_0999_of_fp32(photo_bgr, keypoints):
    """The shipped model with bfloat16 convolutions (head in float32) against float32."""
    fp32 = ExemplarDescriptor(precision="fp32").compute(photo_bgr, keypoints)[1]
    bf16 = ExemplarDescriptor(precision="bf16")
    assert "precision='bf16'" in repr(bf16)
    out = bf16.compute(photo_bgr, keypoints)[1]
    assert out.dtype == np.float32 and out.shape == fp32.shape
    cos = (out * fp32).sum(1)
    assert cos.min() > 0.999 and np.median(cos) > 0.9999
    with pytest.raises(ValueError, match="precision"):
        ExemplarDescriptor(precision="int4")


@pytest.mark.parametrize("family, vnni, avx2, avx512, codes", [
    ("x86", True, True, True, 255),  # AVX512-VNNI
    ("x86", False, True, False, 255),  # AVX2 alone: oneDNN's AVX2 kernels keep 8-bit activations
    ("x86", False, True, True, 127),  # AVX512 without VNNI: its kernels sum pairs in 16 bits, so 7-bit activations
    ("x86", False, False, False, None),  # neither
    ("arm", False, False, False, 255),  # QNNPACK sums in 32 bits
    ("other", False, False, False, None),
])
def test_int8_runs_on_the_cpus_its_kernels_were_measured_on(monkeypatch, family, vnni, avx2, avx512, codes):
    for probe, value in (("_is_vnni_supported", vnni), ("_is_avx2_supported", avx2), ("_is_avx512_supported", avx512)):
        monkeypatch.setattr(torch.cpu, probe, lambda value=value: value)
    monkeypatch.setattr(int8, "cpu_family", lambda: family)
    engine = ENGINES.get(family) in torch.backends.quantized.supported_engines
    assert int8_available("cpu") == (codes is not None and engine) and not int8_available("meta")
    assert native_int8("cpu") == (int8_available("cpu") and family == "x86")  # auto: x86 only, where it was timed
    if int8_available("cpu"):
        assert activation_max() == codes
    else:
        with pytest.raises(OptionError, match="precision 'int8': needs an x86 CPU with AVX2 or an ARM CPU"):
            ExemplarDescriptor(device="cpu", precision="int8")


def test_auto_precision_is_int8_with_vnni_then_bf16_with_bfloat16_hardware(random_model, tmp_path, caplog):
    fallback = "bf16" if native_bf16("cpu") else "fp32"
    assert resolve_precision("auto", "cpu") == ("int8" if native_int8("cpu") else fallback)
    assert resolve_precision("auto", "cpu", int8_calibrated=False) == fallback
    with caplog.at_level("INFO", logger="exemplar_desc.descriptor"):
        assert ExemplarDescriptor().precision == resolve_precision("auto", "cpu")
    assert f"precision='auto' runs {resolve_precision('auto', 'cpu')} on cpu" in caplog.text  # says which it picked
    # A card without the int8 calibration never resolves to int8.
    card = json.loads(random_model.read_text())
    del card["int8"]
    uncalibrated = tmp_path / random_model.name
    uncalibrated.write_text(json.dumps(card))
    shutil.copy(random_model.with_suffix(".pt"), tmp_path)
    assert ExemplarDescriptor(uncalibrated).precision == fallback
    for name in ("fp32", "bf16", "int8"):
        assert resolve_precision(name, "cpu") == name
    assert not native_bf16("meta") and not native_int8("meta") and resolve_precision("auto", "meta") == "fp32"
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")
