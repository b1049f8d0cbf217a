"""Named training recipes: settings a run starts from (``python -m exemplar_desc.train --preset NAME``).

A preset sets :class:`.config.TrainConfig` fields and transformation families by name;
settings given explicitly (options on the command line, or ``overrides``) win over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Mapping

from ..model_io import DEFAULT_MODEL
from .config import TrainConfig
from .transforms import FAMILIES, TransformConfig

__all__ = ["Preset", "PRESETS", "ADAPT", "DISTILL"]


@dataclass(frozen=True)
class Preset:
    """A named recipe.

    Attributes:
        name: the recipe's name (the command line's ``--preset``).
        summary: one line for the command line's help.
        notes: where the recipe comes from and what it reproduces.
        settings: TrainConfig fields and transformation families (by name) and their values.
    """

    name: str
    summary: str
    notes: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def config(self, **overrides: Any) -> TrainConfig:
        """The TrainConfig of this recipe, with ``overrides`` (fields or families by name) on top."""
        values = {**self.settings, **overrides}
        unknown = set(values) - {f.name for f in fields(TrainConfig) if f.name != "transforms"} - set(FAMILIES)
        if unknown:
            raise ValueError(f"not a training setting: {', '.join(sorted(unknown))}")
        families = {name: values.pop(name) for name in FAMILIES if name in values}
        return TrainConfig(**values, transforms=replace(TransformConfig(), **families))


PAPER = Preset(
    "paper",
    "the paper's settings (the defaults)",
    """TrainConfig's defaults: Dosovitskiy et al., TPAMI 2016 (8000 surrogate classes, the
    paper's transformation ranges and SGD settings, seeds at four scales), with the fast
    architecture and a 128-D head.""",
)

FAST_T005 = Preset(
    "exemplar-fast-t005",
    "the last training stage of exemplar-fast-t005, the network the shipped default fine-tunes (fine-tunes exemplar-fast-t01)",
    """The recipe of ``exemplar-fast-t005``'s card (``training.command``), its last stage.

    ``exemplar-fast-t005`` was trained in three stages, each starting from the one before:
    ``exemplar-fast`` (from random weights, 8000 classes, translation 0.2), then
    ``exemplar-fast-t01`` (translation 0.1, 25 minutes) and ``exemplar-fast-t005``
    (translation 0.05, 70 minutes). Only the last stage is this preset: it starts from the
    shipped ``exemplar-fast-t01`` (``init``), so on the same photos (the card's
    ``training.data``: BSDS300, Urban100 and T91) one command repeats it. The earlier
    stages' commands are in their own cards. The time budget sets the run's length, so the
    number of steps depends on the machine: the shipped run made 13,495 steps of 256
    samples on one CPU thread (``num_threads`` 1, a machine setting the preset leaves alone).
    The shipped default, ``exemplar-fast-t005-shaded``, is this network fine-tuned further
    (``--loss distill+triplet --triplet-pairs photos``, each stage held near the one before:
    60 minutes to ``exemplar-fast-t005-dtp60``, then three stages of 45 minutes on shaded
    pairs), with a head that is a whitening learned from positive pairs of patches at least
    22 px wide, on mean-pooled features, its discriminant axes weighted, then tuned by
    InfoNCE; its card holds the head's and the last stage's commands.""",
    MappingProxyType({
        "init": "exemplar-fast-t01",
        "num_classes": 2000,
        "samples_per_class": 1000,
        "epochs": 1000,
        "time_budget_minutes": 70.0,
        "batch_size": 256,
        "lr": 0.01,
        "seed": 1,
        "translation": 0.05,
        "whiten": 0.5,
        "magnification": 10.0,
    }),
)

ADAPT = Preset(
    "adapt",
    "fine-tune the shipped default on your own photos for 15 minutes with softmax+triplet (python -m exemplar_desc.adapt)",
    """The recipe of the adaptation command, ``python -m exemplar_desc.adapt``: the last
    stage of ``exemplar-fast-t005`` (above), whose network the shipped default fine-tunes, run
    once more from the shipped default itself (``init``: ``DEFAULT_MODEL``), for 15 minutes, with the
    softmax+triplet loss, which trains the distance matching compares as well as the
    surrogate classes, and the shipped default's head: the learned whitening of positive
    pairs of shaded views (W 1, shrinkage 0.1, emphasis 0.45, shading 0.6) on mean-pooled
    features, tuned by 600 InfoNCE steps (temperature 0.03), on patches at least 22 px wide.
    The command takes the head, the magnification and the smallest patch side from the model
    it adapts (for the default, these settings), and gives a small folder fewer classes than
    2000 when its photos give fewer seeds.""",
    MappingProxyType({**FAST_T005.settings, "init": DEFAULT_MODEL, "time_budget_minutes": 15.0, "loss": "softmax+triplet",
                      "whitening": "pairs", "whiten": 1.0, "pair_emphasis": 0.45, "pair_tune_steps": 600,
                      "pair_temperature": 0.03, "pair_shading": 0.6, "head_pooling": "avg", "min_patch_side": 22.0}),
)

DISTILL = Preset(
    "distill",
    "distil exemplar-fast-t005-shaded into fast-tiny, a network of a ninth of its FLOPs, in 40 minutes (loss distill)",
    """The recipe of ``exemplar-fast-tiny-shaded`` (docs/distillation.md): the ``fast-tiny``
    network from random weights learns the descriptors of ``exemplar-fast-t005-shaded``
    (``teacher``, the shipped default when it was trained) on surrogate samples of 2000
    seeds, by the loss ``distill``, for 40 minutes at lr 0.25, and keeps the head it learned
    (``whitening`` learned). The head's form, the magnification and the 22-pixel patch floor
    are the teacher's (layer 2 of 3, square root, 128-D, 10, ``min_patch_side``). The earlier
    students, ``exemplar-fast-small-distilled`` and ``exemplar-fast-tiny-distilled``, spell
    their own recipes out in their cards (the tiny one's, taught by
    ``exemplar-fast-t005-pairs-nce``, had no floor: ``--min-patch-side 0``).""",
    MappingProxyType({"arch": "fast-tiny", "loss": "distill", "teacher": "exemplar-fast-t005-shaded", "whitening": "learned",
                      "head_layer": 2, "head_power": 0.5, "magnification": 10.0, "min_patch_side": 22.0, "num_classes": 2000,
                      "samples_per_class": 1000, "epochs": 1000, "time_budget_minutes": 40.0, "batch_size": 256,
                      "lr": 0.25, "seed": 1}),
)

#: The presets by name.
PRESETS: dict[str, Preset] = {preset.name: preset for preset in (PAPER, FAST_T005, ADAPT, DISTILL)}

