"""Nearest-neighbour matching of descriptors by Euclidean distance (numpy, in memory)."""

from __future__ import annotations

import numpy as np

__all__ = ["nearest_neighbours", "mutual_nearest_neighbours"]


def _squared_distances(desc1: np.ndarray, desc2: np.ndarray) -> np.ndarray:
    d1, d2 = np.asarray(desc1, np.float64), np.asarray(desc2, np.float64)
    return np.maximum((d1**2).sum(1)[:, None] + (d2**2).sum(1)[None] - 2.0 * d1 @ d2.T, 0.0)


def nearest_neighbours(desc1: np.ndarray, desc2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``desc1`` (N1, D), its nearest row of ``desc2`` (N2, D).

    Returns:
        (N1,) int indices into ``desc2`` and (N1,) float64 Euclidean distances.
    """
    if len(desc1) == 0 or len(desc2) == 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    d2 = _squared_distances(desc1, desc2)
    nn = d2.argmin(axis=1)
    return nn, np.sqrt(d2[np.arange(len(nn)), nn])


def mutual_nearest_neighbours(desc1: np.ndarray, desc2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) where j is i's nearest neighbour and i is j's.

    Returns:
        (M, 2) int index pairs and (M,) float64 distances.
    """
    if len(desc1) == 0 or len(desc2) == 0:
        return np.zeros((0, 2), dtype=int), np.zeros(0)
    d2 = _squared_distances(desc1, desc2)
    nn12, nn21 = d2.argmin(axis=1), d2.argmin(axis=0)
    i = np.nonzero(nn21[nn12] == np.arange(len(nn12)))[0]
    return np.stack([i, nn12[i]], axis=1), np.sqrt(d2[i, nn12[i]])
