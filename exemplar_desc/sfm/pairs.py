"""Which image pairs to match: every pair, or each image with its next K (ordered captures).

``pairs.txt`` holds one pair per line, ``name0 name1`` (hloc's and COLMAP's format).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Sequence

__all__ = ["parse_pairs_spec", "make_pairs", "write_pairs"]


def parse_pairs_spec(spec: str) -> int | None:
    """Parse ``"exhaustive"`` or ``"sequential:K"``.

    Returns:
        None for exhaustive, else the window K >= 1.

    Raises:
        ValueError: any other string.
    """
    if spec == "exhaustive":
        return None
    kind, _, window = spec.partition(":")
    if kind == "sequential" and window.isdigit() and int(window) >= 1:
        return int(window)
    raise ValueError(f"--pairs must be 'exhaustive' or 'sequential:K' with K >= 1, got {spec!r}")


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
    """Write ``pairs.txt``: one ``name0 name1`` line per pair."""
    for a, b in pairs:
        if " " in a or " " in b:
            raise ValueError(f"image names with spaces cannot go into a pairs file: {a!r}, {b!r}")
    Path(path).write_text("".join(f"{a} {b}\n" for a, b in pairs))
