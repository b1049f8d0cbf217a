"""The surrogate-class training loop of Exemplar-CNN.

Seed patches are sampled from unlabeled images (and/or STL-10's ``unlabeled_X.bin``); each
seed is a surrogate class. The network learns to classify random transformations of the
seeds (fresh samples every step, generated on the training device) with the paper's SGD
settings by default. The command line is :mod:`exemplar_desc.train`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..atomic import atomic_write
from ..images import list_images
from ..networks import ExemplarClassifier, resolve_architecture
from .seeds import iter_rgb_images, load_stl10_unlabeled, sample_seeds
from .transforms import SurrogateSampler, TransformConfig, sample_patches

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train", "lr_at"]

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
        paths = [Path(folder) / name for name in list_images(folder)]
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
    val_x = torch.cat([sample_patches(sampler, val_y[i : i + 4096], val_gen) for i in range(0, len(val_y), 4096)])

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
        x = sample_patches(sampler, ids, gen).contiguous(memory_format=torch.channels_last)
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


