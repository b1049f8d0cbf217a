"""The photos of an adaptation run: named, fingerprinted, and split into training and held-out photos.

The adaptation command (:mod:`exemplar_desc.adapt`) trains on some of a user's photos and
measures the gain on the others. A photo is named by its path relative to the deepest
folder holding all of them (``/`` separators), so the names, the split and the
fingerprint do not depend on the working folder. The split is drawn from a seed over the
sorted names: the same photos and seed give the same split on every machine.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..checks import check, check_number
from ..images import gather_images

__all__ = ["MIN_HELD_OUT", "MIN_TRAINING_PHOTOS", "FINGERPRINT", "PhotoSet", "collect_photos", "held_out_count",
           "photos_needed", "split_photos"]

#: Held-out photos at least: one sequence of each of the six kinds of change the validation
#: generator makes (benchmarks.validation.VALIDATION_KINDS).
MIN_HELD_OUT = 6
#: Training photos at least: up to 40 seed patches each, so 6 give the 128 distinct classes
#: a triplet batch of 256 takes.
MIN_TRAINING_PHOTOS = 6
#: How :meth:`PhotoSet.fingerprint` is computed, as the model card states it.
FINGERPRINT = "sha256 of one line 'NAME<TAB>SIZE' per photo, sorted by NAME, each ending in a newline (NAME: the path " \
              "relative to the photos' common folder, / separators; SIZE: the file's size in bytes)"


@dataclass(frozen=True)
class PhotoSet:
    """Photos named by their paths relative to their common folder.

    Attributes:
        root: the deepest folder holding every photo (absolute).
        photos: name (relative to ``root``, ``/`` separators) -> the path as it was given, sorted by name.
    """

    root: Path
    photos: dict[str, Path]

    @property
    def names(self) -> list[str]:
        """The sorted names."""
        return list(self.photos)

    def fingerprint(self) -> str:
        """Hex sha256 of the names and file sizes (:data:`FINGERPRINT`): it identifies the set without reading the photos."""
        lines = "".join(f"{name}\t{path.stat().st_size}\n" for name, path in self.photos.items())
        return hashlib.sha256(lines.encode()).hexdigest()


def collect_photos(entries: Sequence[str | os.PathLike]) -> PhotoSet:
    """The photos that folders (searched recursively) and image files name, each once.

    Raises:
        FileNotFoundError, ValueError: as :func:`exemplar_desc.images.gather_images`.
    """
    given: dict[str, Path] = {}
    for path in gather_images(entries):
        given.setdefault(os.path.abspath(path), path)  # a photo named twice counts once
    if len(given) == 1:
        root = Path(next(iter(given))).parent
    else:
        root = Path(os.path.commonpath(list(given)))
    named = {Path(absolute).relative_to(root).as_posix(): path for absolute, path in given.items()}
    return PhotoSet(root, dict(sorted(named.items())))


def held_out_count(total: int, fraction: float) -> int:
    """Photos held out of ``total``: ``fraction`` of them rounded half up, at least :data:`MIN_HELD_OUT`."""
    return max(MIN_HELD_OUT, math.floor(fraction * total + 0.5))


def photos_needed(fraction: float) -> int:
    """The fewest photos that leave :data:`MIN_TRAINING_PHOTOS` after :func:`held_out_count` are held out."""
    total = MIN_HELD_OUT + MIN_TRAINING_PHOTOS
    while total - held_out_count(total, fraction) < MIN_TRAINING_PHOTOS:
        total += 1
    return total


def split_photos(names: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split sorted photo names into training and held-out photos.

    Args:
        names: the photos' names, sorted (:attr:`PhotoSet.names`).
        fraction: the share held out, in (0, 0.5] (:func:`held_out_count`).
        seed: the generator's seed (``numpy.random.default_rng``): which photos are held out.

    Returns:
        (training names, held-out names), each in the given order.

    Raises:
        OptionError: ``hold_out`` (the fraction) out of range, ``hold_out_seed`` negative,
            ``photos``: fewer than :func:`photos_needed`; the message says how many are needed.
    """
    check_number("hold_out", fraction, low=0, low_open=True, high=0.5)
    check_number("hold_out_seed", seed, low=0, integer=True)
    needed = photos_needed(fraction)
    held = held_out_count(max(len(names), needed), fraction)
    check(len(names) >= needed, "photos", f"{len(names)} photos",
          f"an adaptation needs at least {needed} photos: {held} held out to measure the gain on (one sequence per "
          f"kind of change at least) and {needed - held} to train on")
    chosen = set(np.random.default_rng(seed).choice(len(names), held_out_count(len(names), fraction), replace=False).tolist())
    return [n for i, n in enumerate(names) if i not in chosen], [n for i, n in enumerate(names) if i in chosen]
