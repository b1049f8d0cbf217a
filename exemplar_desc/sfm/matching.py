"""Matching the image pairs of an hloc feature file into hloc's match file.

Descriptors are L2-normalised and matched by :func:`exemplar_desc.matching.match_descriptors`
(Euclidean distance, so the same ranking as cosine similarity).

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

from ..atomic import atomic_write
from ..matching import match_descriptors

logger = logging.getLogger(__name__)

__all__ = ["MATCHES_FORMAT", "pair_key", "match_pairs"]

MATCHES_FORMAT = "exemplar_desc.sfm.matches/1"


def pair_key(name0: str, name1: str) -> str:
    """HDF5 group of a pair in hloc's match files: ``name0.replace('/', '-') + '/' + name1.replace('/', '-')``."""
    return name0.replace("/", "-") + "/" + name1.replace("/", "-")


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
        pairs: (name0, name1) image names, any of those of ``features_path``: a rank of a
            distributed run matches its share of a run's pairs into a part file, and
            :func:`.parts.merge_parts` puts the parts together.
        matches_path: output ``matches.h5`` (replaced atomically), holding ``pairs`` only.
        ratio, mutual: see :func:`exemplar_desc.matching.match_descriptors`.
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
                        cache[name] = torch.nn.functional.normalize(desc.to(device).float(), dim=1)
                m0, dist0 = match_descriptors(cache[name0], cache[name1], ratio=ratio, mutual=mutual)
                # For unit vectors, cosine similarity = 1 - squared distance / 2.
                s0 = torch.where(m0 >= 0, 1.0 - dist0.square() / 2.0, 0.0)
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
