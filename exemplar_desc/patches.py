"""Image checks and patch extraction around keypoints.

Patches follow each keypoint's position, size and angle and are sampled from an
anti-aliased Gaussian image pyramid (``cv2.pyrDown``), so a patch that covers many
image pixels is never naively sub-sampled.

Coordinate convention (OpenCV's): pixel centres at integer coordinates, x to the right,
y down; ``KeyPoint.size`` is a diameter in pixels; ``KeyPoint.angle`` is in degrees,
clockwise in image coordinates, -1 when the detector gives none.
"""

from __future__ import annotations

import logging
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "to_gray_float",
    "keypoints_to_arrays",
    "build_pyramid",
    "keypoint_frames",
    "extract_patches",
    "normalize_patches",
]


def to_gray_float(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Check an image as OpenCV loads it and convert it to grey float32 in [0, 1].

    Args:
        image: (H, W) grey, (H, W, 1), (H, W, 3) BGR or (H, W, 4) BGRA; uint8, uint16, or
            float32/float64 with values in [0, 1].
        name: what to call the argument in error messages.

    Returns:
        (H, W) float32 array in [0, 1], C-contiguous.

    Raises:
        TypeError: not a numpy array, or an unsupported dtype.
        ValueError: empty, wrong number of dimensions or channels, non-finite values,
            float values outside [0, 1].
    """
    if image is None:
        raise TypeError(f"{name} is None (cv2.imread returns None for a missing or unreadable file)")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(
            f"{name} must have shape (H, W), (H, W, 1), (H, W, 3) BGR or (H, W, 4) BGRA; got {image.shape}"
        )
    if image.dtype == np.uint8:
        scale = 1.0 / 255.0
    elif image.dtype == np.uint16:
        scale = 1.0 / 65535.0
    elif image.dtype in (np.float32, np.float64):
        if not np.all(np.isfinite(image)):
            raise ValueError(f"{name} contains NaN or infinite values")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float {name} must have values in [0, 1]; got [{lo:g}, {hi:g}] (divide by 255 for 8-bit data)"
            )
        scale = 1.0
    else:
        raise TypeError(f"{name} must be uint8, uint16, float32 or float64; got {image.dtype}")
    image = image.astype(np.float32) * np.float32(scale)
    if image.ndim == 3:
        code = cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        image = cv2.cvtColor(image, code)
    return np.ascontiguousarray(image)


def keypoints_to_arrays(
    keypoints: Sequence[cv2.KeyPoint], name: str = "keypoints"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split cv2.KeyPoints into arrays.

    Args:
        keypoints: the keypoints.
        name: what to call the argument in error messages (``keypoints[i]`` names the offender).

    Returns:
        xy: (N, 2) float32 pixel coordinates (x, y);
        size: (N,) float32 diameters in pixels;
        angle: (N,) float32 degrees, clockwise in image coordinates, -1 where absent.

    Raises:
        TypeError: an element is not a cv2.KeyPoint.
        ValueError: a non-finite coordinate or angle, or a size that is not positive and finite.
    """
    for i, kp in enumerate(keypoints):
        if not isinstance(kp, cv2.KeyPoint):
            raise TypeError(f"{name}[{i}] must be a cv2.KeyPoint, got {type(kp).__name__}")
    xy = np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2)
    size = np.array([kp.size for kp in keypoints], dtype=np.float32)
    angle = np.array([kp.angle for kp in keypoints], dtype=np.float32)
    checks = (
        (np.isfinite(xy).all(axis=1), "pt", "coordinates must be finite pixels"),
        (np.isfinite(size) & (size > 0), "size", "must be a positive, finite diameter in pixels"),
        (np.isfinite(angle), "angle", "must be finite degrees (-1 for none)"),
    )
    for ok, field, allowed in checks:
        if not ok.all():
            i = int(np.argmin(ok))
            raise ValueError(f"{name}[{i}].{field} = {getattr(keypoints[i], field)}: {allowed}")
    return xy, size, angle


def build_pyramid(gray: np.ndarray, min_side: int = 16) -> list[torch.Tensor]:
    """Gaussian pyramid of a grey image: level l has half the resolution of level l-1.

    Args:
        gray: (H, W) float32 image.
        min_side: stop before a level's shorter side drops below this many pixels.

    Returns:
        Levels as (1, 1, H_l, W_l) float32 tensors, level 0 being ``gray`` itself.
    """
    levels = [gray]
    while min(levels[-1].shape) // 2 >= min_side:
        levels.append(cv2.pyrDown(levels[-1]))
    return [torch.from_numpy(np.ascontiguousarray(level))[None, None] for level in levels]


def keypoint_frames(size: np.ndarray, angle: np.ndarray | None, magnification: float) -> np.ndarray:
    """Patch frames of keypoints: squares of side ``magnification * size`` turned by ``angle``.

    Args:
        size: (N,) keypoint diameters in pixels.
        angle: (N,) degrees, clockwise on screen (OpenCV); negative values and ``None`` mean upright.
        magnification: patch side in units of ``size``.

    Returns:
        (N, 2, 2) float64 frames ``A`` for :func:`extract_patches`.
    """
    size = np.asarray(size, dtype=np.float64)
    theta = np.zeros_like(size) if angle is None else np.deg2rad(np.where(np.asarray(angle) < 0, 0.0, angle))
    cos, sin = np.cos(theta), np.sin(theta)
    # With y pointing down, this rotation by +angle turns the patch clockwise on screen, as OpenCV's angle does.
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    return rotation * (magnification * size / 2)[:, None, None]


def extract_patches(
    pyramid: list[torch.Tensor], centers: np.ndarray, frames: np.ndarray, patch_size: int = 32
) -> torch.Tensor:
    """Cut patches ``centers + frames @ [-1, 1]^2`` out of an image pyramid, resampled to ``patch_size``.

    Same convention as kornia's local affine frames (``[A | c]``): column 0 of ``A`` is the
    image of the patch's x axis, column 1 of its y axis (rows run down the patch), both in
    level-0 pixels. Each patch is sampled (bilinear) from the pyramid level whose pixel step
    is closest below the patch's own, so the source is already low-pass filtered for the
    sampling rate. Points near or beyond the border get reflected content.

    Args:
        pyramid: levels from :func:`build_pyramid`.
        centers: (N, 2) patch centres (x, y) in level-0 pixels.
        frames: (N, 2, 2) frames ``A`` in level-0 pixels (see :func:`keypoint_frames`).
        patch_size: output side P in pixels.

    Returns:
        (N, 1, P, P) float32 patches with the image's intensities.
    """
    n = len(centers)
    out = torch.empty((n, 1, patch_size, patch_size), dtype=torch.float32)
    if n == 0:
        return out
    frames = np.asarray(frames, dtype=np.float64)
    centers = np.asarray(centers, dtype=np.float64)
    step = 2 * np.sqrt(np.abs(np.linalg.det(frames))) / patch_size  # level-0 pixels per patch pixel
    level = np.clip(np.floor(np.log2(np.maximum(step, 1e-12))), 0, len(pyramid) - 1).astype(int)
    cells = (2 * np.arange(patch_size) + 1) / patch_size - 1  # cell centres in [-1, 1]
    u, v = np.meshgrid(cells, cells)  # (P, P): u along a row, v down the rows
    for lev in np.unique(level):
        idx = np.nonzero(level == lev)[0]
        image = pyramid[lev]
        h, w = image.shape[-2:]
        factor = 2.0**lev
        a = frames[idx, :, :, None, None] / factor
        x = (centers[idx, 0, None, None] + 0.5) / factor - 0.5 + a[:, 0, 0] * u + a[:, 0, 1] * v
        y = (centers[idx, 1, None, None] + 0.5) / factor - 0.5 + a[:, 1, 0] * u + a[:, 1, 1] * v
        grid = np.stack([(x + 0.5) / w * 2 - 1, (y + 0.5) / h * 2 - 1], axis=-1)
        # One (1, n*P, P) grid over the single image avoids n copies of the image.
        grid_t = torch.from_numpy(grid.astype(np.float32)).reshape(1, len(idx) * patch_size, patch_size, 2)
        sampled = F.grid_sample(image, grid_t, mode="bilinear", padding_mode="reflection", align_corners=False)
        out[idx] = sampled.reshape(len(idx), 1, patch_size, patch_size)
    return out


def normalize_patches(patches: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Standardise each patch to zero mean and unit standard deviation.

    Args:
        patches: (B, C, P, P) float tensor.
        eps: added to the standard deviation so flat patches stay finite.

    Returns:
        (B, C, P, P) tensor; makes descriptors invariant to affine intensity changes.
    """
    mean = patches.mean(dim=(1, 2, 3), keepdim=True)
    std = patches.std(dim=(1, 2, 3), keepdim=True)
    return (patches - mean) / (std + eps)
