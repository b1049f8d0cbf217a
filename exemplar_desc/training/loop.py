"""The surrogate-class training loop of Exemplar-CNN.

Seed patches are sampled from unlabeled images (and/or STL-10's ``unlabeled_X.bin``); each
seed is a surrogate class. The network learns to classify random transformations of the
seeds (fresh samples every step, generated on the training device) with the paper's SGD
settings by default; a matching loss (:mod:`.losses`) also trains the distance between two
views of a seed. The settings are :class:`.config.TrainConfig`; the state and its
checkpoint :mod:`.checkpoint`. The command line is :mod:`exemplar_desc.train`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..atomic import atomic_write
from ..checks import OptionError, check, check_device
from ..distributed import Distributed
from ..images import gather_images
from ..networks import ExemplarClassifier, resolve_architecture
from .checkpoint import TrainState, read_checkpoint, restore_state, save_checkpoint
from .config import TrainConfig
from .head import uses_surrogates
from .init_model import init_trunk, load_init_model
from .losses import attach_matching_head, distillation_loss, hardest_triplet_loss, paired_class_ids, relational_distillation_loss
from .pairs import configured_pairs
from .schedule import SYNC_EVERY, RunClock, lr_at
from .seeds import seed_pool
from .signals import TrainingInterrupted, stop_on_signals
from .transforms import SurrogateSampler, sample_patches

logger = logging.getLogger(__name__)

__all__ = ["train", "train_step", "training_device"]

#: Surrogate samples a learned head that starts from no model fits its first PCA on.
HEAD_START_SAMPLES = 2048


def train(
    cfg: TrainConfig, workdir: Path, resume: bool = False, progress: bool = True, dist: Distributed | None = None,
    refit_head: bool = False, seeds: torch.Tensor | None = None,
) -> dict:
    """Run the surrogate-class training; returns a summary with the trained classifier.

    Writes ``workdir/checkpoint.pt`` every ``cfg.checkpoint_minutes`` and at each epoch's end,
    and ``workdir/log.json`` (one record per epoch). With ``resume``, continues from the
    checkpoint (same configuration required). Everything random follows ``cfg.seed``: on
    the CPU, one seed gives the same weights bit for bit (the network's initialisation and
    dropout draw from torch's global generator, seeded here and restored on return).

    Args:
        dist: this rank's place in a torchrun job (:func:`.distributed.init_distributed`),
            None for a single process. Every rank calls train(); rank 0 samples the seed
            patches (broadcast to the others), validates, logs and writes the files.
        refit_head: take no step: the summary holds the ``init`` model's trunk, for a new head
            on it, and the surrogate sampler only where that head's fit draws from it
            (:func:`.head.uses_surrogates`; else None, and no seeds are drawn); nothing is written.
        seeds: (cfg.num_classes, 3, cfg.context, cfg.context) uint8 RGB seed crops already drawn
            from ``cfg``'s data (rank 0's; :meth:`.seeds.SeedPool.choose`), so they are not drawn
            again; None: drawn here (:func:`.seeds.seed_pool`).

    Raises:
        OptionError: a bad setting or checkpoint to resume (``resume``), before any work;
            ``refit_head`` without an ``init`` model or with ``resume``; ``seeds`` of another shape or dtype.
        TrainingInterrupted: SIGINT or SIGTERM; a checkpoint was written first (by rank 0).
    """
    cfg.check(data=dist is None or dist.is_main)
    check(not refit_head or cfg.init is not None, "refit_head", refit_head, "a head refit keeps the trunk of an init model: name one")
    check(not (refit_head and resume), "refit_head", refit_head, "takes no training step, so there is no run to resume")
    check(not (refit_head and cfg.whitening == "learned"), "refit_head", refit_head,
          "takes no training step, so no head is learned: give whitening pca or pairs")
    shape = (cfg.num_classes, 3, cfg.context, cfg.context)
    check(seeds is None or (tuple(seeds.shape) == shape and seeds.dtype == torch.uint8), "seeds",
          None if seeds is None else f"{tuple(seeds.shape)} {seeds.dtype}", f"must be {shape} torch.uint8, the classes' context crops")
    device = dist.device if dist is not None else training_device(cfg.device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(cfg.seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(cfg.seed)
        return _train(cfg, device, workdir, resume, progress, dist, refit_head, seeds)


def training_device(name: str) -> torch.device:
    """The device a single-process run trains on, from ``TrainConfig.device``: ``auto`` is cuda when there is one.

    Raises:
        OptionError (``device``): a malformed name or a device this machine lacks.
    """
    return check_device("device", name, allow_auto=True) or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sampler(cfg: TrainConfig, device: torch.device, dist: Distributed | None, seeds: torch.Tensor | None) -> SurrogateSampler:
    """The surrogate classes of ``seeds``, or of seeds drawn here, rank 0's on every rank."""
    if dist is not None and not dist.is_main:
        contexts = torch.empty((cfg.num_classes, 3, cfg.context, cfg.context), dtype=torch.uint8, device=device)
    elif seeds is not None:
        contexts = seeds.to(device)
    else:
        started = time.time()
        contexts = seed_pool(cfg).choose(cfg.num_classes).to(device)
        logger.info("sampled %d seed patches in %.1f s", len(contexts), time.time() - started)
    if dist is not None:
        dist.broadcast_(contexts)
    return SurrogateSampler(contexts, cfg.transforms, cfg.patch_size, device)


def _train(
    cfg: TrainConfig, device: torch.device, workdir: Path, resume: bool, progress: bool, dist: Distributed | None, refit_head: bool,
    seeds: torch.Tensor | None,
) -> dict:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    main_rank = dist is None or dist.is_main
    checkpoint = read_checkpoint(workdir / "checkpoint.pt", cfg, dist) if resume else None
    started = time.time()
    # A head refit on the training photos alone draws no surrogate sample, so it needs no seeds.
    sampler = _sampler(cfg, device, dist, seeds) if not refit_head or uses_surrogates(cfg) else None
    state = _start_state(cfg, device, workdir, checkpoint, dist, sampler)

    validation = None
    if main_rank and not refit_head:
        # Held-out surrogate samples: fixed transformations, never trained on.
        val_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        val_y = torch.arange(cfg.num_classes, device=device).repeat(cfg.val_per_class)
        val_x = torch.cat([sample_patches(sampler, val_y[i : i + 4096], val_gen) for i in range(0, len(val_y), 4096)])
        validation = (val_x, val_y)
        workdir.mkdir(parents=True, exist_ok=True)

    if not refit_head:
        stop: dict = {}
        with stop_on_signals(stop):
            _run_steps(state, cfg, sampler, validation, workdir, checkpoint is not None and "model" not in checkpoint, progress, stop, dist)
    return {
        "model": state.model,
        "sampler": sampler,
        "generator": state.generator,
        "device": device,
        "trained_on": state.trained_on,
        "world_size": 1 if dist is None else dist.world_size,
        "arch": resolve_architecture(cfg.arch),
        "steps": state.step,
        "samples_seen": state.samples,
        "wall_time_s": state.elapsed,
        "seed_time_s": state.session_start - started,
        "log": state.log,
        "init": state.init,
        "refit_head": refit_head,
    }


def _start_state(
    cfg: TrainConfig, device: torch.device, workdir: Path, checkpoint: dict | None, dist: Distributed | None,
    sampler: SurrogateSampler | None,
) -> TrainState:
    """The classifier (fresh, from the init model, or from ``checkpoint``), its optimizer and the generators.

    ``sampler`` gives a fresh learned head its first samples (None: a head refit, which trains nothing).
    """
    world = 1 if dist is None else dist.world_size
    model = ExemplarClassifier(resolve_architecture(cfg.arch), cfg.num_classes, patch_size=cfg.patch_size)
    # A resumed run takes its weights from the checkpoint, never again from the init model.
    init = init_trunk(model, cfg.init) if cfg.init is not None and checkpoint is None else None
    if cfg.learned_head:
        # Samples for a fresh head's PCA, from a generator of their own: the training's draws stay the same.
        def start() -> torch.Tensor:
            ids = torch.arange(HEAD_START_SAMPLES, device=device) % sampler.num_classes
            return sample_patches(sampler, ids, torch.Generator(device=device).manual_seed(cfg.seed + 2))

        attach_matching_head(model, cfg, start if checkpoint is None and sampler is not None else None)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    network = model
    if dist is not None:
        network = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    state = TrainState(model, network, optimizer, gen, world * cfg.batch_size, trained_on=_device_description(device, world), init=init)
    if cfg.teacher is not None:
        teacher = load_init_model(cfg.teacher, option="teacher")[0].fuse_batch_norm()
        state.teacher = teacher.to(device).to(memory_format=torch.channels_last).requires_grad_(False)
    if cfg.photo_pairs and sampler is not None:
        state.photo_pairs = _photo_pairs(cfg, device)
    main_rank = dist is None or dist.is_main
    if checkpoint is not None:
        restore_state(state, checkpoint, workdir / "log.json", restore_generators=main_rank)
        logger.info("resumed from %s at step %d (%d samples)", workdir / "checkpoint.pt", state.step, state.samples)
    if not main_rank:
        # The rank draws its own transformations and dropout masks, never replayed after resuming.
        seed = int(np.random.SeedSequence((cfg.seed, dist.rank, state.step)).generate_state(1, dtype=np.uint64)[0] >> 1)
        gen.manual_seed(seed)
        (torch.cuda.default_generators[device.index] if device.type == "cuda" else torch.random.default_generator).manual_seed(seed)
    return state


def _photo_pairs(cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool of photo pairs of the triplet term or ``distill_photos`` (:func:`.pairs.configured_pairs`), on ``device``.

    Drawn with ``cfg.seed + 3``, so the photos and views differ from those of a pairs-whitening fit (``cfg.seed``).
    """
    started = time.time()
    images = gather_images(cfg.images)
    pairs = list(configured_pairs(images, cfg.magnification, cfg, cfg.seed + 3))
    if sum(len(a) for a, _ in pairs) < cfg.batch_size // 2:
        raise OptionError("pair_photos", cfg.pair_photos, f"the photos gave fewer positive pairs than the {cfg.batch_size // 2} a step takes")
    first, second = (torch.cat([pair[k] for pair in pairs]).to(device) for k in (0, 1))
    logger.info("%d positive photo pairs of %d photos in %.1f s", len(first),
                min(cfg.pair_photos, len(images)), time.time() - started)
    return first, second


def _device_description(device: torch.device, world_size: int = 1) -> str:
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    return name if world_size == 1 else f"{world_size} x {name}"


def _distill_targets(teacher: torch.nn.Module, batch: torch.Tensor, n: int, cfg: TrainConfig) -> torch.Tensor:
    """The teacher's descriptors that the student's rows of ``batch`` learn: its own of the n surrogate
    samples, and with ``distill_photos`` of the n / 2 photo patches and then of their views, or with
    ``distill_cross`` of the photo patches again (the view learns the undegraded patch's descriptor)."""
    with torch.no_grad():
        if not cfg.distill_photos:
            return teacher(batch[:n])
        if not cfg.distill_cross:
            return teacher(batch)
        target = teacher(batch[: n + n // 2])
        return torch.cat([target, target[n:]])


def train_step(state: TrainState, sampler: SurrogateSampler, cfg: TrainConfig, lr: float, amp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SGD step on ``cfg.batch_size`` fresh samples of this rank; nothing waits for the device.

    With a matching loss (``cfg.matching``) the batch holds two views of each of B/2 seeds,
    or with ``triplet_pairs`` photos B/2 photo pairs follow the B samples; with ``distill``
    the student learns the teacher's descriptors of the B samples, and with ``distill_photos``
    of B/2 photo pairs after them (:func:`_distill_targets`). Under DistributedDataParallel
    the backward pass averages the gradients over the ranks, so each step uses the global batch.

    Returns:
        (loss () float32, logits (B, num_classes), class ids (B,) int64), all on the training device.
    """
    device, n = state.generator.device, cfg.batch_size
    if cfg.paired_views:
        ids = paired_class_ids(sampler.num_classes, n, state.generator)
    else:
        ids = torch.randint(sampler.num_classes, (n,), generator=state.generator, device=device)
    x = sample_patches(sampler, ids, state.generator)
    batch = x
    if state.photo_pairs is not None:  # n / 2 photo pairs after the surrogate samples, in one pass (one batch-norm batch)
        pool_a, pool_b = state.photo_pairs
        k = torch.randint(len(pool_a), (n // 2,), generator=state.generator, device=device)
        batch = torch.cat([x, pool_a[k], pool_b[k]])
    batch = batch.contiguous(memory_format=torch.channels_last)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out = state.network(batch)
        logits = (out[0] if cfg.learned_head else out)[:n]
        # Without "softmax" in the loss, this term trains only the probe on detached features.
        loss = F.cross_entropy(logits.float(), ids)
        if cfg.matching:
            pairs = out[1][n:] if state.photo_pairs is not None else out[1]
            first, second = pairs.float().chunk(2)
            loss = loss + cfg.triplet_weight * hardest_triplet_loss(first, second, cfg.margin)
        if state.teacher is not None:
            target = _distill_targets(state.teacher, batch, n, cfg)
            loss = loss + distillation_loss(out[1][: len(target)], target)
            if cfg.distill_relation > 0:
                start = n if cfg.distill_photos else 0  # the photo pairs, else the surrogate views
                loss = loss + cfg.distill_relation * relational_distillation_loss(out[1][start:len(target)], target[start:], cfg.distill_temperature)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.step += 1
    state.samples += state.global_batch
    return loss.detach(), logits.detach(), ids


def _run_steps(
    state: TrainState,
    cfg: TrainConfig,
    sampler: SurrogateSampler,
    validation: tuple[torch.Tensor, torch.Tensor] | None,
    workdir: Path,
    trunk_only: bool,
    progress: bool,
    stop: dict,
    dist: Distributed | None,
) -> None:
    """The driver: train steps until the run is done, validating and checkpointing on the way (rank 0)."""
    ckpt_path, log_path = workdir / "checkpoint.pt", workdir / "log.json"
    main_rank = dist is None or dist.is_main
    here = _device_description(state.generator.device, 1 if dist is None else dist.world_size)
    amp = state.generator.device.type == "cuda"
    epoch_samples = cfg.num_classes * cfg.samples_per_class
    clock = RunClock(state, cfg, stop, dist)
    state.start_session()
    stopping = clock.sync()
    finished = clock.progress() >= 1.0
    if trunk_only and not finished:
        raise OptionError("resume", str(ckpt_path), "holds a finished run (trunk only); it cannot continue training")
    if not finished and state.trained_on.split(", then ")[-1] != here:
        state.trained_on = f"{state.trained_on}, then {here}"
    state.network.train()
    remaining = math.ceil(max(0, clock.total_samples - state.samples) / state.global_batch)
    bar = tqdm(total=state.step + remaining, initial=state.step, desc="training", unit="step", disable=not (progress and main_rank), dynamic_ncols=True)
    while not finished:
        epoch_before = state.samples // epoch_samples
        loss, logits, ids = train_step(state, sampler, cfg, lr_at(clock.progress(), cfg.lr), amp)
        if dist is None or state.step % SYNC_EVERY == 0:
            stopping = clock.sync()
        finished = clock.progress() >= 1.0
        bar.update(1)
        end_of_epoch = state.samples // epoch_samples > epoch_before or finished
        # Reading the loss waits for the device, so it is read every SYNC_EVERY-th step only.
        if main_rank and (state.step % SYNC_EVERY == 0 or end_of_epoch or state.loss_avg is None):
            state.update_averages(loss, logits, ids)
            bar.set_postfix(
                loss=f"{state.loss_avg:.3f}", acc=f"{state.acc_avg:.3f}", samples_s=f"{state.samples_per_second:.0f}",
                epoch=min(cfg.epochs, epoch_before + 1),
            )
        if main_rank and end_of_epoch:
            _end_epoch(state, *validation, amp, state.samples / epoch_samples, log_path)
            save_checkpoint(ckpt_path, state, cfg, final=finished)
            state.last_checkpoint = time.time()
        elif main_rank and (stopping is not None or time.time() - state.last_checkpoint > cfg.checkpoint_minutes * 60):
            save_checkpoint(ckpt_path, state, cfg)
            state.last_checkpoint = time.time()
        if stopping is not None and not finished:
            bar.close()
            raise TrainingInterrupted(stopping, ckpt_path, state.step)
    bar.close()


@torch.no_grad()
def _end_epoch(state: TrainState, val_x: torch.Tensor, val_y: torch.Tensor, amp: bool, epoch: float, log_path: Path) -> None:
    """Validate on the held-out samples, append the epoch's record to the log and write ``log_path``."""
    model = state.model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=val_x.device)
    for start in range(0, len(val_x), 1024):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(val_x[start : start + 1024])
        logits = logits[0] if isinstance(logits, tuple) else logits
        correct += (logits.argmax(1) == val_y[start : start + 1024]).sum()
    model.train()
    val_acc = int(correct) / max(1, len(val_x))  # one wait for the device, at the end
    record = {
        "epoch": round(epoch, 3),
        "step": state.step,
        "samples": state.samples,
        "train_loss": state.loss_avg,
        "train_accuracy": state.acc_avg,
        "val_accuracy": val_acc,
        "lr": state.optimizer.param_groups[0]["lr"],
        "elapsed_s": state.elapsed,
    }
    state.log.append(record)
    log = list(state.log)
    atomic_write(log_path, lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1) + "\n"))
    logger.info(
        "epoch %g: train loss %.3f, train acc %.3f, surrogate validation acc %.3f",
        record["epoch"], state.loss_avg, state.acc_avg, val_acc,
    )
