"""Command line of the unsupervised training: ``python -m exemplar_desc.train IMAGES [options]``.

1. Sample seed patches from unlabeled images (and/or STL-10's ``unlabeled_X.bin``); each
   seed is a surrogate class (:mod:`exemplar_desc.training.seeds`).
2. Train the network to classify random transformations of the seeds
   (:mod:`exemplar_desc.training.loop`).
3. Fit the descriptor head (PCA) on fresh unlabeled patches, choose the patch
   magnification on synthetic warps of training images (with that head), fit the head on
   patches at SIFT keypoints of the training images with ``--pca-source keypoints``, or as
   a learned whitening of positive pairs in such warps with ``--whitening pairs``, or keep
   the projection a loss on descriptors trained (``--whitening learned``, e.g. with
   ``--loss distill``), and write the model and its card into ``--out-dir`` (default ``models/``).

``--refit-head`` skips step 2: the head is fitted on the trunk of the ``--init`` model.

The options are generated from :class:`~exemplar_desc.training.config.TrainConfig`'s fields
(their help texts, types and defaults) and the transformation families' records; a
``--preset`` replaces the defaults before the command line is read, so explicit options win.
The adaptation command (:mod:`exemplar_desc.adapt`) builds its options and writes its
model with the same pieces (:func:`add_config_options`, :func:`finish_model`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from .checks import check, check_number, check_output_dir
from .cli import ArgumentParser, add_shared_options, flag_names, report, settings_from_args
from .distributed import close_distributed, init_distributed, rank_from_env, world_size_from_env
from .images import gather_images
from .int8 import calibrate_int8
from .model_io import save_model
from .networks import POOLINGS, DescriptorNet, architecture_from_dict, count_flops
from .training.checkpoint import CheckpointMismatch
from .training.config import PCA_SOURCES, TRIPLET_PAIRS, WHITENINGS, TrainConfig
from .training.head import build_descriptor_net, fit_head_on_keypoints, fit_head_on_pairs, fit_head_on_surrogates, \
    keypoint_patches, uses_surrogates
from .training.init_model import architecture_option, load_init_model
from .training.loop import train
from .training.magnification import tune_magnification
from .training.presets import PRESETS
from .training.seeds import load_stl10_unlabeled
from .training.signals import TrainingInterrupted
from .training.transforms import FAMILIES, FAMILY_RECORDS, TransformConfig

logger = logging.getLogger(__name__)

#: Patches at SIFT keypoints of the training photos on which the int8 ranges are calibrated.
INT8_PATCHES = 8192

__all__ = ["build_parser", "parse_args", "config_defaults", "add_config_options", "add_family_options", "config_from_args",
           "command_line", "build_card", "finish_model", "describe_run", "main"]


def _parse_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    try:
        return float(lo), float(hi)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}") from err


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected S1,S2,..., got {text!r}") from err


#: TrainConfig fields the command line does not set (the network's input and the validation
#: set are fixed; the families have their own options).
NOT_OPTIONS = ("patch_size", "context", "val_per_class", "transforms")
#: Options shared with the other command lines (exemplar_desc.cli.SHARED_OPTIONS).
SHARED = ("device", "magnification")
#: For the fields whose option is not ``--field-name`` with the field's type: argparse's
#: keywords, ``flag`` (the option, or a positional's name) and ``unset`` (the default's
#: text where the parser's default is None but the field's is not).
SPELLING: dict[str, dict[str, Any]] = {
    "images": {"flag": "images", "nargs": "*", "metavar": "IMAGES"},
    "stl10": {"metavar": "FILE"},
    "stl10_max_images": {"metavar": "N"},
    "arch": {"unset": f"{TrainConfig.arch}, or the --init model's"},
    "init": {"metavar": "MODEL"},
    "seed_scales": {"type": _parse_scales, "metavar": "S1,S2,..."},
    "num_threads": {"flag": "--threads", "metavar": "N"},
    "time_budget_minutes": {"flag": "--time-budget", "metavar": "MINUTES"},
    "pca_source": {"choices": PCA_SOURCES},
    "whitening": {"choices": WHITENINGS},
    "head_pooling": {"choices": tuple(POOLINGS)},
    "triplet_pairs": {"choices": TRIPLET_PAIRS},
    "distill_photos": {"action": argparse.BooleanOptionalAction},
    "distill_cross": {"action": argparse.BooleanOptionalAction},
}


def _shown(value: Any) -> str:
    """A default as the command line takes it (tuples as A,B,...)."""
    text = ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)
    return text.replace("%", "%%") or "none"  # argparse formats help texts with %


def _value_type(hint: Any) -> Callable[[str], Any]:
    """The parser of a field's value from its type hint: int, float or str; ``X | None`` also takes ``none``.

    ``none`` unsets a setting a preset gives (``--init none`` starts from random weights).
    """
    if type(None) not in typing.get_args(hint):
        return hint
    value_type = next(t for t in typing.get_args(hint) if t is not type(None))

    def parse(text: str) -> Any:
        return None if text == "none" else value_type(text)

    parse.__name__ = value_type.__name__  # argparse names it in its errors ("invalid float value")
    return parse


def config_defaults(preset: str | None, **settings: Any) -> dict[str, Any]:
    """The parser's defaults by destination: TrainConfig's or the preset's, families included.

    ``arch`` stays None unless the preset sets it: the ``--init`` model's architecture then
    applies (:func:`config_from_args`).

    Args:
        settings: fields or families (by name) on top of the preset's (:meth:`Preset.config`).
    """
    config = PRESETS[preset].config(**settings) if preset is not None else TrainConfig(**settings)
    values = {f.name: getattr(config, f.name) for f in fields(TrainConfig)}
    values.update(config.transforms.to_dict())
    if preset is None or "arch" not in PRESETS[preset].settings:
        values["arch"] = None
    return values


def add_config_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, defaults: dict[str, Any], names: typing.Iterable[str],
    spelling: dict[str, dict[str, Any]] = SPELLING,
) -> None:
    """One option per TrainConfig field of ``names``, in that order (its metadata's help), ``--device`` and ``--magnification`` shared.

    Args:
        defaults: by destination, from :func:`config_defaults`.
        spelling: per field, as :data:`SPELLING` (``help`` also replaces the field's help text).
    """
    hints = typing.get_type_hints(TrainConfig)
    by_name = {f.name: f for f in fields(TrainConfig)}
    for f in (by_name[name] for name in names):
        spelled = dict(spelling.get(f.name, {}))
        flag = spelled.pop("flag", "--" + f.name.replace("_", "-"))
        default = defaults[f.name]
        unset = spelled.pop("unset", f.metadata["unset"])
        text = spelled.pop("help", f.metadata["help"])
        keywords = {"default": default, "help": f"{text} (default: {unset if default is None else _shown(default)})"}
        if not flag.startswith("--"):
            parser.add_argument(f.name, **keywords, **spelled)
            continue
        typed = {} if "action" in spelled else {"type": _value_type(hints[f.name])}  # a flag (--x / --no-x) takes no value
        if f.name in SHARED:
            add_shared_options(parser, flag, **{f.name: {**typed, **keywords, **spelled}})
        else:
            parser.add_argument(flag, dest=f.name, **{**typed, **keywords, **spelled})


def add_family_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """One option per transformation family (its record's help and bounds), and ``--without``."""
    group = parser.add_argument_group(
        "transformations", "ranges of the random transformations of the seeds (the paper's by default); a family at its identity is off")
    for family in FAMILY_RECORDS:
        group.add_argument(
            "--" + family.name.replace("_", "-"), dest=family.name, type=_parse_range if family.is_range else float,
            metavar=family.metavar, default=defaults[family.name],
            help=f"{family.help} (default: {_shown(defaults[family.name])}; identity: {_shown(family.identity)})",
        )
    group.add_argument("--without", nargs="+", default=[], choices=FAMILIES, metavar="FAMILY",
                       help=f"switch families off (set them to their identity): {', '.join(FAMILIES)} (default: none)")


def build_parser(preset: str | None = None, add_help: bool = True) -> argparse.ArgumentParser:
    """The command line's parser, its defaults those of ``preset`` (None: TrainConfig's, the paper's)."""
    p = ArgumentParser(
        prog="python -m exemplar_desc.train",
        description="Train an Exemplar-CNN descriptor without labels on any folder of images.",
        add_help=add_help,
    )
    p.add_argument(
        "--preset", choices=PRESETS, default=preset,
        help="start from a named recipe; the options given override its settings (none unsets one, e.g. --init none): "
             + "; ".join(f"{name}: {value.summary}" for name, value in PRESETS.items()) + " (default: none, the paper's settings)",
    )
    defaults = config_defaults(preset)
    add_config_options(p, defaults, [f.name for f in fields(TrainConfig) if f.name not in NOT_OPTIONS])
    run = p.add_argument_group("run and output")
    run.add_argument("--workdir", default="runs/train", help="checkpoint and log folder (default: %(default)s)")
    run.add_argument(
        "--resume", action="store_true",
        help="continue from WORKDIR/checkpoint.pt with the same settings (a finished run only refits the head with the "
             "given head options)",
    )
    run.add_argument(
        "--refit-head", action="store_true",
        help="take no training step: fit a new head (with the given head options) on the trunk of the --init model "
             "and write it as a new model (default: off)",
    )
    add_shared_options(run, "--dist-timeout")
    run.add_argument("--out-dir", default="models", help="folder the model and its card are written to (default: %(default)s)")
    run.add_argument("--name", help="model name (default: the architecture's name)")
    add_family_options(p, defaults)
    return p


def parse_args(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse ``argv`` with the defaults of its ``--preset``; returns the parser (for error reports) and the arguments.

    Raises:
        SystemExit: a malformed command line (one ``error:`` line, status 2), or ``--help``.
    """
    # A first pass finds the preset: its values become the defaults, so explicit options win.
    known, _ = build_parser(add_help=False).parse_known_args(argv)  # --help waits for the preset's defaults
    parser = build_parser(known.preset)
    return parser, parser.parse_intermixed_args(argv)  # folders may come before and after options


def config_from_args(args: argparse.Namespace, data: bool = True, **given: Any) -> TrainConfig:
    """TrainConfig from parsed command-line arguments, checked (:meth:`TrainConfig.check`; ``data``: the data paths too).

    Args:
        given: fields a command sets itself, over the options of the same destination
            (the adaptation command's training photos and classes).

    Raises:
        OptionError: the first bad option, named by its field.
    """
    transforms = settings_from_args(TransformConfig, args).without(*args.without)
    derived = {"images": tuple(getattr(args, "images", ())), "seed_scales": tuple(args.seed_scales), "arch": _arch_option(args),
               "transforms": transforms}
    cfg = settings_from_args(TrainConfig, args, **{**derived, **given})
    cfg.check(data=data)
    return cfg


def _arch_option(args: argparse.Namespace) -> str:
    """--arch as given; else the --init model's architecture (named as --arch would name it); else the default."""
    if args.arch is not None or args.init is None:
        return args.arch or TrainConfig.arch
    _, card = load_init_model(args.init)
    arch = architecture_from_dict(card["architecture"])
    name = architecture_option(arch)
    check(name is not None, "init", args.init, f"its architecture {arch.to_dict()} has no --arch name")
    return name


def command_line(program: str, argv: list[str]) -> str:
    """The command a card records, so the run can be repeated: ``program`` and ``argv``, quoted for the shell."""
    return " ".join([program, *(shlex.quote(a) for a in argv)])


def build_card(
    cfg: TrainConfig,
    command: str,
    resumed: bool,
    result: dict,
    net: DescriptorNet,
    explained: float | None,
    magnification: float,
    tuning: dict | None,
    preset: str | None = None,
    pairs: dict | None = None,
) -> dict:
    """The model card of a trained descriptor (without the weights' name and sha256, added by save_model).

    Args:
        command: the command line (:func:`command_line`), recorded so the run can be repeated.
        result: what :func:`exemplar_desc.training.loop.train` returned.
        explained: fraction of the pooled features' variance the PCA keeps; None for the learned head.
        tuning: the magnification tuning record, None when --magnification was given.
        preset: the ``--preset`` the run started from, None for none.
        pairs: the record of the pairs whitening (:func:`fit_head_on_pairs`), None for the pca one.
    """
    return {
        "architecture": result["arch"].to_dict(),
        "architecture_name": cfg.arch,
        "patch_size": cfg.patch_size,
        "magnification": magnification,
        "min_patch_side": cfg.min_patch_side,
        "magnification_tuning": tuning,
        "input": "grey patch, standardised to zero mean and unit variance",
        "head": _head_record(cfg, net, explained, pairs),
        "flops_per_patch": count_flops(net.trunk, (1, cfg.patch_size, cfg.patch_size)),
        "training": _training_record(cfg, command, preset, resumed, result),
    }


def _head_record(cfg: TrainConfig, net: DescriptorNet, explained: float | None, pairs: dict | None) -> dict:
    """The card's ``head`` record: the layer, pooling grid, dimension and whitening of the head (:func:`build_card`'s arguments)."""
    return {
        "layer": net.layer,
        "grid": cfg.head_grid,
        "dim": cfg.head_dim,
        "power": cfg.head_power,
        "pooling": cfg.head_pooling,
        "whiten": cfg.whiten,
        "whitening": cfg.whitening,
        "pca_patches": cfg.pca_patches,
        "pca_source": cfg.pca_source,
        "pairs": pairs,
        "explained_variance": None if explained is None else round(explained, 4),
    }


def _training_record(cfg: TrainConfig, command: str, preset: str | None, resumed: bool, result: dict) -> dict:
    """The card's ``training`` record: the command, data, schedule, loss and outcome of the run (:func:`build_card`'s arguments)."""
    last = result["log"][-1] if result["log"] else {}
    return {
        "command": command,
        "preset": preset,
        "resumed": resumed,
        "refit_head": result["refit_head"],
        "data": {"image_folders": list(cfg.images), "stl10": cfg.stl10},
        "num_classes": cfg.num_classes,
        "seed_scales": list(cfg.seed_scales),
        "samples_per_class_per_epoch": cfg.samples_per_class,
        "epochs": cfg.epochs,
        "time_budget_minutes": cfg.time_budget_minutes,
        "steps": result["steps"],
        "samples_seen": result["samples_seen"],
        "batch_size": cfg.batch_size,
        "world_size": result["world_size"],
        "global_batch_size": cfg.batch_size * result["world_size"],
        "loss": _loss_record(cfg),
        "optimizer": {"type": "SGD", "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "schedule": "official steps"},
        "transforms": cfg.transforms.to_dict(),
        "device": result["trained_on"],
        "head_fitted_on": str(result["device"]),
        "wall_time_s": round(result["wall_time_s"], 1),
        "seed_sampling_s": round(result["seed_time_s"], 1),
        "final_train_accuracy": last.get("train_accuracy"),
        "final_surrogate_val_accuracy": last.get("val_accuracy"),
        "torch": torch.__version__,
        "seed": cfg.seed,
        "init": result["init"],
    }


def _loss_record(cfg: TrainConfig) -> dict:
    """The card's ``training.loss``: the loss and its settings (the teacher by name and weights' sha256)."""
    record: dict = {"type": cfg.loss}
    if cfg.matching:
        record.update(margin=cfg.margin, triplet_weight=cfg.triplet_weight, triplet_pairs=cfg.triplet_pairs)
    if cfg.teacher is not None:
        record["teacher"] = {"model": cfg.teacher, "sha256": load_init_model(cfg.teacher, option="teacher")[1]["sha256"]}
    if cfg.distill_relation > 0:
        record.update(distill_relation=cfg.distill_relation, distill_temperature=cfg.distill_temperature)
    if cfg.distill_photos:
        record["distill_photos"] = True
    if cfg.distill_cross:
        record["distill_cross"] = True
    return record


def _training_images(cfg: TrainConfig) -> tuple[list[Path] | np.ndarray, str]:
    """The photos of the image folders and files, or STL-10's when there are none, and what they are."""
    images = gather_images(cfg.images)
    if images:
        return images, "image folders"
    return load_stl10_unlabeled(cfg.stl10, cfg.stl10_max_images), "STL-10 (96x96)"


def _magnification(
    cfg: TrainConfig, net: DescriptorNet, images: list[Path] | np.ndarray | None, source: str | None
) -> tuple[float, dict | None]:
    """--magnification, or the one tuned on the training photos (from :func:`_training_images`)."""
    if cfg.magnification is not None:
        return cfg.magnification, None
    magnification, tuning = tune_magnification(net, images, seed=cfg.seed, min_side=cfg.min_patch_side)
    return magnification, {**tuning, "images": source}


def _report(err: Exception, parser: argparse.ArgumentParser) -> int:
    """:func:`exemplar_desc.cli.report`, a changed setting of a resumed run named by its flag too."""
    if isinstance(err, CheckpointMismatch):
        err = err.named(flag_names(parser))
    return report(err, parser)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    0: model written; 2: bad option (one ``error:`` line, nothing written) or training
    data that yield too few seeds; 128 + signal number (130 for SIGINT, 143 for SIGTERM):
    interrupted, with a checkpoint to ``--resume`` from; 1 (under torchrun): this rank lost
    another (a collective operation failed or timed out). Under torchrun every rank runs
    this; only rank 0 prints, writes files, fits the head and tunes the magnification.
    """
    argv = sys.argv[1:] if argv is None else argv
    main_rank = rank_from_env() == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser, args = parse_args(argv)
    try:
        try:
            cfg = config_from_args(args, data=main_rank)
            check_number("dist_timeout", args.dist_timeout, low=0, low_open=True)
            workdir = check_output_dir("workdir", args.workdir)
            out_dir = check_output_dir("out_dir", args.out_dir)
            dist = init_distributed(cfg.device, args.dist_timeout)
            result = train(cfg, workdir, resume=args.resume, dist=dist, refit_head=args.refit_head)
        finally:
            close_distributed()
    except TrainingInterrupted as err:
        if main_rank:
            print(f"interrupted by {err}; run the same command with --resume to continue", file=sys.stderr)
        return 128 + err.signum
    except (ValueError, FloatingPointError) as err:
        return _report(err, parser) if main_rank else 2
    except RuntimeError as err:
        if world_size_from_env() <= 1:
            raise
        # Usually another rank died and the collective operations lost it; torchrun's
        # summary names the rank that failed first.
        print(f"error: rank {rank_from_env()}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    if not main_rank:
        return 0
    try:
        return _write_model(cfg, args, argv, result, out_dir)
    except ValueError as err:
        return _report(err, parser)


def finish_model(cfg: TrainConfig, result: dict, command: str, resumed: bool, preset: str | None) -> tuple[DescriptorNet, dict]:
    """Fit the head and choose the magnification of a finished run (rank 0); nothing is written.

    Args:
        result: what :func:`exemplar_desc.training.loop.train` returned.
        command, resumed, preset: recorded in the card (:func:`build_card`).

    Returns:
        The descriptor network (CPU, eval mode) and its card, for
        :func:`exemplar_desc.model_io.save_model`.
    """
    net = build_descriptor_net(result["model"], cfg)
    # The keypoints PCA and the pairs whitening are fitted at the chosen magnification; the
    # surrogate PCA is fitted when it is the head, or for the tuning, which describes patches with it.
    explained = None
    if cfg.whitening == "learned":
        net.head.load_state_dict(result["model"].matching.state_dict())
    elif uses_surrogates(cfg):
        explained = fit_head_on_surrogates(net, result["sampler"], cfg, result["device"], result["generator"])
    images, source = _training_images(cfg)  # read once: STL-10's file may hold 100,000 images
    magnification, tuning = _magnification(cfg, net, images, source)
    pairs = None
    if cfg.pca_source == "keypoints":
        explained = fit_head_on_keypoints(net, images, magnification, cfg)
    if cfg.whitening == "pairs":
        explained, pairs = fit_head_on_pairs(net, images, magnification, cfg)
    card = build_card(cfg, command, resumed, result, net, explained, magnification, tuning, preset=preset, pairs=pairs)
    card["int8"] = _int8_calibration(net, images, magnification, cfg)
    if result["refit_head"]:
        card["training"]["trunk_training"] = load_init_model(cfg.init)[1].get("training")
    return net, card


def _int8_calibration(net: DescriptorNet, images: list[Path] | np.ndarray, magnification: float, cfg: TrainConfig) -> dict | None:
    """The card's ``int8`` record (:func:`calibrate_int8`) from patches at SIFT keypoints of the
    training photos, cut at the model's magnification; None, with a warning, when they have none."""
    patches = list(keypoint_patches(images, INT8_PATCHES, magnification, cfg.patch_size, cfg.seed, cfg.min_patch_side))
    if not patches:
        logger.warning("the training photos have no SIFT keypoints, so the model has no int8 calibration")
        return None
    return calibrate_int8(net, patches)


def describe_run(card: dict) -> str:
    """One line on a written model: its surrogate validation accuracy (none after a head refit), magnification and the head's variance."""
    training, head = card["training"], card["head"]
    if training["refit_head"]:
        summary = f"head refitted on the trunk of the init model {training['init']['model']} (no training step, so no surrogate validation accuracy)"
    else:
        accuracy = training["final_surrogate_val_accuracy"]
        summary = f"surrogate validation accuracy {float('nan') if accuracy is None else accuracy:.3f} over {training['num_classes']} classes"
    kept = "is the projection the loss trained" if head["explained_variance"] is None else f"keeps {head['explained_variance']:.1%} of the variance"
    return f"{summary}; magnification {card['magnification']:g}; the head {kept}"


def _write_model(cfg: TrainConfig, args: argparse.Namespace, argv: list[str], result: dict, out_dir: Path) -> int:
    """Fit the head, choose the magnification, write the model and its card (rank 0); returns 0."""
    command = command_line("python -m exemplar_desc.train", argv)
    net, card = finish_model(cfg, result, command, args.resume, args.preset)
    card_path = save_model(net, card, out_dir, args.name or cfg.arch)
    print(f"model written to {card_path} and {card_path.with_suffix('.pt')}")
    print(describe_run(card))
    return 0

if __name__ == "__main__":
    # record: under torchrun, a failing rank's traceback appears in the job's error summary.
    raise SystemExit(record(main)())
