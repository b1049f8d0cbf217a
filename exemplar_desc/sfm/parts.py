"""Merging the part files that the ranks of a distributed run write into one HDF5 file.

Each rank of ``torchrun ... -m exemplar_desc.sfm`` writes ``features.h5`` or ``matches.h5``
for its share of the images or pairs; :func:`merge_parts` puts them together into the
file one process writes for all of them: the same groups, datasets and attributes, and
the same root attributes, ``complete`` included (False while written, True once
finished; the file is written to a temporary sibling and moved into place in one step).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from ..atomic import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["merge_parts"]


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and np.array_equal(a, b)


def merge_parts(parts: Sequence[str | Path], out_path: str | Path, keys: Sequence[str]) -> None:
    """Copy the objects named by ``keys`` from complete part files into one file, in that order.

    Args:
        parts: HDF5 files whose root attribute ``complete`` is True and whose other root
            attributes are equal (e.g. ``format`` and the extraction settings); they become
            the merged file's.
        out_path: the merged file (replaced atomically).
        keys: paths of the objects to copy (``"img.jpg"``, ``"dir/img.jpg"``,
            ``"a.jpg/b.jpg"``), each held by exactly one part; a group is copied with its
            datasets, subgroups and attributes; groups above it are created as needed.

    Raises:
        ValueError: a part is incomplete, or its root attributes differ from the first
            part's, or a key is held by no part or by several.
    """
    if not parts:
        raise ValueError("no part files to merge")
    with ExitStack() as stack:
        files = [stack.enter_context(h5py.File(part, "r")) for part in parts]
        attrs = [dict(f.attrs) for f in files]
        for part, part_attrs in zip(parts, attrs):
            if not _same(part_attrs.get("complete"), np.True_):
                raise ValueError(f"{part} is incomplete (its writer was interrupted or failed); it cannot be merged")
            if part_attrs.keys() != attrs[0].keys() or not all(_same(v, attrs[0][k]) for k, v in part_attrs.items()):
                raise ValueError(f"{part} and {parts[0]} were written with different settings: {part_attrs} vs {attrs[0]}")
        sources = []
        for key in keys:
            holders = [f for f in files if key in f]
            if len(holders) != 1:
                raise ValueError(f"{key!r} is in {len(holders)} of the part files {[str(p) for p in parts]}; expected one")
            sources.append(holders[0])

        def write(tmp: str) -> None:
            with h5py.File(tmp, "w") as out:
                out.attrs.update({**attrs[0], "complete": False})
                for key, source in zip(keys, sources):
                    source.copy(source[key], out, name=key)
                out.attrs["complete"] = True

        atomic_write(out_path, write)
    logger.info("merged %d objects of %d part files into %s", len(keys), len(parts), out_path)
