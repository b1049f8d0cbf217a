"""Synthetic image sequences with exact homographies, made from scikit-image's sample photos.

In the spirit of the generated dataset of Fischer, Dosovitskiy & Brox (2014): each
sequence takes one real photo as image 1 and transforms it with increasing strength into
images 2..6. The photos ship inside scikit-image (no download), and everything is
deterministic (fixed parameters, seeded noise), so the default benchmark is the same on
every machine. Sequences are written in the Oxford layout and read back by
:func:`benchmarks.datasets.load_sequences` like any other data.

Kinds and strengths (images 2..6):

* ``viewpoint``: the photo as a plane rotated about its vertical axis by 12..60 degrees,
  seen by a pinhole camera (focal length = image width), shrunk to fit the frame;
* ``zoom+rotation``: zoom 1.2..2.5 about the centre with rotation 10..50 degrees;
* ``blur``: Gaussian blur, sigma 1..4.8 px;
* ``light``: intensity gain 0.7..0.17 (with 8-bit quantisation);
* ``JPEG``: JPEG quality 40..2.

The photometric kinds also move the camera slightly (rotation of k-1 degrees and a
shift of a few pixels), as the real blur/light/JPEG sequences do, so the pixel grids of
the images differ. Images 2..6 get Gaussian noise of sigma 2 grey levels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from .datasets import load_sequences, write_sequence

logger = logging.getLogger(__name__)

__all__ = ["SYNTHETIC_SEQUENCES", "sample_photo", "make_sequence", "ensure_synthetic_dataset"]

# sequence folder name: (skimage.data photo, kind); the names contain the kind word (see sequence_kind).
SYNTHETIC_SEQUENCES = {
    "astronaut-viewpoint": ("astronaut", "viewpoint"),
    "rocket-zoom-rotation": ("rocket", "zoom+rotation"),
    "coffee-blur": ("coffee", "blur"),
    "camera-light": ("camera", "light"),
    "chelsea-jpeg": ("chelsea", "JPEG"),
}
_VERSION = "synthetic-v1"  # bump when the generator changes, so old caches are not reused
_NUM_IMAGES = 6
_NOISE_SIGMA = 2.0


def sample_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as uint8 BGR (H, W, 3) or grey (H, W), as OpenCV would load it."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_RGB2BGR)
    return np.ascontiguousarray(image.astype(np.uint8))


def _about_centre(A: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Conjugate a 3x3 map so it acts about the image centre instead of the origin."""
    h, w = shape[:2]
    c = np.array([[1, 0, (w - 1) / 2], [0, 1, (h - 1) / 2], [0, 0, 1]], dtype=np.float64)
    return c @ A @ np.linalg.inv(c)


def _similarity(scale: float, degrees: float, tx: float = 0.0, ty: float = 0.0) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty], [0, 0, 1]])


def _viewpoint(shape: tuple[int, int], degrees: float, axis_degrees: float = 0.0) -> np.ndarray:
    """Homography of the image plane rotated by ``degrees`` about an in-plane axis through its
    centre, seen by a pinhole camera (focal length = image width), shrunk to fit the frame.

    ``axis_degrees`` is the axis' angle from the image's vertical (0: about the vertical axis).
    """
    h, w = shape[:2]
    f, t = float(w), np.deg2rad(degrees)
    # Centred coordinates (X, Y) on the plane -> (f X cos t / Z, f Y / Z) with Z = f + X sin t,
    # in axes turned by axis_degrees so the tilt axis is their vertical.
    P = np.array([[f * np.cos(t), 0, 0], [0, f, 0], [np.sin(t), 0, f]])
    if axis_degrees:
        R = _similarity(1.0, axis_degrees)
        P = R @ P @ R.T
    corners = np.array([[-(w - 1) / 2, -(h - 1) / 2], [(w - 1) / 2, (h - 1) / 2], [-(w - 1) / 2, (h - 1) / 2],
                        [(w - 1) / 2, -(h - 1) / 2]])
    q = np.c_[corners, np.ones(4)] @ P.T
    q = q[:, :2] / q[:, 2:]
    fit = min(1.0, (w - 1) / np.ptp(q[:, 0]), (h - 1) / np.ptp(q[:, 1]))
    shift = -fit * (q.min(axis=0) + q.max(axis=0)) / 2  # centre the projected quadrilateral in the frame
    return _about_centre(np.array([[fit, 0, shift[0]], [0, fit, shift[1]], [0, 0, 1]]) @ P / f, shape)


def _camera_shake(shape: tuple[int, int], k: int) -> np.ndarray:
    """The small camera motion of image ``k`` (2..6) of the photometric kinds: rotation of k-1
    degrees about the centre and a shift of (2k, -k) pixels, as a (3, 3) float64 homography."""
    return _about_centre(_similarity(1.0, float(k - 1), 2.0 * k, -1.0 * k), shape)


def _warp(image: np.ndarray, H: np.ndarray) -> np.ndarray:
    """``image`` (H, W[, C]) moved by the (3, 3) homography ``H`` into a frame of its own size,
    bilinear, zero outside (pixel centres at integer coordinates); keeps the dtype."""
    return cv2.warpPerspective(image, H, (image.shape[1], image.shape[0]), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def make_sequence(image: np.ndarray, kind: str, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Transform ``image`` into a six-image sequence of the given kind.

    Args:
        image: uint8 (H, W) or (H, W, 3) image 1.
        kind: ``"viewpoint"``, ``"zoom+rotation"``, ``"blur"``, ``"light"`` or ``"JPEG"``.
        seed: seed of the added noise.

    Returns:
        Six uint8 images of image 1's shape, and six (3, 3) float64 homographies from image
        1 to image k (the first is the identity); ``cv2.warpPerspective`` with ``H_k`` moves
        image 1 onto image k (pixel centres at integer coordinates).
    """
    rng = np.random.default_rng(seed)
    shape = image.shape[:2]
    images, homographies = [image], [np.eye(3)]
    for k in range(2, _NUM_IMAGES + 1):
        step = k - 2  # 0..4
        if kind == "viewpoint":
            H = _viewpoint(shape, 12.0 * (step + 1))
        elif kind == "zoom+rotation":
            H = _about_centre(_similarity([1.2, 1.45, 1.75, 2.1, 2.5][step], 10.0 * (step + 1)), shape)
        elif kind in ("blur", "light", "JPEG"):
            H = _camera_shake(shape, k)
        else:
            raise ValueError(f"unknown synthetic kind {kind!r}")
        warped = _warp(image, H).astype(np.float32)
        if kind == "blur":
            warped = cv2.GaussianBlur(warped, (0, 0), [1.0, 1.8, 2.6, 3.6, 4.8][step])
        elif kind == "light":
            warped = warped * [0.7, 0.5, 0.35, 0.25, 0.17][step]
        warped = np.clip(np.rint(warped + rng.normal(0.0, _NOISE_SIGMA, warped.shape)), 0, 255).astype(np.uint8)
        if kind == "JPEG":
            ok, buf = cv2.imencode(".jpg", warped, [cv2.IMWRITE_JPEG_QUALITY, [40, 20, 10, 5, 2][step]])
            warped = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        images.append(warped)
        homographies.append(H)
    return images, homographies


def ensure_synthetic_dataset(cache: str | Path) -> Path:
    """Generate the synthetic sequences under ``cache`` unless a complete copy is there.

    Returns:
        The folder holding one sub-folder per sequence (Oxford layout).
    """
    root = Path(cache) / _VERSION
    present = {s.name for s in load_sequences(root)[0]} if root.is_dir() else set()
    for i, (name, (photo, kind)) in enumerate(SYNTHETIC_SEQUENCES.items()):
        if name in present:
            continue
        logger.info("generating synthetic sequence %s from skimage.data.%s", name, photo)
        images, homographies = make_sequence(sample_photo(photo), kind, seed=i)
        write_sequence(root / name, images, homographies)
    return root
