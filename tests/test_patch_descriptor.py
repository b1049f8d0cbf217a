"""ExemplarPatchDescriptor: kornia's patch-module interface, and agreement with ExemplarDescriptor."""

import cv2
import kornia.feature as KF
import numpy as np
import pytest
import torch

import exemplar_desc
from exemplar_desc import ExemplarDescriptor, ExemplarPatchDescriptor
from exemplar_desc.patch_descriptor import keypoint_lafs


@pytest.fixture(scope="module")
def module() -> ExemplarPatchDescriptor:
    return ExemplarPatchDescriptor()


def test_exported_from_the_package():
    assert exemplar_desc.ExemplarPatchDescriptor is ExemplarPatchDescriptor


def test_shape_dtype_unit_norm(module):
    patches = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        out = module(patches)
    assert out.shape == (5, module.descriptor_size) == (5, 128) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    # Patches are standardised inside: an affine intensity change gives nearly the same
    # descriptors (not exactly: normalize_patches adds 1e-3 to the standard deviation).
    with torch.no_grad():
        assert (module(0.5 * patches + 0.2) * out).sum(1).min() > 0.999
    assert "exemplar-fast" in repr(module)


@pytest.mark.parametrize(
    "patches, error, match",
    [
        (np.zeros((2, 1, 32, 32), np.float32), TypeError, "torch.Tensor"),
        (torch.rand(2, 32, 32), ValueError, r"\(B, 1, 32, 32\)"),
        (torch.rand(2, 3, 32, 32), ValueError, r"\(B, 1, 32, 32\)"),
        (torch.rand(2, 1, 41, 41), ValueError, r"\(B, 1, 32, 32\).*41"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
    ],
)
def test_bad_input(module, patches, error, match):
    with pytest.raises(error, match=match):
        module(patches)


def test_laf_descriptor_agrees_with_exemplar_descriptor(module, photo_bgr):
    """LAFDescriptor on laf_from_center_scale_ori(xy, max(m * size, floor) / 2, -angle) == ExemplarDescriptor.compute."""
    gray = cv2.cvtColor(photo_bgr, cv2.COLOR_BGR2GRAY)
    h, w = gray.shape
    m, floor = module.magnification, module.min_patch_side
    # Keep patches (turned by any angle) inside the image: kornia repeats the border pixel
    # where ExemplarDescriptor reflects the image, so patches that cross the border differ.
    keypoints = [
        kp
        for kp in cv2.SIFT_create(nfeatures=300).detect(gray, None)
        if (r := max(m * kp.size, floor) / 2 * 2**0.5) < kp.pt[0] < w - 1 - r and r < kp.pt[1] < h - 1 - r
    ]
    assert len(keypoints) > 100
    kps, reference = ExemplarDescriptor(precision="fp32").compute(photo_bgr, keypoints)
    xy = torch.tensor([kp.pt for kp in kps])[None]
    size = torch.tensor([kp.size for kp in kps])[None, :, None, None]
    angle = torch.tensor([kp.angle for kp in kps])[None, :, None]
    rgb = torch.from_numpy(cv2.cvtColor(photo_bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)[None].float() / 255
    describe = KF.LAFDescriptor(patch_descriptor_module=module, patch_size=module.patch_size)

    def mean_cosine(scale: torch.Tensor, ori: torch.Tensor) -> float:
        with torch.no_grad():
            desc = describe(rgb, KF.laf_from_center_scale_ori(xy, scale, ori))
        assert desc.shape == (1, len(kps), 128)
        return float((desc[0].numpy() * reference).sum(1).mean())

    side = torch.clamp(m * size, min=floor)  # the card's smallest side widens the tiny keypoints' patches
    lafs = KF.laf_from_center_scale_ori(xy, side / 2, -angle)
    assert torch.allclose(keypoint_lafs(kps, m, min_side=floor), lafs, atol=1e-3)
    right = mean_cosine(side / 2, -angle)
    assert right > 0.99, right  # measured 0.9993 over 227 keypoints
    # A wrong scale or orientation convention describes other patches.
    assert mean_cosine(1.5 * side / 2, -angle) < 0.9
    assert mean_cosine(side / 2, angle) < 0.9
    assert mean_cosine(side, -angle) < 0.9  # the patch side taken for the scale


def test_keypoint_lafs_upright_and_no_angle():
    kps = [cv2.KeyPoint(10.0, 20.0, 4.0, 30.0), cv2.KeyPoint(5.0, 6.0, 2.0, -1)]
    lafs = keypoint_lafs(kps, 12.0)
    assert lafs.shape == (1, 2, 2, 3) and lafs.dtype == torch.float32
    assert torch.allclose(KF.get_laf_scale(lafs)[0, :, 0, 0], torch.tensor([24.0, 12.0]))
    assert torch.allclose(KF.get_laf_orientation(lafs)[0, :, 0], torch.tensor([-30.0, 0.0]), atol=1e-4)
    assert torch.allclose(KF.get_laf_orientation(keypoint_lafs(kps, 12.0, upright=True)), torch.zeros(1, 2, 1), atol=1e-4)
    assert torch.equal(lafs[0, :, :, 2], torch.tensor([[10.0, 20.0], [5.0, 6.0]]))
    assert ExemplarPatchDescriptor().min_patch_side == 22.0  # the default's card
    assert ExemplarPatchDescriptor("exemplar-fast-t005-pairs-nce").min_patch_side == 0.0
    floored = keypoint_lafs(kps, 12.0, min_side=36.0)  # sides 48 (kept) and 36 (from 24)
    assert torch.allclose(KF.get_laf_scale(floored)[0, :, 0, 0], torch.tensor([24.0, 18.0]))
