"""Image checks and patch extraction around keypoints, in torch on any device.

Patches follow each keypoint's position, size and angle and are sampled from an
anti-aliased Gaussian image pyramid (OpenCV's ``pyrDown`` filter), so a patch that covers
many image pixels is never naively sub-sampled. Grey conversion, pyramid and sampling run
on the device of the image tensor: on CUDA an image goes up once and nothing comes back
until the descriptors do.

Coordinate convention (OpenCV's): pixel centres at integer coordinates, x to the right,
y down; ``KeyPoint.size`` is a diameter in pixels; ``KeyPoint.angle`` is in degrees,
clockwise in image coordinates, -1 when the detector gives none.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "BGR_TO_GRAY",
    "to_gray_float",
    "gray_tensor",
    "keypoints_to_arrays",
    "build_pyramid",
    "keypoint_frames",
    "patch_levels",
    "extract_patches",
    "normalize_patches",
]


#: OpenCV's BGR -> grey weights (ITU-R BT.601), as cv2.cvtColor uses them.
BGR_TO_GRAY = (0.114, 0.587, 0.299)


def gray_tensor(image: np.ndarray, device: str | torch.device = "cpu", name: str = "image") -> torch.Tensor:
    """Check an image as OpenCV loads it and convert it to grey float32 in [0, 1] on ``device``.

    The array goes to the device as it is (uint8 stays uint8) and is converted there.

    Args:
        image: (H, W) grey, (H, W, 1), (H, W, 3) BGR or (H, W, 4) BGRA; uint8, uint16, or
            float32/float64 with values in [0, 1].
        device: where the result lives.
        name: what to call the argument in error messages.

    Returns:
        (H, W) float32 tensor in [0, 1], contiguous, on ``device``.

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
    data = torch.from_numpy(np.ascontiguousarray(image)).to(device, non_blocking=True)
    gray = data.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)
    if gray.ndim == 3:
        b, g, r = BGR_TO_GRAY
        gray = gray[:, :, 0] * b + gray[:, :, 1] * g + gray[:, :, 2] * r
    return gray.contiguous()


def to_gray_float(image: np.ndarray, name: str = "image") -> np.ndarray:
    """:func:`gray_tensor` on the CPU, as a (H, W) float32 numpy array in [0, 1]."""
    return gray_tensor(image, "cpu", name).numpy()


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


def pyr_down(image: torch.Tensor) -> torch.Tensor:
    """Blur with OpenCV's 5-tap Gaussian [1, 4, 6, 4, 1] / 16 and keep every second pixel (``cv2.pyrDown``).

    Args:
        image: (..., H, W) float tensor.

    Returns:
        (..., (H + 1) // 2, (W + 1) // 2) tensor; borders reflected without repeating the
        edge pixel (OpenCV's BORDER_REFLECT_101, torch's "reflect").
    """
    shape = image.shape
    x = image.reshape(1, -1, *shape[-2:])
    # Shifted strided slices instead of a convolution: 5 adds per pass, fast on CPU and GPU.
    x = F.pad(x, (2, 2, 0, 0), mode="reflect")
    w = x.shape[-1] - 4
    x = (x[..., 0:w:2] + x[..., 4 : w + 4 : 2] + 4 * (x[..., 1 : w + 1 : 2] + x[..., 3 : w + 3 : 2]) + 6 * x[..., 2 : w + 2 : 2])
    x = F.pad(x, (0, 0, 2, 2), mode="reflect")
    h = x.shape[-2] - 4
    x = (x[..., 0:h:2, :] + x[..., 4 : h + 4 : 2, :] + 4 * (x[..., 1 : h + 1 : 2, :] + x[..., 3 : h + 3 : 2, :])
         + 6 * x[..., 2 : h + 2 : 2, :])
    return (x / 256).reshape(*shape[:-2], *x.shape[-2:])


def build_pyramid(gray: np.ndarray | torch.Tensor, min_side: int = 16) -> list[torch.Tensor]:
    """Gaussian pyramid of a grey image: level l has half the resolution of level l-1.

    Args:
        gray: (H, W) float32 image, numpy or a tensor on any device.
        min_side: stop before a level's shorter side drops below this many pixels.

    Returns:
        Levels as (1, 1, H_l, W_l) float32 tensors on the image's device, level 0 being ``gray`` itself.
    """
    levels = [torch.as_tensor(gray, dtype=torch.float32)[None, None]]
    while min(levels[-1].shape[-2:]) // 2 >= min_side:
        levels.append(pyr_down(levels[-1]))
    return levels


def keypoint_frames(size: np.ndarray, angle: np.ndarray | None, magnification: float, min_side: float = 0.0) -> np.ndarray:
    """Patch frames of keypoints: squares of side ``max(magnification * size, min_side)`` turned by ``angle``.

    Args:
        size: (N,) keypoint diameters in pixels.
        angle: (N,) degrees, clockwise on screen (OpenCV); negative values and ``None`` mean upright.
        magnification: patch side in units of ``size``.
        min_side: smallest patch side in pixels of the image (0: none). A patch narrower than
            the network's input is upsampled, so its pixels' noise fills the input; the floor
            keeps the smallest keypoints' patches wide enough to average it.

    Returns:
        (N, 2, 2) float64 frames ``A`` for :func:`extract_patches`.
    """
    size = np.maximum(np.asarray(size, dtype=np.float64), min_side / magnification)
    theta = np.zeros_like(size) if angle is None else np.deg2rad(np.where(np.asarray(angle) < 0, 0.0, angle))
    cos, sin = np.cos(theta), np.sin(theta)
    # With y pointing down, this rotation by +angle turns the patch clockwise on screen, as OpenCV's angle does.
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    return rotation * (magnification * size / 2)[:, None, None]


def patch_levels(frames: torch.Tensor, num_levels: int, patch_size: int = 32) -> torch.Tensor:
    """The pyramid level each patch is sampled from: the one whose pixel step is closest below the patch's.

    Args:
        frames: (N, 2, 2) float64 frames ``A`` in level-0 pixels (:func:`keypoint_frames`).
        num_levels: levels of the pyramid.
        patch_size: the patch's side P in pixels.

    Returns:
        (N,) int64 levels, ``floor(log2(step))`` within ``[0, num_levels - 1]``, ``step`` the level-0
        pixels per patch pixel.
    """
    det = frames[:, 0, 0] * frames[:, 1, 1] - frames[:, 0, 1] * frames[:, 1, 0]  # no LU solver for 2x2 (CUDA)
    step = 2 * torch.sqrt(torch.abs(det)) / patch_size
    return torch.floor(torch.log2(step.clamp_min(1e-12))).clamp(0, num_levels - 1).long()


def extract_patches(
    pyramid: list[torch.Tensor],
    centers: np.ndarray | torch.Tensor,
    frames: np.ndarray | torch.Tensor,
    patch_size: int = 32,
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
        (N, 1, P, P) float32 patches with the image's intensities, on the pyramid's device.
    """
    device = pyramid[0].device
    # Level choice and frame scaling in float64 (N values each); only the grid is float32.
    centers = torch.as_tensor(centers).to(device, torch.float64).reshape(-1, 2)
    frames = torch.as_tensor(frames).to(device, torch.float64).reshape(-1, 2, 2)
    n = len(centers)
    out = torch.empty((n, 1, patch_size, patch_size), dtype=torch.float32, device=device)
    if n == 0:
        return out
    level = patch_levels(frames, len(pyramid), patch_size)
    cells = (2 * torch.arange(patch_size, device=device, dtype=torch.float64) + 1) / patch_size - 1
    # A patch whose samples all lie within the level's pixel area gets the same values from
    # grid_sample's border padding as from its reflection, at half the cost on the CPU.
    reach = frames.abs().sum(-1) * cells[-1]  # (n, 2): farthest sample from the centre, per axis
    scale = 2.0 ** level[:, None]  # level-0 pixels per pixel of the patch's level
    low, high = (centers - reach + 0.5) / scale, (centers + reach + 0.5) / scale
    sizes = torch.tensor([level_image.shape[-1:-3:-1] for level_image in pyramid], dtype=torch.float64, device=device)
    crossing = ((low < 0) | (high > sizes[level])).any(-1)
    group = 2 * level + crossing.long()
    groups = torch.unique(group).tolist() if n > 1 else [int(group[0])]
    for key in groups:
        lev, padding = key // 2, ("reflection" if key % 2 else "border")
        idx = torch.nonzero(group == key).flatten() if len(groups) > 1 else None
        image = pyramid[lev]
        h, w = image.shape[-2:]
        # Level-0 pixel p maps to (p + 0.5) / 2^lev - 0.5 on level lev; grid_sample wants
        # (p_lev + 0.5) / size * 2 - 1, so both steps fold into one scale per axis.
        to_grid = torch.tensor([2.0 / (w * 2.0**lev), 2.0 / (h * 2.0**lev)], dtype=torch.float64, device=device)
        c, a = (centers, frames) if idx is None else (centers[idx], frames[idx])
        a = a * to_grid[:, None]  # (n, 2, 2)
        # Sample (row p, column q) is offset + a[:, 0] u_q + a[:, 1] v_p: a row term and a
        # column term, summed into the (n, P, P, 2) grid in one pass, as complex numbers (x + iy)
        # so that the broadcast's innermost loop runs over P values, not over 2.
        rows = ((c + 0.5) * to_grid - 1)[:, None, :] + a[:, None, :, 1] * cells[None, :, None]  # (n, P, 2)
        columns = a[:, None, :, 0] * cells[None, :, None]  # (n, P, 2)
        rows, columns = (torch.view_as_complex(t.float()) for t in (rows, columns))
        grid = torch.view_as_real(rows[:, :, None] + columns[:, None, :])  # (n, P, P, 2)
        # On the CPU grid_sample runs one thread per batch element: the level goes in as one
        # view per thread (no copy), each sampling its share of the grid rows.
        chunks = math.gcd(torch.get_num_threads(), len(grid) * patch_size) if device.type == "cpu" else 1
        sampled = F.grid_sample(
            image.expand(chunks, -1, -1, -1), grid.reshape(chunks, -1, patch_size, 2), mode="bilinear",
            padding_mode=padding, align_corners=False,
        ).reshape(-1, 1, patch_size, patch_size)
        if idx is None:
            return sampled
        out[idx] = sampled
    return out


def normalize_patches(patches: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Standardise each patch to zero mean and unit standard deviation.

    Args:
        patches: (B, C, P, P) float tensor.
        eps: added to the standard deviation so flat patches stay finite.

    Returns:
        (B, C, P, P) tensor; makes descriptors invariant to affine intensity changes.
    """
    dims = (1, 2, 3)
    centred = patches - patches.mean(dim=dims, keepdim=True)
    # Two-pass standard deviation (unbiased, as Tensor.std) from the centred values we need
    # anyway: several times faster on the CPU than Tensor.std's Welford reduction.
    count = patches[0].numel()
    std = torch.sqrt(centred.square().sum(dim=dims, keepdim=True) / max(count - 1, 1))
    return centred / (std + eps)
