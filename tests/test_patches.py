import cv2
import numpy as np
import pytest
import torch

from exemplar_desc.patches import (
    build_pyramid,
    extract_patches,
    gray_tensor,
    keypoint_frames,
    keypoints_to_arrays,
    normalize_patches,
    to_gray_float,
)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((20, 30), np.uint8),
        np.zeros((20, 30, 1), np.uint8),
        np.zeros((20, 30, 3), np.uint8),
        np.zeros((20, 30, 4), np.uint8),
        np.zeros((20, 30, 3), np.uint16),
        np.zeros((20, 30), np.float32),
        np.ones((20, 30, 3), np.float64),
    ],
)
def test_accepted_images(image):
    gray = to_gray_float(image)
    assert gray.shape == (20, 30) and gray.dtype == np.float32


def test_scaling_by_dtype():
    assert to_gray_float(np.full((2, 2), 255, np.uint8)).max() == pytest.approx(1.0)
    assert to_gray_float(np.full((2, 2), 65535, np.uint16)).max() == pytest.approx(1.0)
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in OpenCV's BGR order
    assert to_gray_float(bgr)[0, 0] == pytest.approx(0.114, abs=1e-3)


@pytest.mark.parametrize(
    "image, error, message",
    [
        (None, TypeError, "None"),
        ([[1, 2]], TypeError, "numpy array"),
        (np.zeros((0, 5), np.uint8), ValueError, "empty"),
        (np.zeros((5,), np.uint8), ValueError, "shape"),
        (np.zeros((5, 5, 2), np.uint8), ValueError, "shape"),
        (np.zeros((2, 5, 5, 3), np.uint8), ValueError, "shape"),
        (np.full((5, 5), np.nan, np.float32), ValueError, "NaN"),
        (np.full((5, 5), 255.0, np.float32), ValueError, r"\[0, 1\]"),
        (np.zeros((5, 5), np.int32), TypeError, "uint8"),
    ],
)
def test_rejected_images(image, error, message):
    with pytest.raises(error, match=message):
        to_gray_float(image)


def test_keypoint_checks():
    xy, size, angle = keypoints_to_arrays([cv2.KeyPoint(1.5, 2.5, 4.0, 30.0)])
    assert xy.tolist() == [[1.5, 2.5]] and size.tolist() == [4.0] and angle.tolist() == [30.0]
    with pytest.raises(TypeError):
        keypoints_to_arrays([(1, 2)])
    with pytest.raises(ValueError, match="size"):
        keypoints_to_arrays([cv2.KeyPoint(1.0, 2.0, 0.0)])


def test_upright_patch_is_the_crop_around_the_keypoint():
    rng = np.random.default_rng(0)
    image = rng.random((64, 64)).astype(np.float32)
    # A 32-pixel patch centred between pixels 31 and 32 covers image[16:48, 16:48] at step 1.
    frames = keypoint_frames(np.array([32.0]), None, magnification=1.0)
    patch = extract_patches(build_pyramid(image), np.array([[31.5, 31.5]]), frames, 32)
    assert torch.allclose(patch[0, 0], torch.from_numpy(image[16:48, 16:48]), atol=1e-5)


def test_min_side_widens_only_the_patches_narrower_than_it():
    angles = np.array([0.0, 30.0, 30.0])
    frames = keypoint_frames(np.array([1.0, 2.0, 4.0]), angles, magnification=10.0, min_side=25.0)
    expected = keypoint_frames(np.array([2.5, 2.5, 4.0]), angles, magnification=10.0)
    np.testing.assert_allclose(frames, expected)  # sides 25, 25 (floored), 40 (kept), same orientations
    np.testing.assert_allclose(np.abs(np.linalg.det(frames)), np.array([25.0, 25.0, 40.0]) ** 2 / 4)


def test_angle_turns_the_patch_clockwise():
    image = np.zeros((64, 64), np.float32)
    image[10:20, 28:36] = 1.0  # a blob straight above the centre
    frames = keypoint_frames(np.array([32.0, 32.0]), np.array([-1.0, 90.0]), magnification=1.0)
    up, turned = extract_patches(build_pyramid(image), np.array([[31.5, 31.5]] * 2), frames, 32)[:, 0]
    assert up[:8].sum() > 10 and up[-8:].sum() == 0  # upright (-1): the blob is at the top
    # The frame turned clockwise by 90 deg: its +x axis points down, its -y axis points right,
    # so the blob, above the centre, is to the left of the patch's x axis... at the patch's left.
    assert turned[:, :8].sum() > 10 and turned[:, -8:].sum() == 0


def test_large_patches_come_from_coarse_levels_without_aliasing():
    # A 1-pixel checkerboard averages to grey when sampled 4x coarser, never to a moire pattern.
    image = (np.indices((256, 256)).sum(0) % 2).astype(np.float32)
    frames = keypoint_frames(np.array([128.0]), None, magnification=1.0)
    patch = extract_patches(build_pyramid(image), np.array([[128.0, 128.0]]), frames, 32)
    assert abs(float(patch.mean()) - 0.5) < 0.02 and float(patch.std()) < 0.05


def test_border_points_get_patches():
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    centers = np.array([[0.0, 0.0], [39.0, 39.0], [-10.0, 60.0]])
    patches = extract_patches(build_pyramid(image), centers, keypoint_frames(np.full(3, 4.0), None, 8.0), 32)
    assert patches.shape == (3, 1, 32, 32) and torch.isfinite(patches).all()


def test_normalize_patches():
    out = normalize_patches(torch.rand(4, 1, 8, 8) * 5 + 3)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2, 3)), torch.ones(4), atol=1e-3)
    assert torch.isfinite(normalize_patches(torch.ones(1, 1, 8, 8))).all()


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Float64 bilinear interpolation at interior points (pixel centres at integers)."""
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    img = image.astype(np.float64)
    return ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1])
            + fy * ((1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1]))


def test_pyramid_is_opencvs_pyr_down():
    image = np.random.default_rng(1).random((101, 138)).astype(np.float32)
    levels = build_pyramid(image)
    ref = [image]
    while min(ref[-1].shape) // 2 >= 16:
        ref.append(cv2.pyrDown(ref[-1]))
    assert [tuple(lv.shape[-2:]) for lv in levels] == [r.shape for r in ref]
    for level, r in zip(levels, ref):
        np.testing.assert_allclose(level[0, 0].numpy(), r, atol=1e-6)


def test_patches_follow_the_keypoint_geometry_within_1e4():
    """Every patch pixel is the level's bilinear sample at c + A (u, v), u, v the cell centres in [-1, 1].

    The sampler computes its grid in float32 from float64 frames; against this float64
    reference the bound is 1e-4 in intensity (image values in [0, 1]), at level 0 and 2.
    """
    rng = np.random.default_rng(2)
    image = cv2.GaussianBlur(rng.random((400, 500)).astype(np.float32), (0, 0), 1.5)
    pyramid = build_pyramid(image)
    size = np.array([3.0, 2.5, 10.0, 12.0])  # magnification 4: steps 0.375, 0.31, 1.25, 1.5 px: level 0
    size = np.concatenate([size, [40.0, 36.0]])  # steps 5 and 4.5: level 2
    angle = np.array([-1.0, 30.0, 117.0, 250.0, 45.0, 300.0])
    centers = np.array([[250.3, 200.7], [101.1, 99.9], [300.0, 150.5], [199.5, 210.25], [250.0, 200.0], [180.2, 220.9]])
    frames = keypoint_frames(size, angle, 4.0)
    patches = extract_patches(pyramid, centers, frames, 32)[:, 0].numpy()
    cells = (2 * np.arange(32) + 1) / 32 - 1
    u, v = np.meshgrid(cells, cells)
    for i in range(len(size)):
        step = 2 * np.sqrt(abs(np.linalg.det(frames[i]))) / 32
        lev = int(np.clip(np.floor(np.log2(step)), 0, len(pyramid) - 1))
        assert lev == (2 if i >= 4 else 0)
        f = 2.0**lev
        x = (centers[i, 0] + 0.5) / f - 0.5 + (frames[i, 0, 0] * u + frames[i, 0, 1] * v) / f
        y = (centers[i, 1] + 0.5) / f - 0.5 + (frames[i, 1, 0] * u + frames[i, 1, 1] * v) / f
        ref = _bilinear(pyramid[lev][0, 0].numpy(), x, y)
        assert np.abs(patches[i] - ref).max() < 1e-4


def test_patches_beyond_the_border_are_reflected_within_1e4():
    """Outside the image a patch reads the image mirrored about its outer pixel edges (symmetric
    reflection, repeated far out), as grid_sample's reflection padding does; same 1e-4 bound as above."""
    rng = np.random.default_rng(3)
    image = cv2.GaussianBlur(rng.random((60, 80)).astype(np.float32), (0, 0), 1.5)
    # Across a corner, an edge, within half a pixel of an edge, inside, and two image widths out.
    centers = np.array([[0.0, 0.0], [79.0, 59.0], [-3.2, 30.0], [40.0, 58.7], [40.0, 30.0], [-150.0, 20.0], [10.6, 9.6]])
    size, angle = np.full(len(centers), 5.0), np.array([-1.0, 30.0, 117.0, 250.0, 45.0, 10.0, 0.0])
    frames = keypoint_frames(size, angle, 4.0)  # side 20 px, step 0.625: level 0
    patches = extract_patches(build_pyramid(image), centers, frames, 32)[:, 0].numpy()
    pad = 250
    mirrored = np.pad(image, pad, mode="symmetric")
    cells = (2 * np.arange(32) + 1) / 32 - 1
    u, v = np.meshgrid(cells, cells)
    for i in range(len(centers)):
        x = centers[i, 0] + frames[i, 0, 0] * u + frames[i, 0, 1] * v
        y = centers[i, 1] + frames[i, 1, 0] * u + frames[i, 1, 1] * v
        # Between the last pixel centre and the outer edge grid_sample holds the edge pixel.
        ref = _bilinear(mirrored, x + pad, y + pad)
        assert np.abs(patches[i] - ref).max() < 1e-4, i


def test_gray_tensor_is_opencvs_conversion():
    bgr = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    ref = cv2.cvtColor(bgr.astype(np.float32) / 255, cv2.COLOR_BGR2GRAY)
    np.testing.assert_allclose(gray_tensor(bgr).numpy(), ref, atol=1e-6)
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    np.testing.assert_allclose(gray_tensor(bgra).numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_sampling_split_across_threads_gives_the_same_patches(threads):
    """Each thread samples its share of the grid rows from a view of the level: bit-identical patches."""
    rng = np.random.default_rng(5)
    pyramid = build_pyramid(cv2.GaussianBlur(rng.random((300, 340)).astype(np.float32), (0, 0), 1.5))
    centers = rng.uniform(-20, 360, (37, 2))  # some beyond the border, reflected
    frames = keypoint_frames(rng.uniform(2, 40, 37), rng.uniform(0, 360, 37), 6.0)  # levels 0 to 3
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = extract_patches(pyramid, centers, frames, 32)
        torch.set_num_threads(threads)
        assert torch.equal(extract_patches(pyramid, centers, frames, 32), one)
    finally:
        torch.set_num_threads(saved)
