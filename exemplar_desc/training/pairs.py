"""Positive pairs of keypoint patches without labels: SIFT keypoints of training photos re-detected in synthetic views.

Each photo gets synthetic views (:func:`.magnification.synthetic_view` with light: homography,
blur, gamma and gain). A keypoint of the photo and one of the view form a pair when the
view's keypoint lies within ``radius`` pixels of the photo's keypoint mapped by the
homography and its patch frame (size and angle) is the photo's frame mapped by the
homography's local linear part, within ``frame_tolerance``. Both patches are cut as
:class:`exemplar_desc.ExemplarDescriptor` cuts them, each at its own detection.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from ..patches import build_pyramid, extract_patches, keypoint_frames, keypoints_to_arrays, normalize_patches
from .magnification import downscale, project, read_gray, synthetic_view

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["homography_jacobian", "match_frames", "warped_pairs", "configured_pairs", "PAIR_SETTINGS"]

#: How the pairs are made (recorded in the model card with their number).
PAIR_SETTINGS = {
    "views": "synthetic views of each photo: random homography, blur, gamma and gain, then the shading, sensor noise and JPEG "
             "compression recorded beside (training.magnification.synthetic_view)",
    "max_side": 640,
    "keypoints_per_image": 1000,
    "radius_px": 1.5,
    "frame_tolerance": 0.5,
}


def homography_jacobian(hom: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N, 2, 2) float64 derivatives of the (3, 3) homography's pixel map at (N, 2) points (x, y)."""
    ones = np.ones((len(xy), 1))
    w = np.concatenate([xy, ones], 1) @ hom[2]
    mapped = project(hom, xy)
    return (hom[None, :2, :2] - mapped[:, :, None] * hom[None, 2:3, :2]) / w[:, None, None]


def match_frames(
    xy: tuple[np.ndarray, np.ndarray], frames: tuple[np.ndarray, np.ndarray], hom: np.ndarray,
    radius: float = PAIR_SETTINGS["radius_px"], frame_tolerance: float = PAIR_SETTINGS["frame_tolerance"],
) -> np.ndarray:
    """Pairs of keypoints of an image and its view by the homography ``hom``.

    A candidate (i, j) has keypoint j within ``radius`` pixels of ``hom(xy_i)`` and
    ``|| frames_j^-1 J_i frames_i - I ||_F <= frame_tolerance`` (J_i: the homography's
    derivative at xy_i), so size and angle agree too (0.5: sizes within about 35 %, angles within 20 degrees).
    Each keypoint is used once, candidates taken by increasing frame error.

    Args:
        xy: (N, 2) and (M, 2) pixels (x, y) of the image's and the view's keypoints.
        frames: (N, 2, 2) and (M, 2, 2) patch frames (:func:`exemplar_desc.patches.keypoint_frames`).

    Returns:
        (K, 2) int64 indices (i, j).
    """
    if len(xy[0]) == 0 or len(xy[1]) == 0:
        return np.zeros((0, 2), np.int64)
    i, j = np.nonzero(np.linalg.norm(project(hom, xy[0])[:, None] - xy[1][None], axis=2) <= radius)
    if len(i) == 0:
        return np.zeros((0, 2), np.int64)
    moved = homography_jacobian(hom, xy[0][i]) @ frames[0][i]
    error = np.linalg.norm(np.linalg.solve(frames[1][j], moved) - np.eye(2), axis=(1, 2))
    order = np.argsort(error, kind="stable")
    order = order[error[order] <= frame_tolerance]
    i, j = i[order], j[order]
    first = np.zeros(len(i), bool)
    first[np.unique(i, return_index=True)[1]] = True
    i, j = i[first], j[first]
    first = np.zeros(len(j), bool)
    first[np.unique(j, return_index=True)[1]] = True
    return np.stack([i[first], j[first]], 1).astype(np.int64)


def _keypoint_frames(sift: cv2.SIFT, gray: np.ndarray, magnification: float, min_side: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) positions and (N, 2, 2) patch frames of the SIFT keypoints of a (H, W) uint8 image."""
    kps = sift.detect(gray, None)
    if not kps:
        return np.zeros((0, 2)), np.zeros((0, 2, 2))
    xy, size, angle = keypoints_to_arrays(kps)
    return xy, keypoint_frames(size, angle, magnification, min_side)


def warped_pairs(
    images: Sequence[Path | np.ndarray], photos: int, views: int, magnification: float, patch_size: int = 32, seed: int = 0,
    noise: float = 0.0, jpeg: int | None = None, min_side: float = 0.0, shading: float = 0.0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Patches of positive pairs (:func:`match_frames`) between photos and their synthetic views.

    ``photos`` images are drawn with ``seed`` (unreadable ones are skipped and replaced),
    each downscaled to ``PAIR_SETTINGS["max_side"]``, and given ``views`` views.

    Args:
        images: paths or (H, W, 3) RGB / (H, W) grey uint8 arrays.
        magnification: patch side in units of ``KeyPoint.size``, the model's.
        noise, jpeg, shading: the views' sensor noise, JPEG compression and shading (:func:`.magnification.synthetic_view`).
        min_side: smallest patch side in pixels, the model's (:func:`exemplar_desc.patches.keypoint_frames`).

    Yields:
        Per view, two (K, 1, P, P) float32 standardised patch batches: the photo's and the view's.
    """
    rng = np.random.default_rng(seed)
    sift = cv2.SIFT_create(nfeatures=PAIR_SETTINGS["keypoints_per_image"])
    order = iter(rng.permutation(len(images)))
    for _ in tqdm(range(min(photos, len(images))), desc="positive pairs", unit="photo", leave=False):
        gray = next((g for g in (read_gray(images[k]) for k in order) if g is not None), None)
        if gray is None:
            return
        gray = downscale(gray, PAIR_SETTINGS["max_side"])
        xy0, frames0 = _keypoint_frames(sift, gray, magnification, min_side)
        pyramid = build_pyramid(gray.astype(np.float32) / 255)
        for _ in range(views):
            view, hom = synthetic_view(gray, rng, light=True, noise=noise, jpeg=jpeg, shading=shading)
            xy1, frames1 = _keypoint_frames(sift, view, magnification, min_side)
            pairs = match_frames((xy0, xy1), (frames0, frames1), hom)
            if len(pairs):
                yield (
                    normalize_patches(extract_patches(pyramid, xy0[pairs[:, 0]], frames0[pairs[:, 0]], patch_size)),
                    normalize_patches(extract_patches(
                        build_pyramid(view.astype(np.float32) / 255), xy1[pairs[:, 1]], frames1[pairs[:, 1]], patch_size)),
                )


def configured_pairs(
    images: Sequence[Path | np.ndarray], magnification: float, cfg: "TrainConfig", seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`warped_pairs` with the run's pair settings (``pair_photos``, ``pair_views``,
    ``pair_noise``, ``pair_jpeg``, ``pair_shading``, ``patch_size``, ``min_patch_side``), drawn with ``seed``."""
    return warped_pairs(images, cfg.pair_photos, cfg.pair_views, magnification, cfg.patch_size, seed, cfg.pair_noise, cfg.pair_jpeg,
                        cfg.min_patch_side, cfg.pair_shading)
