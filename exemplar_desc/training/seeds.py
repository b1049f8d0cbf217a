"""Unlabeled training images and seed patches for the surrogate classes.

Seeds are sampled as in the paper: with probability proportional to the local gradient
energy, at several image scales (0.8^k), not overlapping each other too much. Each seed is
stored as a larger context crop (RGB, uint8) around it, so random translations, zooms and
rotations of the seed can be sampled later without running out of image.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from ..images import gather_images

if TYPE_CHECKING:  # config.py imports this module
    from .config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "iter_rgb_images", "stl10_image_count", "load_stl10_unlabeled", "seed_candidates", "sample_seeds", "SeedPool", "seed_pool",
    "STL10_IMAGE_BYTES", "PAPER_SEED_SCALES",
]

STL10_IMAGE_BYTES = 96 * 96 * 3
#: Image scales the paper takes seeds at (0.8^k).
PAPER_SEED_SCALES = (1.0, 0.8, 0.64, 0.512)


def iter_rgb_images(paths: Sequence[Path], max_side: int) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 RGB images, downscaled (area) so the longer side is at most ``max_side``.

    Unreadable files are skipped; one warning at the end names how many and the first few.
    """
    unreadable: list[str] = []
    for path in paths:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            unreadable.append(str(path))
            continue
        factor = max_side / max(bgr.shape[:2])
        if factor < 1:
            bgr = cv2.resize(bgr, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if unreadable:
        logger.warning(
            "skipped %d unreadable image file(s) of %d: %s%s",
            len(unreadable),
            len(paths),
            ", ".join(unreadable[:3]),
            " ..." if len(unreadable) > 3 else "",
        )


def stl10_image_count(path: str | os.PathLike) -> int:
    """Number of images in an STL-10 binary, from its size (the file is not read).

    Raises:
        FileNotFoundError: missing file. ValueError: size not a positive multiple of 96*96*3 bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError("no such file")
    size = path.stat().st_size
    if size == 0 or size % STL10_IMAGE_BYTES:
        raise ValueError(f"not an STL-10 binary: {size} bytes is not a positive multiple of 96*96*3 = {STL10_IMAGE_BYTES}")
    return size // STL10_IMAGE_BYTES


def load_stl10_unlabeled(path: str | os.PathLike, max_images: int | None = None) -> np.ndarray:
    """Read STL-10's ``unlabeled_X.bin``: 96x96x3 uint8 images stored column-major per channel.

    Returns:
        (N, 96, 96, 3) uint8 RGB array (memory-mapped, rows first).

    Raises:
        FileNotFoundError: missing file. ValueError: size not a whole number of images.
    """
    try:
        stl10_image_count(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"STL-10 file {path}: {err}") from None
    data = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
    if max_images is not None:
        data = data[:max_images]
    return np.transpose(data, (0, 3, 2, 1))  # column-major (C, W, H) -> (H, W, C)


def _gradient_energy(gray: np.ndarray, patch_size: int) -> np.ndarray:
    """Sum of squared gradient magnitudes over the patch_size window centred on each pixel."""
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.boxFilter(gx * gx + gy * gy, -1, (patch_size, patch_size), normalize=False)


def seed_candidates(
    images: Iterator[np.ndarray] | Sequence[np.ndarray],
    rng: np.random.Generator,
    per_image: int,
    patch_size: int = 32,
    context: int = 80,
    scales: Sequence[float] = PAPER_SEED_SCALES,
    total: int | None = None,
) -> list[np.ndarray]:
    """Every usable seed candidate of the images, as its context crop (see :func:`sample_seeds` for the arguments).

    Returns:
        (context, context, 3) uint8 RGB crops, image by image.
    """
    crops: list[np.ndarray] = []
    half, pad = patch_size // 2, context // 2
    for image in tqdm(images, total=total, desc="seed patches", unit="img", leave=False):
        centres: list[tuple[float, float, float]] = []  # (x, y, scale) in original pixels
        for k, scale in enumerate(scales):
            quota = per_image // len(scales) + (k < per_image % len(scales))
            scaled = image if scale == 1 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            h, w = scaled.shape[:2]
            if min(h, w) <= patch_size or quota == 0:
                continue
            energy = _gradient_energy(cv2.cvtColor(scaled, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255, patch_size)
            energy[:half], energy[h - half :], energy[:, :half], energy[:, w - half :] = 0, 0, 0, 0
            flat = np.maximum(energy.ravel().astype(np.float64), 0.0)  # box filter rounding can go below 0
            if flat.sum() <= 0:
                continue
            candidates = rng.choice(flat.size, size=min(quota * 4, int(np.count_nonzero(flat))), replace=False, p=flat / flat.sum())
            padded = cv2.copyMakeBorder(scaled, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
            taken = 0
            for index in candidates:
                y, x = divmod(int(index), w)
                ox, oy = x / scale, y / scale
                # Near-duplicates: a seed within half a patch of another at a similar scale.
                if any(
                    (ox - cx) ** 2 + (oy - cy) ** 2 < (half / min(scale, cs)) ** 2 and max(scale, cs) / min(scale, cs) < 1.3
                    for cx, cy, cs in centres
                ):
                    continue
                centres.append((ox, oy, scale))
                crops.append(padded[y : y + context, x : x + context])
                taken += 1
                if taken == quota:
                    break
    return crops


def sample_seeds(
    images: Iterator[np.ndarray] | Sequence[np.ndarray],
    num_seeds: int,
    rng: np.random.Generator,
    per_image: int,
    patch_size: int = 32,
    context: int = 80,
    scales: Sequence[float] = PAPER_SEED_SCALES,
    total: int | None = None,
) -> torch.Tensor:
    """Sample seed patches and return their context crops.

    Args:
        images: (H, W, 3) uint8 RGB images.
        num_seeds: how many seeds to return (chosen at random among all candidates).
        rng: numpy random generator (reproducibility).
        per_image: candidates taken from each image, spread over the scales.
        patch_size: seed side in pixels at its scale; seeds keep patch_size/2 from the border.
        context: side of the stored crop (reflect-padded where it leaves the image).
        scales: image scale factors at which seeds are taken (the candidates are split evenly
            among them); a seed at scale s covers patch_size / s pixels of the image.
        total: number of images, for the progress bar only.

    Returns:
        (num_seeds, 3, context, context) uint8 tensor, RGB.

    Raises:
        ValueError: fewer usable seeds than ``num_seeds``.
    """
    return _choose(seed_candidates(images, rng, per_image, patch_size, context, scales, total), num_seeds, rng)


def _choose(crops: list[np.ndarray], num_seeds: int, rng: np.random.Generator) -> torch.Tensor:
    """(num_seeds, 3, context, context) uint8 crops chosen at random with ``rng``, in the candidates' order."""
    if len(crops) < num_seeds:
        raise ValueError(
            f"found only {len(crops)} usable seed patches for {num_seeds} surrogate classes; "
            "use fewer classes, more images, or more seeds per image"
        )
    chosen = rng.choice(len(crops), size=num_seeds, replace=False)
    stacked = np.stack([crops[i] for i in sorted(chosen)])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def _rgb_images(cfg: TrainConfig) -> tuple[Iterator[np.ndarray], int]:
    """(H, W, 3) uint8 RGB images of a checked ``cfg``'s image folders and files, then its STL-10 file, and how many."""
    sources: list[tuple[Iterator[np.ndarray], int]] = []
    if cfg.images:
        paths = gather_images(cfg.images)
        sources.append((iter_rgb_images(paths, cfg.max_side), len(paths)))
    if cfg.stl10:
        stl = load_stl10_unlabeled(cfg.stl10, cfg.stl10_max_images)
        sources.append((iter(stl), len(stl)))

    def chained() -> Iterator[np.ndarray]:
        for iterator, _ in sources:
            yield from iterator

    return chained(), sum(n for _, n in sources)


@dataclass(frozen=True)
class SeedPool:
    """Every usable seed candidate of a run's training data, which the run's seeds are chosen from (:func:`seed_pool`).

    ``len(pool)`` is the most surrogate classes a run of that data can have.

    Attributes:
        crops: (context, context, 3) uint8 RGB crops, image by image (:func:`seed_candidates`).
        rng: the generator as drawing the candidates left it; every choice starts from this state.
    """

    crops: list[np.ndarray]
    rng: np.random.Generator

    def __len__(self) -> int:
        return len(self.crops)

    def choose(self, num: int) -> torch.Tensor:
        """The run's seeds: (num, 3, context, context) uint8 RGB crops, the same on every call.

        Raises:
            ValueError: fewer candidates than ``num``.
        """
        return _choose(self.crops, num, copy.deepcopy(self.rng))  # a copy, so a second choice repeats the first


def seed_pool(cfg: TrainConfig) -> SeedPool:
    """The seed candidates of a checked ``cfg``'s image folders and files and STL-10 file, drawn with ``cfg.seed``.

    ``seed_pool(cfg).choose(cfg.num_classes)`` are the run's seeds (what :func:`.loop.train` samples).
    """
    images, total = _rgb_images(cfg)
    rng = np.random.default_rng(cfg.seed)
    crops = seed_candidates(images, rng, cfg.seeds_per_image, cfg.patch_size, cfg.context, cfg.seed_scales, total)
    return SeedPool(crops, rng)
