"""Unsupervised Exemplar-CNN training: ``python -m exemplar_desc.train IMAGES [options]``.

1. Sample seed patches from unlabeled images (and/or STL-10's ``unlabeled_X.bin``); each
   seed is a surrogate class.
2. Train the network to classify random transformations of the seeds (fresh samples each
   epoch, generated on the training device), with the paper's SGD settings by default.
3. Fit the descriptor head (PCA) on fresh unlabeled patches, choose the patch
   magnification on synthetic warps of training images, and write the model and its card
   into ``--out-dir`` (default ``weights/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .atomic import atomic_write
from .magnification import tune_magnification
from .model_io import save_model
from .networks import DescriptorNet, ExemplarClassifier, count_flops, resolve_architecture
from .patches import normalize_patches
from .seeds import iter_rgb_images, list_images, load_stl10_unlabeled, sample_seeds
from .transforms import FAMILIES, SurrogateSampler, TransformConfig

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train", "lr_at", "fit_head", "main"]

#: The official schedule, relative to the run's length: lr x1 for 1.2M of 1.56M iterations,
#: then x0.4, x0.1, x0.04, x0.01 in equal parts.
PAPER_LR_STEPS = ((0.0, 1.0), (0.77, 0.4), (0.83, 0.1), (0.89, 0.04), (0.94, 0.01))


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded in the checkpoint and the model card)."""

    images: tuple[str, ...] = ()
    stl10: str | None = None
    stl10_max_images: int | None = None
    max_side: int = 512
    arch: str = "fast"
    num_classes: int = 8000
    seeds_per_image: int = 40
    samples_per_class: int = 100
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.004
    patch_size: int = 32
    context: int = 80
    val_per_class: int = 1
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    checkpoint_minutes: float = 5.0
    time_budget_minutes: float | None = None
    head_layer: int = -1
    head_grid: int = 4
    head_dim: int = 128
    head_power: float = 0.5
    whiten: float = 0.25
    pca_patches: int = 20000
    magnification: float | None = None
    transforms: TransformConfig = TransformConfig()


def lr_at(progress: float, base_lr: float) -> float:
    """Learning rate at ``progress`` in [0, 1] of the run (the official step schedule, rescaled)."""
    factor = 1.0
    for start, value in PAPER_LR_STEPS:
        if progress >= start:
            factor = value
    return base_lr * factor


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    return device


def _load_seed_contexts(cfg: TrainConfig, num: int, rng: np.random.Generator) -> torch.Tensor:
    """(num, 3, context, context) uint8 seed crops from the image folders and STL-10."""
    sources: list[tuple[object, int]] = []
    for folder in cfg.images:
        paths = list_images(folder)
        sources.append((iter_rgb_images(paths, cfg.max_side), len(paths)))
    if cfg.stl10:
        stl = load_stl10_unlabeled(cfg.stl10, cfg.stl10_max_images)
        sources.append((iter(stl), len(stl)))
    if not sources:
        raise ValueError("no training data: give at least one image folder or --stl10 FILE")
    total = sum(n for _, n in sources)

    def chained():
        for iterator, _ in sources:
            yield from iterator

    return sample_seeds(
        chained(),
        num,
        rng,
        per_image=cfg.seeds_per_image,
        patch_size=cfg.patch_size,
        context=cfg.context,
        total=total,
    )


def _samples(sampler: SurrogateSampler, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return normalize_patches(sampler.sample(ids, gen))


@torch.no_grad()
def _evaluate(model: ExemplarClassifier, val_x: torch.Tensor, val_y: torch.Tensor, batch: int, amp: bool) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(val_x), batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(val_x[start : start + batch])
        correct += int((logits.argmax(1) == val_y[start : start + batch]).sum())
    model.train()
    return correct / max(1, len(val_x))


def fit_head(
    classifier: ExemplarClassifier, sampler: SurrogateSampler, cfg: TrainConfig, device: torch.device, gen: torch.Generator
) -> tuple[DescriptorNet, float]:
    """Build the descriptor network from a trained classifier and fit its PCA on fresh samples.

    Returns:
        (descriptor network on the CPU in eval mode, fraction of variance the kept components explain).
    """
    arch = classifier.trunk.arch
    net = DescriptorNet(arch, cfg.head_layer, cfg.head_grid, cfg.head_dim, cfg.head_power)
    net.trunk.load_state_dict(classifier.trunk.state_dict(), strict=False)
    net = net.to(device).eval()
    pooled = []
    with torch.no_grad():
        for start in range(0, cfg.pca_patches, 1024):
            count = min(1024, cfg.pca_patches - start)
            ids = torch.randint(sampler.num_classes, (count,), generator=gen, device=gen.device)
            pooled.append(net.head.pool(net.features(_samples(sampler, ids, gen))).cpu())
    ratio = net.head.fit(torch.cat(pooled), whiten=cfg.whiten)
    return net.cpu(), float(ratio.sum())


def _save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def train(cfg: TrainConfig, workdir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Run the surrogate-class training; returns a summary with the trained classifier.

    Writes ``workdir/checkpoint.pt`` every ``cfg.checkpoint_minutes`` and at each epoch's end,
    and ``workdir/log.json`` (one record per epoch). With ``resume``, continues from the
    checkpoint (same configuration required).
    """
    device = _pick_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    arch = resolve_architecture(cfg.arch)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = workdir / "checkpoint.pt", workdir / "log.json"

    rng = np.random.default_rng(cfg.seed)
    started = time.time()
    contexts = _load_seed_contexts(cfg, cfg.num_classes, rng)
    logger.info("sampled %d seed patches in %.1f s", len(contexts), time.time() - started)
    sampler = SurrogateSampler(contexts, cfg.transforms, cfg.patch_size, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    # Held-out surrogate samples: fixed transformations, never trained on.
    val_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    val_y = torch.arange(cfg.num_classes, device=device).repeat(cfg.val_per_class)
    val_x = torch.cat([_samples(sampler, val_y[i : i + 4096], val_gen) for i in range(0, len(val_y), 4096)])

    model = ExemplarClassifier(arch, cfg.num_classes, patch_size=cfg.patch_size).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    amp = device.type == "cuda"
    steps_per_epoch = math.ceil(cfg.num_classes * cfg.samples_per_class / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    budget_s = None if cfg.time_budget_minutes is None else cfg.time_budget_minutes * 60

    def progress_of(step_count: int) -> float:
        """Fraction of the run done: by steps, or by wall time when a time budget is set."""
        done = step_count / total_steps
        if budget_s is not None:
            done = max(done, (elapsed_before + time.time() - t0) / budget_s)
        return min(done, 1.0)
    step, log, elapsed_before = 0, [], 0.0
    here = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    device_name = here  # the device(s) that ran training steps, for the model card
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if any(state["config"].get(key) != value for key, value in _config_record(cfg).items()):
            raise ValueError(f"--resume: {ckpt_path} was made with a different configuration")
        if "model" in state:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        else:  # a finished run's checkpoint
            model.trunk.load_state_dict(state["trunk"])
        generator_device = state.get("generator_device", device.type)
        if generator_device == device.type:
            gen.set_state(state["generator"].cpu())
        else:  # CPU and CUDA generators keep incompatible states: restart the stream from the seed
            logger.warning("checkpoint was made on %s, resuming on %s: random samples restart from --seed", generator_device, device.type)
        step, elapsed_before = state["step"], state["elapsed"]
        device_name = state.get("device_name", device_name)
        log = json.loads(log_path.read_text()) if log_path.is_file() else []
        logger.info("resumed from %s at step %d", ckpt_path, step)

    def checkpoint(final: bool = False) -> None:
        # A finished run is only ever resumed to refit the head, which needs the conv trunk
        # alone: its checkpoint drops the classifier and the optimizer state (~40x smaller).
        weights = {"trunk": model.trunk.state_dict()} if final else {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        _save_checkpoint(
            ckpt_path,
            {
                **weights,
                "generator": gen.get_state(),
                "step": step,
                "elapsed": elapsed_before + time.time() - t0,
                "config": _config_record(cfg),
                "generator_device": device.type,
                "device_name": device_name,
            },
        )

    t0 = time.time()
    last_ckpt, first_step = time.time(), step
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
    loss_avg = acc_avg = None
    finished = progress_of(step) >= 1.0
    if resume and not finished and "model" not in state:
        raise ValueError(f"--resume: {ckpt_path} holds a finished run (trunk only); it cannot continue training")
    if not finished and here not in device_name:
        device_name = f"{device_name}, then {here}"
    while not finished:
        epoch = step // steps_per_epoch
        ids = torch.randint(cfg.num_classes, (cfg.batch_size,), generator=gen, device=device)
        x = _samples(sampler, ids, gen).contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress_of(step), cfg.lr)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        finished = progress_of(step) >= 1.0
        bar.update(1)
        end_of_epoch = step % steps_per_epoch == 0 or finished
        # Reading the loss waits for the device, so it is read every 10th step only.
        if step % 10 == 0 or end_of_epoch or loss_avg is None:
            loss_value, acc = float(loss.detach()), float((logits.argmax(1) == ids).float().mean())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training diverged at step {step} (loss {loss_value}); lower --lr")
            loss_avg = loss_value if loss_avg is None else 0.8 * loss_avg + 0.2 * loss_value
            acc_avg = acc if acc_avg is None else 0.8 * acc_avg + 0.2 * acc
            rate = (step - first_step) * cfg.batch_size / max(1e-9, time.time() - t0)
            bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc_avg:.3f}", samples_s=f"{rate:.0f}", epoch=epoch + 1)
        if end_of_epoch:
            val_acc = _evaluate(model, val_x, val_y, 1024, amp)
            record = {
                "epoch": round(step / steps_per_epoch, 3),
                "step": step,
                "train_loss": loss_avg,
                "train_accuracy": acc_avg,
                "val_accuracy": val_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "elapsed_s": elapsed_before + time.time() - t0,
            }
            log.append(record)
            atomic_write(log_path, lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1) + "\n"))
            logger.info(
                "epoch %g: train loss %.3f, train acc %.3f, surrogate validation acc %.3f",
                record["epoch"], loss_avg, acc_avg, val_acc,
            )
            checkpoint(final=finished)
            last_ckpt = time.time()
        elif time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    bar.close()
    return {
        "model": model,
        "sampler": sampler,
        "generator": gen,
        "device": device,
        "trained_on": device_name,
        "arch": arch,
        "steps": step,
        "samples_seen": step * cfg.batch_size,
        "wall_time_s": elapsed_before + time.time() - t0,
        "seed_time_s": t0 - started,
        "log": log,
    }


def _config_record(cfg: TrainConfig) -> dict:
    """JSON-able record of the settings that must match for --resume (those that shape the training)."""
    # The head and the magnification are fitted after training: a finished run can be
    # resumed to refit them with other options.
    ignored = ("transforms", "device", "num_threads", "checkpoint_minutes", "head_layer", "head_grid", "head_dim",
               "head_power", "whiten", "pca_patches", "magnification")
    record = {k: v for k, v in vars(cfg).items() if k not in ignored}
    record["images"] = list(record["images"])
    record["transforms"] = cfg.transforms.to_dict()
    return json.loads(json.dumps(record))


def _parse_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    try:
        pair = (float(lo), float(hi))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}") from err
    if pair[0] > pair[1] or pair[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX, got {text!r}")
    return pair


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    t = TransformConfig()
    p = argparse.ArgumentParser(
        prog="python -m exemplar_desc.train",
        description="Train an Exemplar-CNN descriptor without labels on any folder of images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("images", nargs="*", help="folders of unlabeled images (searched recursively)")
    p.add_argument("--stl10", help="STL-10 unlabeled_X.bin (96x96x3 uint8, column-major)")
    p.add_argument("--stl10-max-images", type=int, help="use only the first N STL-10 images")
    p.add_argument("--max-side", type=int, default=d.max_side, help="downscale images to this longer side first (pixels)")
    p.add_argument("--arch", default=d.arch, help="named architecture (fast, exemplar-nips, ...) or notation like 64c5-128c5-256c5-512f")
    p.add_argument("--num-classes", type=int, default=d.num_classes, help="surrogate classes (seed patches)")
    p.add_argument("--seeds-per-image", type=int, default=d.seeds_per_image, help="seed candidates per image")
    p.add_argument("--samples-per-class", type=int, default=d.samples_per_class, help="samples per class per epoch")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="base learning rate (official step schedule)")
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
    p.add_argument("--out-dir", default="weights", help="where the model and its card are written")
    p.add_argument("--name", help="model name (default: the architecture name)")
    p.add_argument("--head-layer", type=int, default=d.head_layer, help="conv layer of the descriptor (0-based, -1 = last)")
    p.add_argument("--head-grid", type=int, default=d.head_grid, help="max-pooling grid of the descriptor")
    p.add_argument("--head-dim", type=int, default=d.head_dim, help="descriptor dimension after PCA")
    p.add_argument("--head-power", type=float, default=d.head_power, help="exponent in (0, 1] on the pooled features before the PCA (0.5: square root, 1: none)")
    p.add_argument("--whiten", type=float, default=d.whiten, help="PCA whitening exponent in [0, 1]: component k divided by sqrt(eigenvalue_k)^W (0: none, 1: full)")
    p.add_argument("--pca-patches", type=int, default=d.pca_patches, help="fresh patches the PCA is fitted on")
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
    g.add_argument("--without", nargs="+", default=[], choices=FAMILIES, metavar="FAMILY", help=f"switch families off: {', '.join(FAMILIES)}")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed command-line arguments, with checks that name the bad option."""
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
    ).without(*args.without)
    if transforms.pca_colour < 1 or transforms.hsv_power < 1:
        raise ValueError("--pca-colour and --hsv-power must be >= 1 (1 switches them off)")
    if min(transforms.translation, transforms.rotation, transforms.hsv_add, transforms.hue, transforms.blur) < 0:
        raise ValueError("transformation ranges must be non-negative")
    if not 0 < args.head_power <= 1:
        raise ValueError(f"--head-power must be in (0, 1], got {args.head_power}")
    if not 0 <= args.whiten <= 1:
        raise ValueError(f"--whiten must be in [0, 1], got {args.whiten}")
    for name in ("num_classes", "samples_per_class", "epochs", "batch_size", "pca_patches", "seeds_per_image"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    fields = {k: getattr(args, k) for k in vars(TrainConfig()) if hasattr(args, k) and k not in ("images", "transforms")}
    return TrainConfig(images=tuple(args.images), transforms=transforms, **fields)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = train(cfg, Path(args.workdir), resume=args.resume)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    net, explained = fit_head(result["model"], result["sampler"], cfg, result["device"], result["generator"])
    if cfg.magnification is None:
        paths = [p for folder in cfg.images for p in list_images(folder)]
        magnification, tuning = tune_magnification(net, paths, seed=cfg.seed)
    else:
        magnification, tuning = cfg.magnification, None
    name = args.name or cfg.arch
    last = result["log"][-1] if result["log"] else {}
    card = {
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
            "explained_variance": round(explained, 4),
        },
        "flops_per_patch": count_flops(net.trunk, (1, cfg.patch_size, cfg.patch_size)),
        "training": {
            "command": "python -m exemplar_desc.train " + " ".join(shlex.quote(a) for a in argv),
            "resumed": args.resume,
            "data": {"image_folders": list(cfg.images), "stl10": cfg.stl10},
            "num_classes": cfg.num_classes,
            "samples_per_class_per_epoch": cfg.samples_per_class,
            "epochs": cfg.epochs,
            "time_budget_minutes": cfg.time_budget_minutes,
            "steps": result["steps"],
            "samples_seen": result["samples_seen"],
            "batch_size": cfg.batch_size,
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
        },
    }
    card_path = save_model(net, card, args.out_dir, name)
    print(f"model written to {card_path} and {card_path.with_suffix('.pt')}")
    print(
        f"surrogate validation accuracy {last.get('val_accuracy', float('nan')):.3f} over {cfg.num_classes} classes; "
        f"magnification {magnification:g}; PCA keeps {explained:.1%} of the variance"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
