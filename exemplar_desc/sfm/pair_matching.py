"""The image pairs of an SfM run matched from its ``features.h5`` into hloc's ``matches.h5``.

Descriptors are L2-normalised and matched by :func:`exemplar_desc.matching.match_descriptors`
(Euclidean distance, so the same ranking as cosine similarity). The layout of both files is
:mod:`exemplar_desc.formats.hloc`'s; the match file is written to a temporary sibling
(``.<name>.*.tmp``) and moved into place once complete.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import h5py
import torch
from tqdm import tqdm

from ..atomic import atomic_write
from ..formats.hloc import MATCHES_FORMAT, read_descriptors, write_matches
from ..matching import match_descriptors

logger = logging.getLogger(__name__)

__all__ = ["match_pairs"]


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
            :func:`exemplar_desc.formats.hloc.merge_parts` puts the parts together.
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
                        desc = torch.from_numpy(read_descriptors(feats, name).copy())
                        cache[name] = torch.nn.functional.normalize(desc.to(device).float(), dim=1)
                m0, dist0 = match_descriptors(cache[name0], cache[name1], ratio=ratio, mutual=mutual)
                # For unit vectors, cosine similarity = 1 - squared distance / 2.
                s0 = torch.where(m0 >= 0, 1.0 - dist0.square() / 2.0, 0.0)
                write_matches(out, name0, name1, m0.cpu().numpy(), s0.cpu().numpy())
                counts[(name0, name1)] = int((m0 >= 0).sum())
                for name in (name0, name1):
                    if last_use[name] == i:
                        del cache[name]
            out.attrs["complete"] = True

    atomic_write(matches_path, write)
    return counts
