"""Command line of the unsupervised training: ``python -m exemplar_desc.train IMAGES [options]``.

1. Sample seed patches from unlabeled images (and/or STL-10's ``unlabeled_X.bin``); each
   seed is a surrogate class (:mod:`exemplar_desc.training.seeds`).
2. Train the network to classify random transformations of the seeds
   (:mod:`exemplar_desc.training.loop`).
3. Fit the descriptor head (PCA) on fresh unlabeled patches, choose the patch
   magnification on synthetic warps of training images, and write the model and its card
   into ``--out-dir`` (default ``weights/``).
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from .cli import ArgumentParser, report
from .checks import check, check_number, check_output_dir
from .images import list_images
from .model_io import save_model
from .networks import DescriptorNet, architecture_from_dict, count_flops
from .training.head import fit_head, fit_head_on_keypoints
from .distributed import DEFAULT_TIMEOUT_MINUTES, close_distributed, init_distributed, rank_from_env, world_size_from_env
from .training.loop import PCA_SOURCES, TrainConfig, TrainingInterrupted, architecture_option, load_init_model, train
from .training.magnification import tune_magnification
from .training.seeds import load_stl10_unlabeled
from .training.transforms import FAMILIES, TransformConfig

__all__ = ["build_parser", "config_from_args", "build_card", "main"]


def _parse_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    try:
        pair = (float(lo), float(hi))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}") from err
    if not all(map(math.isfinite, pair)) or pair[0] > pair[1] or pair[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX, got {text!r}")
    return pair


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected S1,S2,..., got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    t = TransformConfig()
    p = ArgumentParser(
        prog="python -m exemplar_desc.train",
        description="Train an Exemplar-CNN descriptor without labels on any folder of images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("images", nargs="*", help="folders of unlabeled images (searched recursively)")
    p.add_argument("--stl10", help="STL-10 unlabeled_X.bin (96x96x3 uint8, column-major)")
    p.add_argument("--stl10-max-images", type=int, help="use only the first N STL-10 images")
    p.add_argument("--max-side", type=int, default=d.max_side, help="downscale images to this longer side first (pixels)")
    p.add_argument(
        "--arch",
        help=f"named architecture (fast, exemplar-nips, ...) or notation like 64c5-128c5-256c5-512f (default: {d.arch}, or the --init model's)",
    )
    p.add_argument(
        "--init",
        metavar="MODEL",
        help="start the conv layers from this model (shipped name or .pt/.json path); the classifier layers start fresh",
    )
    p.add_argument("--num-classes", type=int, default=d.num_classes, help="surrogate classes (seed patches)")
    p.add_argument("--seeds-per-image", type=int, default=d.seeds_per_image, help="seed candidates per image")
    p.add_argument(
        "--seed-scales",
        type=_parse_scales,
        default=d.seed_scales,
        help="image scales S1,S2,... in (0, 1] the seeds are taken at, the candidates split evenly among them",
    )
    p.add_argument("--samples-per-class", type=int, default=d.samples_per_class, help="samples per class per epoch")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per step and process (under torchrun the global batch is N x this)")
    p.add_argument("--lr", type=float, default=d.lr, help="base learning rate (official step schedule); not scaled with the global batch, see docs/distributed.md")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (seeds, samples, initialisation)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, dest="num_threads", help="CPU threads for torch")
    p.add_argument("--workdir", default="runs/train", help="checkpoint and log folder")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from WORKDIR/checkpoint.pt (a finished run only refits the head with the given head options)",
    )
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes)
    p.add_argument(
        "--time-budget",
        type=float,
        dest="time_budget_minutes",
        help="stop after this many minutes of training; the lr schedule then follows wall time",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_MINUTES,
        help="under torchrun: minutes a rank waits for the others before the job fails",
    )
    p.add_argument("--out-dir", default="weights", help="where the model and its card are written")
    p.add_argument("--name", help="model name (default: the architecture name)")
    p.add_argument("--head-layer", type=int, default=d.head_layer, help="conv layer of the descriptor (0-based, -1 = last)")
    p.add_argument("--head-grid", type=int, default=d.head_grid, help="max-pooling grid of the descriptor")
    p.add_argument("--head-dim", type=int, default=d.head_dim, help="descriptor dimension after PCA")
    p.add_argument("--head-power", type=float, default=d.head_power, help="exponent in (0, 1] on the pooled features before the PCA (0.5: square root, 1: none)")
    p.add_argument("--whiten", type=float, default=d.whiten, help="PCA whitening exponent in [0, 1]: component k divided by sqrt(eigenvalue_k)^W (0: none, 1: full)")
    p.add_argument("--pca-patches", type=int, default=d.pca_patches, help="fresh patches the PCA is fitted on")
    p.add_argument("--pca-source", default=d.pca_source, choices=PCA_SOURCES,
                   help="fit the PCA on surrogate samples, or on patches at SIFT keypoints of the training images, "
                        "cut at the chosen magnification (default: %(default)s)")
    p.add_argument("--magnification", type=float, help="patch side / KeyPoint.size; default: tuned on synthetic warps of the training images")
    g = p.add_argument_group("transformations (paper ranges by default; see TransformConfig)")
    g.add_argument("--translation", type=float, default=t.translation, help="max shift, fraction of the patch side")
    g.add_argument("--scale", type=_parse_range, default=t.scale, help="MIN,MAX zoom")
    g.add_argument("--rotation", type=float, default=t.rotation, help="max rotation in degrees")
    g.add_argument("--pca-colour", type=float, default=t.pca_colour, help="factor range [1/F, F] on principal colours")
    g.add_argument("--hsv-power", type=float, default=t.hsv_power, help="S, V exponent range [1/P, P], log-uniform")
    g.add_argument("--hsv-multiply", type=_parse_range, default=t.hsv_multiply, help="MIN,MAX factor on S, V")
    g.add_argument("--hsv-add", type=float, default=t.hsv_add, help="max offset on S, V")
    g.add_argument("--hue", type=float, default=t.hue, help="max hue shift, fraction of the circle")
    g.add_argument("--blur", type=float, default=t.blur, help="max Gaussian sigma in patch pixels")
    g.add_argument("--gamma", type=float, default=t.gamma, help="gamma range [1/G, G] on all channels, log-uniform (1: off)")
    g.add_argument("--shading", type=float, default=t.shading, help="max log-gain range of a smooth illumination field across the patch (0: off; e.g. 0.7)")
    g.add_argument("--shadow", type=float, default=t.shadow, help="probability of a soft-edged shadow across the patch, darkening by 0.3-0.8 (0: off)")
    g.add_argument("--noise", type=float, default=t.noise, help="max sensor noise sigma (read and shot), intensity in [0, 1] (0: off; e.g. 0.02)")
    g.add_argument("--without", nargs="+", default=[], choices=FAMILIES, metavar="FAMILY", help=f"switch families off: {', '.join(FAMILIES)}")
    return p


def config_from_args(args: argparse.Namespace, data: bool = True) -> TrainConfig:
    """TrainConfig from parsed command-line arguments, checked (:meth:`TrainConfig.check`; ``data``: the data paths too).

    Raises:
        OptionError: the first bad option.
    """
    transforms = TransformConfig(
        translation=args.translation,
        scale=tuple(args.scale),
        rotation=args.rotation,
        pca_colour=args.pca_colour,
        hsv_power=args.hsv_power,
        hsv_multiply=tuple(args.hsv_multiply),
        hsv_add=args.hsv_add,
        hue=args.hue,
        blur=args.blur,
        gamma=args.gamma,
        shading=args.shading,
        shadow=args.shadow,
        noise=args.noise,
    ).without(*args.without)
    fields = {k: getattr(args, k) for k in vars(TrainConfig()) if hasattr(args, k) and k not in ("images", "transforms", "arch")}
    cfg = TrainConfig(images=tuple(args.images), transforms=transforms, arch=_arch_option(args), **fields)
    cfg.check(data=data)
    return cfg


def _arch_option(args: argparse.Namespace) -> str:
    """--arch as given; else the --init model's architecture (named as --arch would name it); else the default."""
    if args.arch is not None or args.init is None:
        return args.arch or TrainConfig.arch
    _, card = load_init_model(args.init)
    arch = architecture_from_dict(card["architecture"])
    name = architecture_option(arch)
    check(name is not None, "--init", args.init, f"its architecture {arch.to_dict()} has no --arch name")
    return name


def build_card(
    cfg: TrainConfig,
    argv: list[str],
    resumed: bool,
    result: dict,
    net: DescriptorNet,
    explained: float,
    magnification: float,
    tuning: dict | None,
) -> dict:
    """The model card of a trained descriptor (without the weights' name and sha256, added by save_model).

    Args:
        argv: the command line's arguments, recorded so the run can be repeated.
        result: what :func:`exemplar_desc.training.loop.train` returned.
        explained: fraction of the pooled features' variance the PCA keeps.
        tuning: the magnification tuning record, None when --magnification was given.
    """
    last = result["log"][-1] if result["log"] else {}
    return {
        "architecture": result["arch"].to_dict(),
        "architecture_name": cfg.arch,
        "patch_size": cfg.patch_size,
        "magnification": magnification,
        "magnification_tuning": tuning,
        "input": "grey patch, standardised to zero mean and unit variance",
        "head": {
            "layer": net.layer,
            "grid": cfg.head_grid,
            "dim": cfg.head_dim,
            "power": cfg.head_power,
            "whiten": cfg.whiten,
            "pca_patches": cfg.pca_patches,
            "pca_source": cfg.pca_source,
            "explained_variance": round(explained, 4),
        },
        "flops_per_patch": count_flops(net.trunk, (1, cfg.patch_size, cfg.patch_size)),
        "training": {
            "command": "python -m exemplar_desc.train " + " ".join(shlex.quote(a) for a in argv),
            "resumed": resumed,
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
        },
    }


def _training_images(cfg: TrainConfig) -> tuple[list[Path] | np.ndarray, str]:
    """The image folders' photos, or STL-10's when there are none, and what they are."""
    images = [Path(folder) / name for folder in cfg.images for name in list_images(folder)]
    if images:
        return images, "image folders"
    return load_stl10_unlabeled(cfg.stl10, cfg.stl10_max_images), "STL-10 (96x96)"


def _magnification(
    cfg: TrainConfig, net: DescriptorNet, images: list[Path] | np.ndarray | None, source: str | None
) -> tuple[float, dict | None]:
    """--magnification, or the one tuned on the training photos (from :func:`_training_images`)."""
    if cfg.magnification is not None:
        return cfg.magnification, None
    magnification, tuning = tune_magnification(net, images, seed=cfg.seed)
    return magnification, {**tuning, "images": source}


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
    args = build_parser().parse_intermixed_args(argv)  # folders may come before and after options
    try:
        try:
            cfg = config_from_args(args, data=main_rank)
            check_number("--dist-timeout", args.dist_timeout, low=0, low_open=True)
            workdir = check_output_dir("--workdir", args.workdir)
            out_dir = check_output_dir("--out-dir", args.out_dir)
            dist = init_distributed(cfg.device, args.dist_timeout)
            result = train(cfg, workdir, resume=args.resume, dist=dist)
        finally:
            close_distributed()
    except TrainingInterrupted as err:
        if main_rank:
            print(f"interrupted by {err}", file=sys.stderr)
        return 128 + err.signum
    except (ValueError, FloatingPointError) as err:
        return report(err) if main_rank else 2
    except RuntimeError as err:
        if world_size_from_env() <= 1:
            raise
        # Usually another rank died and the collective operations lost it; torchrun's
        # summary names the rank that failed first.
        print(f"error: rank {rank_from_env()}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    if not main_rank:
        return 0
    net, explained = fit_head(result["model"], result["sampler"], cfg, result["device"], result["generator"])
    # Read once: STL-10's file may hold 100,000 images.
    needs_images = cfg.magnification is None or cfg.pca_source == "keypoints"
    images, source = _training_images(cfg) if needs_images else (None, None)
    magnification, tuning = _magnification(cfg, net, images, source)
    if cfg.pca_source == "keypoints":  # the magnification was tuned with the surrogate fit
        try:
            explained = fit_head_on_keypoints(net, images, magnification, cfg)
        except ValueError as err:
            return report(err)
    card = build_card(cfg, argv, args.resume, result, net, explained, magnification, tuning)
    last = result["log"][-1] if result["log"] else {}
    card_path = save_model(net, card, out_dir, args.name or cfg.arch)
    print(f"model written to {card_path} and {card_path.with_suffix('.pt')}")
    print(
        f"surrogate validation accuracy {last.get('val_accuracy', float('nan')):.3f} over {cfg.num_classes} classes; "
        f"magnification {magnification:g}; PCA keeps {explained:.1%} of the variance"
    )
    return 0


if __name__ == "__main__":
    # record: under torchrun, a failing rank's traceback appears in the job's error summary.
    raise SystemExit(record(main)())
