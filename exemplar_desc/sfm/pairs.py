"""Which image pairs to match: every pair, or each image with its next K (ordered captures).

``pairs.txt`` holds one pair per line, ``name0 name1`` (hloc's and COLMAP's format).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Sequence

from ..checks import OptionError
from ..formats.hloc import pair_key

__all__ = ["parse_pairs_spec", "check_image_names", "make_pairs", "write_pairs"]


def parse_pairs_spec(spec: str) -> int | None:
    """Parse ``"exhaustive"`` or ``"sequential:K"``.

    Returns:
        None for exhaustive, else the window K >= 1.

    Raises:
        OptionError (a ValueError) naming ``pairs`` (the :class:`.pipeline.SfmSettings` field): any other value.
    """
    if spec == "exhaustive":
        return None
    kind, _, window = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind == "sequential" and window.isdigit() and int(window) >= 1:
        return int(window)
    raise OptionError("pairs", spec, "must be 'exhaustive' or 'sequential:K' with a whole K >= 1")


def check_image_names(names: Sequence[str]) -> None:
    """Check that image names can go into ``pairs.txt`` and hloc's ``matches.h5`` unambiguously.

    ``pairs.txt`` separates names by a space, and hloc names a pair's group by the names with
    ``/`` replaced by ``-`` (:func:`exemplar_desc.formats.hloc.pair_key`), so ``a-b.jpg`` and ``a/b.jpg`` would
    share groups.

    Raises:
        ValueError: a name with a space, or two names that collide; the message names them.
    """
    seen: dict[str, str] = {}
    for name in names:
        if " " in name:
            raise ValueError(f"image name {name!r} has a space, which a pairs file cannot hold; rename it")
        flat = pair_key(name, name).split("/")[0]
        if flat in seen and seen[flat] != name:
            raise ValueError(
                f"images {seen[flat]!r} and {name!r} both become {flat!r} in hloc's match file "
                "('/' is replaced by '-'); rename one of them"
            )
        seen[flat] = name


def make_pairs(names: Sequence[str], spec: str) -> list[tuple[str, str]]:
    """Image pairs to match, each once, ``name0`` before ``name1`` in ``names``' order.

    Args:
        names: image names in capture order (sequential pairing relies on it).
        spec: ``"exhaustive"`` or ``"sequential:K"`` (each image with the next K).
    """
    window = parse_pairs_spec(spec)
    if window is None:
        return list(combinations(names, 2))
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, min(i + 1 + window, len(names)))]


def write_pairs(path: str | Path, pairs: Sequence[tuple[str, str]]) -> None:
    """Write ``pairs.txt``: one ``name0 name1`` line per pair (names checked by :func:`check_image_names`)."""
    check_image_names(sorted({name for pair in pairs for name in pair}))
    Path(path).write_text("".join(f"{a} {b}\n" for a, b in pairs))
