"""Nearest-neighbour matching of descriptors by Euclidean distance, batched in torch.

One matcher serves the benchmark, the magnification tuning, the match viewer and SfM:
:func:`match_descriptors` on tensors (CPU or GPU), and two numpy conveniences on top of it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["match_descriptors", "nearest_neighbours", "mutual_nearest_neighbours"]


def match_descriptors(
    desc0: torch.Tensor,
    desc1: torch.Tensor,
    ratio: float | None = None,
    mutual: bool = True,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest neighbours of ``desc0``'s rows among ``desc1``'s, by Euclidean distance.

    Distances are computed ``chunk`` rows of ``desc0`` at a time, so memory stays at
    ``chunk x N1`` values whatever N0. Floating inputs are compared in their own precision,
    at least float32 (float64 stays float64).

    Args:
        desc0: (N0, D) float descriptors of image 0 (any device).
        desc1: (N1, D) float descriptors of image 1, same device and D.
        ratio: keep a match only if its distance is below ``ratio`` times the distance to
            the second nearest neighbour (Lowe's test); None disables it.
        mutual: keep only matches that are also image 1's nearest neighbour in image 0.
        chunk: rows of ``desc0`` per batch.

    Returns:
        ``matches0`` (N0,) int64, index into ``desc1`` or -1; ``distances0`` (N0,) Euclidean
        distance of the matched pair, +inf where unmatched. On ``desc0``'s device.

    Raises:
        ValueError: shapes or devices that do not fit together, or ``ratio`` outside (0, 1].
    """
    if desc0.ndim != 2 or desc1.ndim != 2 or desc0.shape[1] != desc1.shape[1]:
        raise ValueError(f"descriptors must be (N0, D) and (N1, D); got {tuple(desc0.shape)} and {tuple(desc1.shape)}")
    if desc0.device != desc1.device:
        raise ValueError(f"descriptors must be on one device; got {desc0.device} and {desc1.device}")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    n0, n1 = desc0.shape[0], desc1.shape[0]
    device = desc0.device
    dtype = torch.promote_types(torch.promote_types(desc0.dtype, desc1.dtype), torch.float32)
    matches0 = torch.full((n0,), -1, dtype=torch.long, device=device)
    dist0 = torch.full((n0,), float("inf"), dtype=dtype, device=device)
    if n0 == 0 or n1 == 0 or (ratio is not None and n1 < 2):
        return matches0, dist0
    d0, d1 = desc0.to(dtype), desc1.to(dtype)
    sq1 = (d1 * d1).sum(1)
    best_sq1 = torch.full((n1,), float("inf"), dtype=dtype, device=device)  # image 1's best so far
    best_idx1 = torch.zeros(n1, dtype=torch.long, device=device)
    k = 2 if ratio is not None else 1
    for start in range(0, n0, chunk):
        block = d0[start : start + chunk]
        sq = ((block * block).sum(1)[:, None] + sq1[None] - 2.0 * block @ d1.T).clamp_min(0.0)  # (c, N1)
        top_sq, top_idx = sq.topk(k, dim=1, largest=False)
        keep = torch.ones(sq.shape[0], dtype=torch.bool, device=device)
        if ratio is not None:
            keep = top_sq[:, 0].sqrt() < ratio * top_sq[:, 1].sqrt()
        rows = slice(start, start + sq.shape[0])
        matches0[rows] = torch.where(keep, top_idx[:, 0], -1)
        dist0[rows] = torch.where(keep, top_sq[:, 0].sqrt(), float("inf"))
        col_sq, col_idx = sq.min(dim=0)
        better = col_sq < best_sq1
        best_sq1 = torch.where(better, col_sq, best_sq1)
        best_idx1 = torch.where(better, col_idx + start, best_idx1)
    if mutual:
        back = best_idx1[matches0.clamp_min(0)]
        reject = (matches0 >= 0) & (back != torch.arange(n0, device=device))
        matches0[reject] = -1
        dist0[reject] = float("inf")
    return matches0, dist0


def _as_tensor(desc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(desc, dtype=np.float64))


def nearest_neighbours(desc1: np.ndarray, desc2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``desc1`` (N1, D), its nearest row of ``desc2`` (N2, D), in float64.

    Returns:
        (N1,) int indices into ``desc2`` and (N1,) float64 Euclidean distances (empty if
        either side is empty).
    """
    if len(desc1) == 0 or len(desc2) == 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    matches, dist = match_descriptors(_as_tensor(desc1), _as_tensor(desc2), mutual=False)
    return matches.numpy(), dist.numpy()


def mutual_nearest_neighbours(
    desc1: np.ndarray, desc2: np.ndarray, ratio: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) where j is i's nearest neighbour and i is j's, in float64.

    Args:
        desc1, desc2: (N1, D), (N2, D) descriptors.
        ratio: also apply Lowe's ratio test from ``desc1``'s side (see
            :func:`match_descriptors`); None: mutual nearest neighbours only.

    Returns:
        (M, 2) int index pairs and (M,) float64 distances.
    """
    if len(desc1) == 0 or len(desc2) == 0:
        return np.zeros((0, 2), dtype=int), np.zeros(0)
    matches, dist = match_descriptors(_as_tensor(desc1), _as_tensor(desc2), ratio=ratio)
    i = np.nonzero(matches.numpy() >= 0)[0]
    return np.stack([i, matches.numpy()[i]], axis=1), dist.numpy()[i]
