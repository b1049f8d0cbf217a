"""Command line of the adaptation: ``python -m exemplar_desc.adapt PHOTOS... --name NAME`` (``exemplar-adapt``).

Fine-tunes a descriptor model on your own unlabeled photos, shows the gain on photos it did
not train on, and writes the adapted model only if it is better there:

1. **Photos.** PHOTOS are folders (searched recursively) or image files, each photo named by
   its path relative to their common folder. ``--hold-out`` of them (20 %, at least 6) are
   held out, drawn with ``--hold-out-seed`` (:mod:`.training.holdout`); too few photos is an
   error before any work that says how many are needed.
2. **Training**, the training command's code path (:func:`.training.loop.train`,
   :func:`.train.finish_model`) with ``--preset adapt``: the ``--base`` model (the shipped
   default) fine-tuned on the other photos for ``--minutes`` (15) with ``--loss``
   (softmax+triplet), its head, magnification and smallest patch side kept
   (:func:`.training.init_model.model_settings`), with the preset's 2000 surrogate classes or
   as many as the photos give where fewer. Every training option can be given (the
   "training" options of ``--help``).
3. **Proof.** Each held-out photo, downscaled to 1024 px, becomes a six-image sequence of one
   kind of change (viewpoint, zoom+rotation, light, noise, JPEG, blur, in turn) with exact
   homographies, by the validation set's generator (:func:`benchmarks.validation.ensure_sequences`);
   the base and adapted models describe the same SIFT keypoints of them in float32 and
   their mAP, MMA@3 and H mean are printed side by side, per kind and overall
   (:mod:`benchmarks.comparison`).
4. **Decision.** The report ``OUT_DIR/NAME.adapt.json`` is always written (atomically); the
   model, ``OUT_DIR/NAME.pt`` and its card ``NAME.json`` (the training card with the same
   record under ``adaptation``), only if it is better: higher mAP and higher MMA@3 over all
   held-out pairs (:data:`benchmarks.comparison.DECISION_RULE`). Otherwise the base model is
   kept and the command says so, with exit status 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.comparison import DECISION_RULE, format_comparison, is_better, score_descriptors
from benchmarks.datasets import load_sequences
from benchmarks.matching import HOMOGRAPHY_FIT
from benchmarks.validation import ensure_sequences, kinds_in_turn

from .atomic import atomic_write
from .checks import OptionError, check, check_output_dir
from .cli import ArgumentParser, report
from .descriptor import ExemplarDescriptor
from .model_io import save_model
from .networks import DescriptorNet
from .train import NOT_OPTIONS, SPELLING, add_config_options, add_family_options, command_line, config_defaults, \
    config_from_args, finish_model
from .training.config import LOSSES, TrainConfig
from .training.holdout import FINGERPRINT, MIN_HELD_OUT, PhotoSet, collect_photos, split_photos
from .training.init_model import load_init_model, model_settings
from .training.loop import train, training_device
from .training.presets import ADAPT
from .training.seeds import seed_pool
from .training.signals import TrainingInterrupted

__all__ = ["build_parser", "parse_args", "main", "SEQUENCE_MAX_SIDE", "NUM_FEATURES", "PRECISION"]

PROG = "python -m exemplar_desc.adapt"
#: Longer side in pixels the held-out photos are downscaled to before their sequences are made.
SEQUENCE_MAX_SIDE = 1024
#: SIFT keypoints per image of the comparison (the matching benchmark's default).
NUM_FEATURES = 2000
#: Both models' arithmetic in the comparison: float32, so the decision is the same on every machine.
PRECISION = "fp32"
#: TrainConfig fields the command sets itself (its photos) or does not take (STL-10, the network's input).
OWN_FIELDS = ("images", "stl10", "stl10_max_images", *NOT_OPTIONS)
#: Training fields among the main options; the other fields are in the "training" group.
MAIN_FIELDS = ("init", "time_budget_minutes", "loss", "device", "num_threads")
#: The fields' options (:data:`exemplar_desc.train.SPELLING`), some renamed for this command.
ADAPT_SPELLING: dict[str, dict[str, Any]] = {
    **SPELLING,
    "init": {"flag": "--base", "metavar": "MODEL", "help": "the model to adapt and to compare with: a shipped name or "
             "a model card (.json) path; the adapted model keeps its head's form, magnification and smallest patch side"},
    "time_budget_minutes": {"flag": "--minutes", "metavar": "M", "help": "minutes of training, the lr schedule "
                            "following the wall time (the seed patches, the head and the comparison take more)"},
    "loss": {"choices": LOSSES, "metavar": "LOSS"},
    "arch": {"unset": "the --base model's"},
    "num_classes": {"unset": "the preset's 2000, or as many as the training photos give where fewer"},
}


def build_parser(defaults: dict[str, Any], add_help: bool = True) -> ArgumentParser:
    """The command line's parser; ``defaults`` by destination (:func:`exemplar_desc.train.config_defaults`)."""
    p = ArgumentParser(prog=PROG, add_help=add_help,
                       description="Fine-tune a descriptor on your own photos; write it only if it is better on those held out.")
    p.add_argument("photos", nargs="+", metavar="PHOTOS", help="folders of your photos (searched recursively) or photo files")
    p.add_argument("--name", required=True, help="name of the adapted model: OUT_DIR/NAME.pt and NAME.json")
    add_config_options(p, defaults, MAIN_FIELDS, ADAPT_SPELLING)
    p.add_argument("--out-dir", default="models", help="folder of the model, its card and the report (default: %(default)s)")
    p.add_argument("--workdir", help="checkpoints, the held-out sequences and the candidate model (default: runs/adapt/NAME)")
    p.add_argument("--hold-out", type=float, default=0.2, metavar="FRACTION",
                   help=f"share of the photos held out to measure the gain on, in (0, 0.5], at least {MIN_HELD_OUT} "
                        "photos (default: %(default)s)")
    p.add_argument("--head-only", action="store_true",
                   help="take no training step: fit only a new head on the base model's trunk, the way the base's head was "
                        "fitted (for the default, the learned whitening of positive pairs, here from your training photos)")
    p.add_argument("--hold-out-seed", type=int, default=0, metavar="S", help="seed of the choice of held-out photos (default: %(default)s)")
    training = p.add_argument_group("training", "the adapt preset's settings (python -m exemplar_desc.train --preset adapt), "
                                                "which any option of the training command overrides")
    rest = [f.name for f in fields(TrainConfig) if f.name not in (*OWN_FIELDS, *MAIN_FIELDS)]
    add_config_options(training, defaults, rest, ADAPT_SPELLING)
    add_family_options(p, defaults)
    return p


def parse_args(argv: list[str]) -> tuple[ArgumentParser, argparse.Namespace, dict]:
    """Parse ``argv`` with the defaults of the adapt preset and the ``--base`` model.

    Returns:
        The parser (for error reports), the arguments and the base model's card.

    Raises:
        SystemExit: a malformed command line or a ``--base`` that does not load (one
            ``error:`` line, status 2), or ``--help``.
    """
    first = ArgumentParser(prog=PROG, add_help=False)  # the base model's head and magnification are the defaults
    first.add_argument("--base", dest="init", default=ADAPT.settings["init"])
    base = first.parse_known_args(argv)[0].init
    try:
        check(base != "none", "init", base, "name the model to adapt")
        _, card = load_init_model(base)
    except OptionError as err:
        raise SystemExit(report(err, first)) from None
    defaults = {**config_defaults(ADAPT.name, init=base, **model_settings(card)), "num_classes": None}
    parser = build_parser(defaults)
    return parser, parser.parse_intermixed_args(argv), card


@dataclass
class _Run:
    """What one adaptation works on, checked: the photos and their split, the settings and the folders."""

    args: argparse.Namespace
    photos: PhotoSet
    training: list[str]
    held_out: list[str]
    cfg: TrainConfig
    workdir: Path
    out_dir: Path


def _plan(args: argparse.Namespace) -> _Run:
    """Collect and split the photos and check every setting and folder, before any work.

    Raises:
        OptionError: naming the field of the first bad option (``photos``: too few photos).
    """
    try:
        photos = collect_photos(args.photos)
    except (FileNotFoundError, ValueError) as err:
        raise OptionError("photos", args.photos, str(err)) from None
    training, held_out = split_photos(photos.names, args.hold_out, args.hold_out_seed)
    images = tuple(str(photos.photos[name]) for name in training)
    classes = ADAPT.settings["num_classes"] if args.num_classes is None else args.num_classes  # the most, see _size_classes
    cfg = config_from_args(args, images=images, num_classes=classes)
    check(cfg.time_budget_minutes is not None, "time_budget_minutes", "none", "an adaptation stops at its time budget: give it")
    workdir = check_output_dir("workdir", args.workdir or Path("runs", "adapt", args.name))
    holding = [entry for entry in args.photos if Path(entry).is_dir() and workdir.resolve().is_relative_to(Path(entry).resolve())]
    check(not holding, "workdir", str(workdir), f"lies in the photo folder {holding[0] if holding else ''}, so its held-out "
          "sequences would be taken for photos next time: give a folder outside it")
    return _Run(args, photos, training, held_out, cfg, workdir, check_output_dir("out_dir", args.out_dir))


def _size_classes(cfg: TrainConfig, given: bool) -> tuple[TrainConfig, dict, torch.Tensor]:
    """The run's surrogate classes: as given, else the preset's, or the seed patches of the training photos where fewer.

    The photos' seed candidates are drawn once, here, and the run's seeds chosen from them.

    Returns:
        The settings with them, checked, the card's record of the choice, and the run's seeds:
        (classes, 3, context, context) uint8 RGB crops (:meth:`.training.seeds.SeedPool.choose`).

    Raises:
        OptionError: more classes given than seed patches (``num_classes``), or fewer seed
            patches than the loss's batches need (``photos``).
    """
    pool = seed_pool(cfg)
    available = len(pool)
    photos = f"{len(cfg.images)} training photos"
    if given:
        check(cfg.num_classes <= available, "num_classes", cfg.num_classes, f"the {photos} give only {available} seed patches")
    needed = cfg.batch_size // 2 if cfg.paired_views else 2
    check(available >= needed, "photos", photos, f"they give {available} seed patches, and loss {cfg.loss} with batches of "
          f"{cfg.batch_size} needs at least {needed} classes: add photos")
    classes = cfg.num_classes if given else min(cfg.num_classes, available)
    sized = replace(cfg, num_classes=classes)
    sized.check()
    rule = "given" if given else f"min(the preset's {cfg.num_classes}, the seed patches of the training photos)"
    return sized, {"used": classes, "seed_patches": available, "rule": rule}, pool.choose(classes)


def _held_out_sequences(run: _Run) -> tuple[list, dict[str, str]]:
    """The held-out photos' sequences (generated into the workdir once), and each photo's kind."""
    plan = kinds_in_turn(run.held_out)
    root = ensure_sequences(run.photos.root, plan, run.workdir / "sequences", max_side=SEQUENCE_MAX_SIDE, progress=True)
    sequences, bad = load_sequences(root)
    if bad:
        raise RuntimeError(f"unreadable held-out sequences in {root}: {bad}")
    return sequences, dict(plan)


def _record(run: _Run, command: str, classes: dict, kinds: dict[str, str], scores: dict[str, dict], base_card: dict) -> dict:
    """The ``adaptation`` record of the card and the report: what was adapted on what, measured how, and the outcome."""
    better = is_better(scores["base"], scores["adapted"])
    return {
        "command": command,
        "base": {"model": run.cfg.init, "name": base_card.get("name"), "sha256": base_card["sha256"]},
        "photos": {"given": run.args.photos, "folder": str(run.photos.root), "count": len(run.photos.photos),
                   "sha256": run.photos.fingerprint(), "sha256_of": FINGERPRINT},
        "training_photos": len(run.training),
        "held_out": {"count": len(run.held_out), "fraction": run.args.hold_out, "seed": run.args.hold_out_seed,
                     "photos": run.held_out, "kinds": kinds},
        "minutes": 0 if run.args.head_only else run.cfg.time_budget_minutes,
        "head_only": run.args.head_only,
        "loss": run.cfg.loss,
        "num_classes": classes,
        "comparison": {"sequences": "benchmarks.validation.ensure_sequences, one per held-out photo",
                       "max_side": SEQUENCE_MAX_SIDE, "detector": "sift", "num_features": NUM_FEATURES,
                       "pixel_threshold": 3.0, "precision": PRECISION, "homography_fit": HOMOGRAPHY_FIT},
        "results": scores,
        "decision": {"rule": DECISION_RULE, "better": better},
    }


def _score(run: _Run, candidate: Path, sequences: list) -> dict[str, dict]:
    """The base and the candidate model on the held-out sequences (:func:`benchmarks.comparison.score_descriptors`)."""
    device = training_device(run.cfg.device)
    models = {"base": run.cfg.init, "adapted": candidate}
    descriptors = {name: ExemplarDescriptor(model, device=device, precision=PRECISION) for name, model in models.items()}
    return score_descriptors(sequences, descriptors, NUM_FEATURES)


def _adapt(run: _Run, command: str, base_card: dict) -> int:
    """Size the classes, make the held-out sequences, train, score, decide and write; returns the exit status (0)."""
    started = time.time()
    cfg, classes, seeds = _size_classes(run.cfg, given=run.args.num_classes is not None)
    seed_seconds = time.time() - started
    print(f"surrogate classes: {cfg.num_classes} ({classes['rule']}; the {len(run.training)} training photos give "
          f"{classes['seed_patches']} seed patches)")
    run = replace(run, cfg=cfg)
    sequences, kinds = _held_out_sequences(run)
    result = train(cfg, run.workdir, refit_head=run.args.head_only, seeds=seeds)
    result["seed_time_s"] += seed_seconds  # the card's seed sampling time: the seeds were drawn before train()
    net, card = finish_model(cfg, result, command, resumed=False, preset=ADAPT.name)
    candidate = save_model(net, card, run.workdir / "candidate", run.args.name)
    scores = _score(run, candidate, sequences)
    print(format_comparison(scores["base"], scores["adapted"]))
    _write(run, net, card, _record(run, command, classes, kinds, scores, base_card), candidate)
    return 0


def _write(run: _Run, net: DescriptorNet, card: dict, record: dict, candidate: Path) -> None:
    """Write the report, then the model and its card if it is better; say which."""
    name, better = run.args.name, record["decision"]["better"]
    report_path, model_path = run.out_dir / f"{name}.adapt.json", run.out_dir / f"{name}.json"
    text = json.dumps({"adaptation": record, "model": str(model_path) if better else None}, indent=1) + "\n"
    atomic_write(report_path, lambda tmp: Path(tmp).write_text(text))
    overall = {score: [record["results"][model]["overall"][score] for model in ("base", "adapted")] for score in ("mAP", "MMA@3")}
    change = ", ".join(f"{score} {before} -> {after}" for score, (before, after) in overall.items())
    if better:
        model_path = save_model(net, {**card, "adaptation": record}, run.out_dir, name)
        print(f"better on the held-out photos ({change}): model written to {model_path} and {model_path.with_suffix('.pt')}")
    else:
        print(f"not better on the held-out photos ({change}): kept the base model {run.cfg.init}; no model written "
              f"(the adapted one stays in {candidate.parent} for inspection)")
    print(f"report written to {report_path}")


def _describe_plan(run: _Run) -> str:
    """What the run will adapt on: the photos, their split and the base model."""
    return (f"{len(run.photos.photos)} photos in {run.photos.root}: {len(run.training)} to train on, {len(run.held_out)} held out "
            f"(--hold-out {run.args.hold_out:g}, at least {MIN_HELD_OUT}; --hold-out-seed {run.args.hold_out_seed}): "
            f"{', '.join(run.held_out)}\nadapting {run.cfg.init} " + (
                "by a new head on its trunk (--head-only)" if run.args.head_only
                else f"for {run.cfg.time_budget_minutes:g} minutes with loss {run.cfg.loss}"))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    0: the adapted model written, or the base model kept because the adapted one is not
    better (the report is written either way); 1: the comparison failed (a model could not
    describe a held-out sequence; nothing written to ``--out-dir``); 2: a bad option, too
    few photos or seed patches (one ``error:`` line, before any work, nothing written);
    128 + signal number (130 for SIGINT, 143 for SIGTERM): interrupted, nothing written to
    ``--out-dir``.
    """
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser, args, base_card = parse_args(argv)
    try:
        run = _plan(args)
    except ValueError as err:
        return report(err, parser)
    if run.cfg.num_threads:
        torch.set_num_threads(run.cfg.num_threads)
    print(_describe_plan(run))
    try:
        return _adapt(run, command_line(PROG, argv), base_card)
    except TrainingInterrupted as err:
        print(f"interrupted by {err}; nothing was written to {run.out_dir} (an adaptation starts over when run again)",
              file=sys.stderr)
        return 128 + err.signum
    except ValueError as err:
        return report(err, parser)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
