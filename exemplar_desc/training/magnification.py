"""Choosing the patch magnification on the training images, without labels.

The magnification m sets the patch side to m x KeyPoint.size. It is chosen by matching
SIFT keypoints between training images and synthetic warps of them (random homographies
and blur, so the ground truth is exact) and keeping the m with the best mean matching
accuracy at 3 pixels. No benchmark image is involved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..descriptor import describe_frames
from ..images import UnreadableImageError, decode_gray
from ..matching import mutual_nearest_neighbours
from ..networks import DescriptorNet
from ..patches import build_pyramid, keypoint_frames, keypoints_to_arrays

logger = logging.getLogger(__name__)

__all__ = ["random_homography", "shade", "synthetic_view", "downscale", "project", "read_gray", "tune_magnification", "CANDIDATES"]

CANDIDATES = (6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0)


def random_homography(width: int, height: int, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A random viewpoint-like homography (3, 3) float64 mapping image pixels (x, y) to warped pixels.

    Rotation up to 30 deg x strength, zoom in [0.7, 1.4], corner jitter up to 12% x strength,
    recentred so the image centre stays in view.
    """
    angle = np.deg2rad(rng.uniform(-30, 30) * strength)
    zoom = np.exp(rng.uniform(np.log(0.7), np.log(1.4)) * strength)
    cx, cy = width / 2, height / 2
    src = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    jitter = rng.uniform(-0.12, 0.12, (4, 2)) * strength * np.array([width, height])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * zoom
    dst = ((src - [cx, cy]) @ rot.T + [cx, cy] + jitter).astype(np.float32)
    return cv2.getPerspectiveTransform(src, dst).astype(np.float64)


def downscale(gray: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W) uint8 image shrunk (area interpolation) so that its longer side is at most ``max_side`` pixels."""
    factor = min(1.0, max_side / max(gray.shape))
    return cv2.resize(gray, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)


def shade(view: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """``view`` under a smooth shading and 0 to 2 soft cast shadows, applied in linear light.

    The shading is exp(s * f), f a random quadratic in x, y (normalised to [-1, 1] over the
    view) scaled to max |f| = 1, s uniform in [0, ``strength``]. Each shadow keeps a fraction
    uniform in [0.3, 0.8] of the light beyond a random line, with a logistic edge of scale
    uniform in [0.005, 0.05] (in those coordinates). The field multiplies (v / 255)^2.2.

    Args:
        view: (H, W) uint8 grey image.
        strength: largest log-gain of the shading, > 0.

    Returns:
        (H, W) uint8.
    """
    h, w = view.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = 2 * x / w - 1, 2 * y / h - 1
    c = rng.normal(0, 1, 5).astype(np.float32)
    f = c[0] * x + c[1] * y + c[2] * x * x + c[3] * y * y + c[4] * x * y
    f = f / (np.abs(f).max() + 1e-6)
    field = np.exp(rng.uniform(0, strength) * f)
    for _ in range(int(rng.integers(0, 3))):
        theta, offset = rng.uniform(0, 2 * np.pi), rng.uniform(-0.7, 0.7)
        softness = rng.uniform(0.005, 0.05)
        distance = np.cos(theta) * x + np.sin(theta) * y - offset
        factor = rng.uniform(0.3, 0.8)
        field = field * (1 - (1 - factor) / (1 + np.exp(-distance / softness)))
    linear = (view / 255.0) ** 2.2 * field
    return np.clip(255 * np.clip(linear, 0, 1) ** (1 / 2.2) + 0.5, 0, 255).astype(np.uint8)


def synthetic_view(
    gray: np.ndarray, rng: np.random.Generator, light: bool = False, noise: float = 0.0, jpeg: int | None = None,
    shading: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic second view of a photo whose ground truth is exact.

    A random homography (:func:`random_homography`), then a Gaussian blur of sigma drawn
    in [0, 2.5] pixels (none below 0.3); with ``light``, then a change of light: gamma in
    [1/1.5, 1.5] and gain in [0.6, 1.5], both log-uniform; then a shading and shadows of
    largest log-gain ``shading`` (:func:`shade`); then Gaussian sensor noise of
    sigma uniform in [0, ``noise``] grey levels, and JPEG compression at a quality uniform
    in [``jpeg``, 95]. Each step draws after the ones before, so the views without the
    later steps are those of the same ``rng`` state with them.

    Args:
        gray: (H, W) uint8 grey photo.
        noise: largest noise sigma in grey levels (of 255); 0: no noise.
        jpeg: lowest JPEG quality in [1, 95]; None: no compression.
        shading: largest log-gain of the shading; 0: neither shading nor shadows (nothing drawn).

    Returns:
        ((H, W) uint8 warped view, (3, 3) float64 homography mapping ``gray``'s pixels (x, y) to the view's).
    """
    h, w = gray.shape
    hom = random_homography(w, h, rng)
    warped = cv2.warpPerspective(cv2.GaussianBlur(gray, (0, 0), 0.7), hom, (w, h), flags=cv2.INTER_LINEAR)
    sigma = rng.uniform(0, 2.5)
    if sigma > 0.3:
        warped = cv2.GaussianBlur(warped, (0, 0), sigma)
    if light:
        gamma, gain = np.exp(rng.uniform(-np.log(1.5), np.log(1.5))), np.exp(rng.uniform(np.log(0.6), np.log(1.5)))
        warped = np.clip(255 * gain * (warped / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
    if shading > 0:
        warped = shade(warped, shading, rng)
    if noise > 0:
        sigma = rng.uniform(0, noise)
        warped = np.clip(warped + rng.normal(0, sigma, warped.shape) + 0.5, 0, 255).astype(np.uint8)
    if jpeg is not None:
        quality = int(rng.integers(jpeg, 96))
        warped = cv2.imdecode(cv2.imencode(".jpg", warped, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_GRAYSCALE)
    return warped, hom


def project(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N, 2) pixels (x, y) mapped by the (3, 3) homography ``h``; (N, 2) float64."""
    return cv2.perspectiveTransform(xy.reshape(-1, 1, 2).astype(np.float64), h).reshape(-1, 2)


def read_gray(image: Path | np.ndarray) -> np.ndarray | None:
    """(H, W) uint8 grey image of a path (None when unreadable) or of an RGB / grey uint8 array."""
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY))
    try:
        return decode_gray(Path(image).read_bytes(), str(image))
    except (OSError, UnreadableImageError):
        return None


def tune_magnification(
    net: DescriptorNet,
    images: Sequence[Path | np.ndarray],
    candidates: Sequence[float] = CANDIDATES,
    num_pairs: int = 12,
    num_keypoints: int = 1000,
    threshold: float = 3.0,
    seed: int = 0,
    max_side: int = 640,
    min_keypoints: int = 20,
    min_side: float = 0.0,
) -> tuple[float, dict]:
    """Pick the magnification with the best mean matching accuracy on synthetic warps.

    Args:
        net: trained descriptor network (eval mode).
        images: training images, as paths (unreadable ones are skipped) or arrays: (H, W, 3)
            RGB or (H, W) grey uint8, e.g. STL-10's 96x96 photos; ``num_pairs`` of them are drawn with ``seed``.
        candidates: magnifications to try.
        threshold: reprojection error in pixels for a correct match.
        min_keypoints: images (or warps) with fewer SIFT keypoints are skipped.
        min_side: smallest patch side in pixels (:func:`exemplar_desc.patches.keypoint_frames`), the model's.

    Returns:
        (best magnification, record with each candidate's accuracy and the settings used).
    """
    rng = np.random.default_rng(seed)
    sift = cv2.SIFT_create(nfeatures=num_keypoints)
    pairs = []
    for index in rng.permutation(len(images)):
        if len(pairs) == num_pairs:
            break
        gray = read_gray(images[index])
        if gray is None:
            continue
        gray = downscale(gray, max_side)
        warped, hom = synthetic_view(gray, rng)
        kps = [sift.detect(gray, None), sift.detect(warped, None)]
        if min(len(k) for k in kps) < min_keypoints:
            continue
        pyramids = [build_pyramid(img.astype(np.float32) / 255) for img in (gray, warped)]
        pairs.append((kps, pyramids, hom))
    if not pairs:
        raise ValueError(f"no usable training image for tuning the magnification (each needs {min_keypoints} SIFT keypoints)")
    scores = {}
    for m in candidates:
        accuracies = []
        for kps, pyramids, hom in pairs:
            descs, points = [], []
            for k, pyramid in zip(kps, pyramids):
                xy, size, angle = keypoints_to_arrays(k)
                descs.append(describe_frames(net, pyramid, xy, keypoint_frames(size, angle, m, min_side)))
                points.append(xy)
            matches, _ = mutual_nearest_neighbours(*descs)
            err = np.linalg.norm(project(hom, points[0][matches[:, 0]]) - points[1][matches[:, 1]], axis=1)
            accuracies.append(float((err <= threshold).mean()) if len(matches) else 0.0)
        scores[m] = float(np.mean(accuracies))
        logger.info("magnification %g: mean matching accuracy@%gpx %.3f", m, threshold, scores[m])
    best = max(scores, key=scores.get)
    record = {
        "method": "synthetic homography + blur warps of training images, SIFT keypoints, mutual NN",
        "pairs": len(pairs),
        "keypoints": num_keypoints,
        "threshold_px": threshold,
        "mma_by_magnification": {f"{m:g}": round(s, 4) for m, s in scores.items()},
    }
    return best, record
