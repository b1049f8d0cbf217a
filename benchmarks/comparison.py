"""Two descriptors side by side on the same sequences: the adaptation command's proof of gain.

:func:`score_descriptors` runs the matching benchmark (:func:`benchmarks.matching.run_benchmark`,
SIFT keypoints shared by both descriptors) and keeps three numbers per kind of change and
overall: mAP, MMA@3 and the homography accuracy averaged over 1/3/5/10 px ("H mean"), in
percent. :func:`is_better` is the one rule that decides whether an adapted model replaces
the model it was adapted from; :func:`format_comparison` prints both side by side.
"""

from __future__ import annotations

import math
from collections import Counter

from .datasets import KINDS, ImageSequence
from .matching import run_benchmark, summarise
from .metrics import MMA_THRESHOLDS

__all__ = ["SCORES", "DECISION_RULE", "score_descriptors", "is_better", "format_comparison"]

#: The numbers kept per kind and overall, in percent, and the benchmark's summary field of each.
SCORES = {"mAP": "mAP", "MMA@3": "MMA", "H mean": "H_mean"}
#: The rule of :func:`is_better`, as the report and the model card state it.
DECISION_RULE = ("the adapted model is written only if its mAP and its MMA@3 over all held-out pairs are both higher "
                 "than the base model's (in percent, as recorded: to 0.01); H mean and the kinds are reported, not decided on")


def _percent(summary: dict, field: str) -> float | None:
    """One score of a benchmark summary in percent, rounded to 0.01; None where undefined (no pair, no correct match)."""
    value = summary.get(field)
    if field == "MMA" and value is not None:
        value = value[MMA_THRESHOLDS.index(3)]
    if value is None or not math.isfinite(value):
        return None
    return round(100 * value, 2)


def _scores(summary: dict, sequences: int) -> dict:
    """{"mAP", "MMA@3", "H mean" (percent or None), "sequences", "pairs"} of a benchmark summary over ``sequences``."""
    return {**{name: _percent(summary, field) for name, field in SCORES.items()}, "sequences": sequences,
            "pairs": summary.get("num_pairs", 0)}


def _entry_scores(entry: dict) -> dict:
    """``{"per_kind": {kind: scores}, "overall": scores}`` of one descriptor's summarised benchmark entry."""
    counts = Counter(seq["kind"] for seq in entry["sequences"].values())
    per_kind = {kind: _scores(summary, counts[kind]) for kind, summary in entry["per_kind"].items()}
    return {"per_kind": per_kind, "overall": _scores(entry["summary"], len(entry["sequences"]))}


def score_descriptors(sequences: list[ImageSequence], descriptors: dict[str, object], num_features: int = 2000,
                      progress: bool = True) -> dict[str, dict]:
    """Score descriptors on the same SIFT keypoints of the sequences (correct match: within 3 px).

    Args:
        sequences: at least one.
        descriptors: name -> object with OpenCV's ``compute``.
        num_features: SIFT keypoints per image.
        progress: a progress bar on stderr.

    Returns:
        Per name: ``{"per_kind": {kind: scores}, "overall": scores}``, scores as ``{"mAP",
        "MMA@3", "H mean"}`` (percent; None where undefined) with the ``"sequences"`` and ``"pairs"`` they are over.

    Raises:
        RuntimeError: a descriptor failed on a sequence (the benchmark's errors, named).
    """
    results = summarise(run_benchmark(sequences, descriptors, num_features=num_features, progress=progress))
    if results["errors"]:
        raise RuntimeError("; ".join(f"{key}: {err}" for key, err in results["errors"].items()))
    return {name: _entry_scores(entry) for name, entry in results["descriptors"].items()}


def is_better(base: dict, adapted: dict) -> bool:
    """Whether ``adapted`` is better than ``base`` (:data:`DECISION_RULE`): higher overall mAP and MMA@3, both.

    Args:
        base, adapted: scores of :func:`score_descriptors` (``{"overall": {"mAP", "MMA@3", ...}, ...}``).
    """
    pairs = [(base["overall"][name], adapted["overall"][name]) for name in ("mAP", "MMA@3")]
    return all(before is not None and after is not None and after > before for before, after in pairs)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _change(before: float | None, after: float | None) -> str:
    return "-" if before is None or after is None else f"{after - before:+.1f}"


def format_comparison(base: dict, adapted: dict) -> str:
    """A console table: per kind and overall, the sequences, then base, adapted and change of each score (percent)."""
    kinds = [kind for kind in KINDS if kind in base["per_kind"]]
    header = ["", "seq", *[f"{name} {part}" for name in SCORES for part in ("base", "adapted", "change")]]
    rows = [header]
    for label, before, after in [*((k, base["per_kind"][k], adapted["per_kind"][k]) for k in kinds),
                                 ("overall", base["overall"], adapted["overall"])]:
        cells = [(_cell(before[n]), _cell(after[n]), _change(before[n], after[n])) for n in SCORES]
        rows.append([label, str(before["sequences"]), *[c for triple in cells for c in triple]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
