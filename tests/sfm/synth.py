"""Synthetic photos for the SfM tests: crops of one random texture, shifted."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def texture(height: int = 420, width: int = 560, seed: int = 0) -> np.ndarray:
    """(H, W) uint8 texture with blobs at several scales (plenty of DoG keypoints)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width), np.float32)
    for sigma in (1.5, 4.0, 10.0):
        out += cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), sigma) * sigma
    out -= out.min()
    return (255 * out / out.max()).astype(np.uint8)


def write_views(folder: Path, names: list[str], shift: int = 24, seed: int = 0, size: tuple[int, int] = (300, 400)) -> list[Path]:
    """Write crops of one texture, each shifted by ``shift`` pixels from the previous one."""
    base = texture(size[0] + shift * len(names), size[1] + shift * len(names), seed)
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), base[i * shift : i * shift + size[0], i * shift : i * shift + size[1]])
        paths.append(path)
    return paths
