"""Mutual nearest-neighbour matching of descriptors, batched in torch, into hloc's match file.

Layout of ``matches.h5``: one group per pair named by :func:`pair_key`, holding
``matches0`` (N0,) int32 (index into image 1's keypoints, -1 = unmatched) and
``matching_scores0`` (N0,) float32 (cosine similarity of the matched descriptors, 0 where
unmatched), as hloc's nearest-neighbour matcher writes them. The file is written to a
temporary sibling (``.<name>.*.tmp``) and moved into place once complete.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["MATCHES_FORMAT", "pair_key", "match_descriptors", "match_pairs"]

MATCHES_FORMAT = "exemplar_desc.sfm.matches/1"


def pair_key(name0: str, name1: str) -> str:
    """HDF5 group of a pair in hloc's match files: ``name0.replace('/', '-') + '/' + name1.replace('/', '-')``."""
    return name0.replace("/", "-") + "/" + name1.replace("/", "-")


def match_descriptors(
    desc0: torch.Tensor,
    desc1: torch.Tensor,
    ratio: float | None = None,
    mutual: bool = True,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour matching by Euclidean distance of L2-normalised descriptors.

    Similarities are computed ``chunk`` rows of ``desc0`` at a time, so memory stays at
    ``chunk x N1`` values whatever N0.

    Args:
        desc0: (N0, D) float descriptors of image 0 (normalised here; any device).
        desc1: (N1, D) float descriptors of image 1, same device and D.
        ratio: keep a match only if its distance is below ``ratio`` times the distance to
            the second nearest neighbour (Lowe's test); None disables it.
        mutual: keep only matches that are also image 1's nearest neighbour in image 0.
        chunk: rows of ``desc0`` per batch.

    Returns:
        ``matches0`` (N0,) int64, index into ``desc1`` or -1; ``scores0`` (N0,) float32
        cosine similarity of the matched pair, 0 where unmatched. On ``desc0``'s device.
    """
    if desc0.ndim != 2 or desc1.ndim != 2 or desc0.shape[1] != desc1.shape[1]:
        raise ValueError(f"descriptors must be (N0, D) and (N1, D); got {tuple(desc0.shape)} and {tuple(desc1.shape)}")
    n0, n1 = desc0.shape[0], desc1.shape[0]
    device = desc0.device
    matches0 = torch.full((n0,), -1, dtype=torch.long, device=device)
    scores0 = torch.zeros(n0, dtype=torch.float32, device=device)
    if n0 == 0 or n1 == 0 or (ratio is not None and n1 < 2):
        return matches0, scores0
    d0 = torch.nn.functional.normalize(desc0.float(), dim=1)
    d1 = torch.nn.functional.normalize(desc1.float(), dim=1)
    best_sim1 = torch.full((n1,), -2.0, device=device)  # image 1's best similarity to image 0 so far
    best_idx1 = torch.zeros(n1, dtype=torch.long, device=device)
    for start in range(0, n0, chunk):
        sim = d0[start : start + chunk] @ d1.T  # (c, N1)
        k = 2 if ratio is not None else 1
        top_sim, top_idx = sim.topk(k, dim=1)
        keep = torch.ones(sim.shape[0], dtype=torch.bool, device=device)
        if ratio is not None:
            # For unit vectors, squared distance = 2 - 2 * similarity.
            dist = (2.0 - 2.0 * top_sim).clamp_min(0.0).sqrt()
            keep = dist[:, 0] < ratio * dist[:, 1]
        rows = torch.arange(start, start + sim.shape[0], device=device)
        matches0[rows] = torch.where(keep, top_idx[:, 0], -1)
        scores0[rows] = torch.where(keep, top_sim[:, 0], 0.0)
        col_sim, col_idx = sim.max(dim=0)
        better = col_sim > best_sim1
        best_sim1 = torch.where(better, col_sim, best_sim1)
        best_idx1 = torch.where(better, col_idx + start, best_idx1)
    if mutual:
        valid = matches0 >= 0
        back = best_idx1[matches0.clamp_min(0)]
        reject = valid & (back != torch.arange(n0, device=device))
        matches0[reject] = -1
        scores0[reject] = 0.0
    return matches0, scores0


def match_pairs(
    features_path: str | Path,
    pairs: Sequence[tuple[str, str]],
    matches_path: str | Path,
    ratio: float | None = None,
    mutual: bool = True,
    device: str = "cpu",
) -> dict[tuple[str, str], int]:
    """Match every pair's descriptors from an hloc feature file into an hloc match file.

    Each image's descriptors are moved to ``device`` once and kept there while used.

    Args:
        features_path: hloc-layout ``features.h5`` (descriptors (D, N)).
        pairs: (name0, name1) image names.
        matches_path: output ``matches.h5`` (replaced atomically).
        ratio, mutual: see :func:`match_descriptors`.
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.

    Returns:
        (name0, name1) -> number of matches.
    """
    counts: dict[tuple[str, str], int] = {}
    cache: dict[str, torch.Tensor] = {}
    last_use = {name: i for i, pair in enumerate(pairs) for name in pair}

    def write(tmp: str) -> None:
        with h5py.File(features_path, "r") as feats, h5py.File(tmp, "w") as out:
            out.attrs.update({"format": MATCHES_FORMAT, "complete": False, "ratio": ratio or 0.0, "mutual": mutual})
            for i, (name0, name1) in enumerate(tqdm(pairs, desc="matching", unit="pair")):
                for name in (name0, name1):
                    if name not in cache:
                        desc = torch.from_numpy(feats[name]["descriptors"][()].T.copy())
                        cache[name] = desc.to(device)
                m0, s0 = match_descriptors(cache[name0], cache[name1], ratio=ratio, mutual=mutual)
                group = out.require_group(pair_key(name0, name1))
                group.create_dataset("matches0", data=m0.cpu().numpy().astype(np.int32))
                group.create_dataset("matching_scores0", data=s0.cpu().numpy().astype(np.float32))
                counts[(name0, name1)] = int((m0 >= 0).sum())
                for name in (name0, name1):
                    if last_use[name] == i:
                        del cache[name]
            out.attrs["complete"] = True

    atomic_write(matches_path, write)
    return counts
