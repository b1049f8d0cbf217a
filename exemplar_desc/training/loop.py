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
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..atomic import atomic_write
from ..checks import OptionError, check, check_device, check_number
from ..images import list_images
from ..model_io import load_model, save_torch
from ..networks import ARCHITECTURES, Architecture, DescriptorNet, ExemplarClassifier, architecture_from_dict, resolve_architecture
from ..distributed import Distributed
from .seeds import PAPER_SEED_SCALES, iter_rgb_images, load_stl10_unlabeled, sample_seeds, stl10_image_count
from .transforms import SurrogateSampler, TransformConfig, sample_patches

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig", "TrainState", "TrainingInterrupted", "train", "train_step", "save_checkpoint", "load_checkpoint", "restore_state", "lr_at",
    "load_init_model", "architecture_option", "init_trunk", "PCA_SOURCES",
]

#: What the descriptor head's PCA is fitted on: fresh surrogate samples (transformed seed
#: patches), or patches at SIFT keypoints of the training images (exemplar_desc.training.head).
PCA_SOURCES = ("surrogate", "keypoints")

#: The official schedule, relative to the run's length: lr x1 for 1.2M of 1.56M iterations,
#: then x0.4, x0.1, x0.04, x0.01 in equal parts.
PAPER_LR_STEPS = ((0.0, 1.0), (0.77, 0.4), (0.83, 0.1), (0.89, 0.04), (0.94, 0.01))


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded in the checkpoint and the model card).

    ``init``: a shipped model name or a saved model's path (``.pt`` or ``.json``) whose conv
    trunk the run starts from (:func:`init_trunk`); ``arch`` must give the same architecture
    (:func:`architecture_option` names it).
    """

    images: tuple[str, ...] = ()
    stl10: str | None = None
    stl10_max_images: int | None = None
    max_side: int = 512
    arch: str = "fast"
    num_classes: int = 8000
    seeds_per_image: int = 40
    seed_scales: tuple[float, ...] = PAPER_SEED_SCALES
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
    pca_source: str = "surrogate"
    magnification: float | None = None
    init: str | None = None
    transforms: TransformConfig = TransformConfig()

    def check(self, data: bool = True) -> None:
        """Check every setting before any work is done.

        Args:
            data: also check the image folders and the STL-10 file (ranks > 0 of a
                distributed run do not read them, and their machine may not have them).

        Raises:
            OptionError: the first bad setting, named by its command-line option.
        """
        check(bool(self.images or self.stl10), "IMAGES", list(self.images), "no training data: give at least one image folder or --stl10 FILE")
        for folder in self.images if data else ():
            check(Path(folder).is_dir(), "IMAGES", folder, "not a folder")
            try:
                list_images(folder)
            except ValueError as err:
                raise OptionError("IMAGES", folder, str(err)) from None
        if self.stl10 is not None and data:
            try:
                stl10_image_count(self.stl10)
            except (FileNotFoundError, ValueError) as err:
                raise OptionError("--stl10", self.stl10, str(err)) from None
        if self.stl10_max_images is not None:
            check_number("--stl10-max-images", self.stl10_max_images, low=1, integer=True)
        check_number("--max-side", self.max_side, low=2 * self.patch_size, integer=True)
        try:
            arch = resolve_architecture(self.arch)
        except ValueError as err:
            raise OptionError("--arch", self.arch, f"{err}; named architectures: {', '.join(ARCHITECTURES)}") from None
        if self.init is not None:
            _, card = load_init_model(self.init)
            init_arch = architecture_from_dict(card["architecture"])
            check(
                arch == init_arch, "--arch", self.arch,
                f"--init {self.init} has the architecture {_describe(init_arch)}, not {_describe(arch)}; leave --arch out to take the model's",
            )
        check_number("--num-classes", self.num_classes, low=2, integer=True)
        check(
            len(self.seed_scales) > 0 and all(isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1 for v in self.seed_scales),
            "--seed-scales", ",".join(f"{v:g}" for v in self.seed_scales), "expected S1,S2,... with every 0 < S <= 1",
        )
        for option in ("seeds_per_image", "samples_per_class", "epochs", "batch_size", "pca_patches", "val_per_class"):
            check_number(_option_name(option), getattr(self, option), low=1, integer=True)
        check_number("--lr", self.lr, low=0, low_open=True)
        check_number("--momentum", self.momentum, low=0, high=1, high_open=True)
        check_number("--weight-decay", self.weight_decay, low=0)
        check_number("--seed", self.seed, low=0, integer=True)
        check_device("--device", self.device, allow_auto=True)
        if self.num_threads is not None:
            check_number("--threads", self.num_threads, low=1, integer=True)
        check_number("--checkpoint-minutes", self.checkpoint_minutes, low=0, low_open=True)
        if self.time_budget_minutes is not None:
            check_number("--time-budget", self.time_budget_minutes, low=0, low_open=True)
        layers = len(arch.convs)
        check_number("--head-layer", self.head_layer, low=-layers, high=layers - 1, integer=True)
        check_number("--head-grid", self.head_grid, low=1, integer=True)
        pooled = arch.convs[self.head_layer][0] * self.head_grid**2
        check_number("--head-dim", self.head_dim, low=1, high=pooled, integer=True)
        check_number("--head-power", self.head_power, low=0, low_open=True, high=1)
        check_number("--whiten", self.whiten, low=0, high=1)
        check(self.pca_source in PCA_SOURCES, "--pca-source", self.pca_source, f"expected one of {', '.join(PCA_SOURCES)}")
        if self.magnification is not None:
            check_number("--magnification", self.magnification, low=0, low_open=True)
        t = self.transforms
        for name in ("translation", "rotation", "hsv_add", "hue", "blur", "shading"):
            check_number(_option_name(name), getattr(t, name), low=0)
        for name in ("pca_colour", "hsv_power", "gamma"):
            check_number(_option_name(name), getattr(t, name), low=1)
        check_number("--shadow", t.shadow, low=0, high=1)
        check_number("--noise", t.noise, low=0, high=1)
        for name in ("scale", "hsv_multiply"):
            lo, hi = getattr(t, name)
            check(all(math.isfinite(v) for v in (lo, hi)) and 0 < lo <= hi, _option_name(name), f"{lo:g},{hi:g}", "expected MIN,MAX with 0 < MIN <= MAX")


def _describe(arch: Architecture) -> str:
    return f"{arch.spec} (pool after {arch.pool_after}, batch norm {'on' if arch.batch_norm else 'off'})"


def load_init_model(model: str) -> tuple[DescriptorNet, dict]:
    """The ``--init`` model (shipped name or ``.pt``/``.json`` path), its sha256 verified, on the CPU.

    Returns:
        (network, model card), as :func:`exemplar_desc.model_io.load_model` returns them.

    Raises:
        OptionError (``--init``): unknown name, missing file, or a corrupt or malformed model.
    """
    try:
        with torch.random.fork_rng(devices=[]):  # building the network draws random weights: leave the caller's stream alone
            return load_model(model)
    except (FileNotFoundError, ValueError) as err:
        raise OptionError("--init", model, str(err)) from None


def architecture_option(arch: Architecture) -> str | None:
    """The ``--arch`` value that gives ``arch``: its name in ARCHITECTURES, else its notation; None when neither does."""
    for name in (*ARCHITECTURES, arch.spec):
        if resolve_architecture(name) == arch:
            return name
    return None


def init_trunk(model: ExemplarClassifier, init: str) -> dict:
    """Copy the conv trunk of the ``--init`` model into ``model``'s (weights and batch-norm statistics).

    The fully connected layers and the surrogate classifier keep their fresh initialisation
    (a saved descriptor has neither). A saved descriptor keeps the convolutions up to its
    head layer only; later ones, if any, stay fresh too.

    Returns:
        The model card's ``training.init`` record: ``model`` (as given), ``sha256`` of its
        weights file, ``conv_layers`` (how many convolutions were copied, of how many).
    """
    net, card = load_init_model(init)
    copied = len(net.trunk.blocks)
    for block, source in zip(model.trunk.blocks, net.trunk.blocks):
        block.load_state_dict(source.state_dict())
    total = len(model.trunk.blocks)
    if copied < total:
        logger.warning("--init %s keeps %d of %d convolutions (up to its head layer); the others start fresh", init, copied, total)
    logger.info("trunk initialised from %s (sha256 %s...)", init, card["sha256"][:12])
    return {"model": init, "sha256": card["sha256"], "conv_layers": f"{copied} of {total}"}


def _option_name(field_name: str) -> str:
    """The command-line option of a TrainConfig or TransformConfig field."""
    special = {"images": "IMAGES", "num_threads": "--threads", "time_budget_minutes": "--time-budget"}
    return special.get(field_name, "--" + field_name.replace("_", "-"))


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the training after a checkpoint was written.

    Attributes:
        signum: the signal's number; checkpoint: the checkpoint's path; step: the steps done.
    """

    def __init__(self, signum: int, checkpoint: Path, step: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: checkpoint written to {checkpoint}; run the same command with --resume to continue")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


@contextmanager
def _stop_on_signals(stop: dict):
    """Turn SIGINT/SIGTERM into ``stop["signum"]`` (the loop checkpoints and stops); a second one ends at once.

    Handlers can only be set from the main thread; elsewhere the signals keep their handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if stop.get("signum") is not None:
            raise KeyboardInterrupt
        logger.warning("%s received: stopping after this step (in a distributed run, the next step the ranks agree on) "
                       "and writing a checkpoint", signal.Signals(signum).name)
        stop["signum"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def lr_at(progress: float, base_lr: float) -> float:
    """Learning rate at ``progress`` in [0, 1] of the run (the official step schedule, rescaled)."""
    factor = 1.0
    for start, value in PAPER_LR_STEPS:
        if progress >= start:
            factor = value
    return base_lr * factor


def _pick_device(name: str) -> torch.device:
    device = check_device("--device", name, allow_auto=True)
    return device or torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        scales=cfg.seed_scales,
        patch_size=cfg.patch_size,
        context=cfg.context,
        total=total,
    )


@torch.no_grad()
def _evaluate(model: ExemplarClassifier, val_x: torch.Tensor, val_y: torch.Tensor, batch: int, amp: bool) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=val_x.device)
    for start in range(0, len(val_x), batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(val_x[start : start + batch])
        correct += (logits.argmax(1) == val_y[start : start + batch]).sum()
    model.train()
    return int(correct) / max(1, len(val_x))  # one wait for the device, at the end


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of rank ``rank`` > 0 of a distributed run whose session starts at ``step``.

    The rank draws its own transformations and dropout masks, never replayed after --resume.
    """
    return int(np.random.SeedSequence((seed, rank, step)).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class TrainState:
    """Everything a run carries from step to step; the checkpoint holds all but the timing.

    Attributes:
        model: the classifier being trained (on the training device, channels-last).
        network: what the steps run: ``model``, or ``model`` in DistributedDataParallel.
        optimizer: SGD over ``model``'s parameters.
        generator: draws the class ids and transformations (on the training device).
        global_batch: samples per step over all ranks (world size x --batch-size).
        step: optimizer steps done, over all sessions of the run.
        samples: training samples seen over all sessions and ranks (progress is counted in
            samples, so a run may resume with another world size).
        elapsed_before: training seconds of the earlier sessions (``--resume``).
        time_progress: fraction of --time-budget used, as last agreed by the ranks.
        log: one record per finished epoch (``log.json``).
        trained_on: the device(s) that ran training steps, for the model card.
        session_start, session_first_samples: when and where this session began (samples/s).
        last_checkpoint: time.time() of the last checkpoint written in this session.
        loss_avg, acc_avg: running means of the training loss and surrogate accuracy (rank 0's batches).
        init: the ``--init`` record (:func:`init_trunk`), None for a run from random weights.
    """

    model: ExemplarClassifier
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    global_batch: int
    step: int = 0
    samples: int = 0
    elapsed_before: float = 0.0
    time_progress: float = 0.0
    log: list = field(default_factory=list)
    trained_on: str = ""
    session_start: float = field(default_factory=time.time)
    session_first_samples: int = 0
    last_checkpoint: float = field(default_factory=time.time)
    loss_avg: float | None = None
    acc_avg: float | None = None
    init: dict | None = None

    @property
    def elapsed(self) -> float:
        """Training seconds over all sessions of the run."""
        return self.elapsed_before + time.time() - self.session_start

    @property
    def samples_per_second(self) -> float:
        """Training samples per second in this session, over all ranks."""
        return (self.samples - self.session_first_samples) / max(1e-9, time.time() - self.session_start)

    def start_session(self) -> None:
        """Reset the session clocks (called when the training steps begin)."""
        self.session_start = self.last_checkpoint = time.time()
        self.session_first_samples = self.samples


def train_step(state: TrainState, sampler: SurrogateSampler, batch_size: int, lr: float, amp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SGD step on ``batch_size`` fresh samples of this rank; nothing waits for the device.

    Under DistributedDataParallel the backward pass averages the gradients over the ranks,
    so each step uses the global batch.

    Returns:
        (loss () float32, logits (B, num_classes), class ids (B,) int64), all on the training device.
    """
    device = state.generator.device
    ids = torch.randint(sampler.num_classes, (batch_size,), generator=state.generator, device=device)
    x = sample_patches(sampler, ids, state.generator).contiguous(memory_format=torch.channels_last)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        logits = state.network(x)
        loss = F.cross_entropy(logits.float(), ids)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.step += 1
    state.samples += state.global_batch
    return loss.detach(), logits.detach(), ids


def save_checkpoint(path: Path, state: TrainState, cfg: TrainConfig, final: bool = False) -> None:
    """Write the run's state to ``path`` atomically (readers never see half a checkpoint).

    A finished run (``final``) is only ever resumed to refit the head, which needs the conv
    trunk alone: its checkpoint drops the classifier and the optimizer state (~40x smaller).
    In a distributed run only rank 0 calls this: after each step every rank holds the same
    weights and optimizer state; the generators saved are rank 0's.
    """
    model = state.model
    weights = {"trunk": model.trunk.state_dict()} if final else {"model": model.state_dict(), "optimizer": state.optimizer.state_dict()}
    record = {
        **weights,
        "generator": state.generator.get_state(),
        "dropout_rng": _global_rng_state(state.generator.device),
        "step": state.step,
        "samples": state.samples,
        "elapsed": state.elapsed,
        "config": _config_record(cfg),
        "generator_device": state.generator.device.type,
        "device_name": state.trained_on,
        "init": state.init,
    }
    save_torch(path, record)


def load_checkpoint(path: Path, cfg: TrainConfig, device: torch.device) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` for ``cfg`` onto ``device``.

    Raises:
        OptionError (``--resume``): no checkpoint, an unreadable one, or one made with other
            training options (the message names each, with its old and new value).
    """
    if not path.is_file():
        raise OptionError("--resume", str(path), "no checkpoint there; start the run without --resume")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(checkpoint, dict) or not {"config", "step", "elapsed", "generator"} <= checkpoint.keys():
            raise ValueError("not a training checkpoint")
    except Exception:  # torch raises many types, with long messages, for truncated or foreign files
        raise OptionError(
            "--resume", str(path), "not a readable training checkpoint (truncated, corrupt or another kind of file); delete it to start again"
        ) from None
    # A setting newer than the checkpoint was at its default there.
    old, new = {**_config_record(TrainConfig()), **checkpoint["config"]}, _config_record(cfg)
    changed = [f"{_option_name(key)} {old.get(key)!r} -> {value!r}" for key, value in new.items() if key != "transforms" and old.get(key) != value]
    # A family newer than the checkpoint was at its default there (the identity).
    old_t = {**TransformConfig().to_dict(), **old.get("transforms", {})}
    changed += [f"{_option_name(key)} {old_t[key]!r} -> {value!r}" for key, value in new["transforms"].items() if old_t[key] != value]
    if changed:
        raise OptionError("--resume", str(path), f"made with other options: {'; '.join(changed)}; give the old values or another --workdir")
    return checkpoint


def _global_rng_state(device: torch.device) -> torch.Tensor:
    """State of torch's global generator for ``device`` (dropout draws from it)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def restore_state(state: TrainState, checkpoint: dict, log_path: Path, restore_generators: bool = True) -> None:
    """Put a checkpoint from :func:`load_checkpoint` into ``state`` (the log from ``log_path``).

    Args:
        restore_generators: False on ranks > 0 of a distributed run, which draw their own
            samples (the checkpoint holds rank 0's generators).
    """
    if "model" in checkpoint:
        state.model.load_state_dict(checkpoint["model"])
        state.optimizer.load_state_dict(checkpoint["optimizer"])
    else:  # a finished run's checkpoint
        state.model.trunk.load_state_dict(checkpoint["trunk"])
    here = state.generator.device.type
    generator_device = checkpoint.get("generator_device", here)
    if generator_device == here and restore_generators:
        state.generator.set_state(checkpoint["generator"].cpu())
        if "dropout_rng" in checkpoint:
            if here == "cuda":
                torch.cuda.set_rng_state(checkpoint["dropout_rng"].cpu(), state.generator.device)
            else:
                torch.set_rng_state(checkpoint["dropout_rng"].cpu())
    elif restore_generators:  # CPU and CUDA generators keep incompatible states: restart the stream from the seed
        logger.warning("checkpoint was made on %s, resuming on %s: random samples restart from --seed", generator_device, here)
    state.step, state.elapsed_before = checkpoint["step"], checkpoint["elapsed"]
    # Checkpoints from before distributed training counted steps of one process only.
    state.samples = checkpoint.get("samples", state.step * state.global_batch)
    state.trained_on = checkpoint.get("device_name", state.trained_on)
    state.init = checkpoint.get("init")
    state.log = json.loads(log_path.read_text()) if log_path.is_file() else []


def _device_description(device: torch.device, world_size: int = 1) -> str:
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    return name if world_size == 1 else f"{world_size} x {name}"


def train(cfg: TrainConfig, workdir: Path, resume: bool = False, progress: bool = True, dist: Distributed | None = None) -> dict:
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

    Raises:
        OptionError: a bad setting or ``--resume`` checkpoint, before any work.
        TrainingInterrupted: SIGINT or SIGTERM; a checkpoint was written first (by rank 0).
    """
    cfg.check(data=dist is None or dist.is_main)
    device = dist.device if dist is not None else _pick_device(cfg.device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(cfg.seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(cfg.seed)
        return _train(cfg, device, workdir, resume, progress, dist)


def _train(cfg: TrainConfig, device: torch.device, workdir: Path, resume: bool, progress: bool, dist: Distributed | None) -> dict:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    main_rank, world = dist is None or dist.is_main, 1 if dist is None else dist.world_size
    arch = resolve_architecture(cfg.arch)
    ckpt_path, log_path = workdir / "checkpoint.pt", workdir / "log.json"
    checkpoint = None
    if resume:  # rank 0 reads it; a checkpoint is small enough to send to the others
        checkpoint = _checkpoint_or_error(ckpt_path, cfg) if main_rank else None
        checkpoint = dist.broadcast_object(checkpoint) if dist is not None else checkpoint
        if isinstance(checkpoint, OptionError):
            raise checkpoint

    started = time.time()
    shape = (cfg.num_classes, 3, cfg.context, cfg.context)
    if main_rank:
        contexts = _load_seed_contexts(cfg, cfg.num_classes, np.random.default_rng(cfg.seed)).to(device)
        logger.info("sampled %d seed patches in %.1f s", len(contexts), time.time() - started)
    else:
        contexts = torch.empty(shape, dtype=torch.uint8, device=device)
    if dist is not None:
        dist.broadcast_(contexts)
    sampler = SurrogateSampler(contexts, cfg.transforms, cfg.patch_size, device)

    model = ExemplarClassifier(arch, cfg.num_classes, patch_size=cfg.patch_size)
    # A resumed run takes its weights from the checkpoint, never again from --init.
    init = init_trunk(model, cfg.init) if cfg.init is not None and checkpoint is None else None
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    network = model
    if dist is not None:
        network = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    state = TrainState(model, network, optimizer, gen, world * cfg.batch_size, trained_on=_device_description(device, world), init=init)
    if checkpoint is not None:
        restore_state(state, checkpoint, log_path, restore_generators=main_rank)
        logger.info("resumed from %s at step %d (%d samples)", ckpt_path, state.step, state.samples)
    if not main_rank:
        seed = _rank_seed(cfg.seed, dist.rank, state.step)
        gen.manual_seed(seed)
        (torch.cuda.default_generators[device.index] if device.type == "cuda" else torch.random.default_generator).manual_seed(seed)

    validation = None
    if main_rank:
        # Held-out surrogate samples: fixed transformations, never trained on.
        val_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        val_y = torch.arange(cfg.num_classes, device=device).repeat(cfg.val_per_class)
        val_x = torch.cat([sample_patches(sampler, val_y[i : i + 4096], val_gen) for i in range(0, len(val_y), 4096)])
        validation = (val_x, val_y)
        workdir.mkdir(parents=True, exist_ok=True)

    stop: dict = {}
    with _stop_on_signals(stop):
        _run_steps(state, cfg, sampler, validation, workdir, checkpoint is not None and "model" not in checkpoint, progress, stop, dist)
    return {
        "model": model,
        "sampler": sampler,
        "generator": gen,
        "device": device,
        "trained_on": state.trained_on,
        "world_size": world,
        "arch": arch,
        "steps": state.step,
        "samples_seen": state.samples,
        "wall_time_s": state.elapsed,
        "seed_time_s": state.session_start - started,
        "log": state.log,
        "init": state.init,
    }


def _checkpoint_or_error(path: Path, cfg: TrainConfig) -> dict | OptionError:
    """:func:`load_checkpoint` on the CPU, returning its OptionError instead of raising it (to broadcast it)."""
    try:
        return load_checkpoint(path, cfg, torch.device("cpu"))
    except OptionError as err:
        return err


#: In a distributed run the ranks agree every this many steps on whether the time budget is
#: spent and whether to stop on a signal (one all-reduce; the steps in between need no agreement).
SYNC_EVERY = 10


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
    device = state.generator.device
    main_rank = dist is None or dist.is_main
    here = _device_description(device, 1 if dist is None else dist.world_size)
    amp = device.type == "cuda"
    epoch_samples = cfg.num_classes * cfg.samples_per_class
    total_samples = epoch_samples * cfg.epochs
    budget_s = None if cfg.time_budget_minutes is None else cfg.time_budget_minutes * 60

    def sync() -> int | None:
        """Update the time used; return the signal to stop on (None: go on).

        Every rank must take the same lr and stop at the same step, so in a distributed run
        the ranks agree on both: rank 0's clock rules, and a signal any rank has received
        stops them all (torchrun passes a signal on to every rank, but each gets it at its
        own step, and a rank that stopped alone would leave the others waiting for it).
        """
        used = state.elapsed / budget_s if budget_s is not None and main_rank else 0.0
        signum = float(stop.get("signum") or 0)
        if dist is not None:
            used, signum = dist.max([used, signum])
        if budget_s is not None:
            state.time_progress = used
        return int(signum) or None

    def progress_of() -> float:
        """Fraction of the run done: by samples, or by wall time when a time budget is set."""
        return min(max(state.samples / total_samples, state.time_progress), 1.0)

    state.start_session()
    stopping = sync()
    finished = progress_of() >= 1.0
    if trunk_only and not finished:
        raise ValueError(f"--resume: {ckpt_path} holds a finished run (trunk only); it cannot continue training")
    if not finished and state.trained_on.split(", then ")[-1] != here:
        state.trained_on = f"{state.trained_on}, then {here}"
    state.network.train()
    remaining = math.ceil(max(0, total_samples - state.samples) / state.global_batch)
    bar = tqdm(total=state.step + remaining, initial=state.step, desc="training", unit="step", disable=not (progress and main_rank), dynamic_ncols=True)
    while not finished:
        epoch_before = state.samples // epoch_samples
        loss, logits, ids = train_step(state, sampler, cfg.batch_size, lr_at(progress_of(), cfg.lr), amp)
        if dist is None or state.step % SYNC_EVERY == 0:
            stopping = sync()
        finished = progress_of() >= 1.0
        bar.update(1)
        end_of_epoch = state.samples // epoch_samples > epoch_before or finished
        # Reading the loss waits for the device, so it is read every SYNC_EVERY-th step only.
        if main_rank and (state.step % SYNC_EVERY == 0 or end_of_epoch or state.loss_avg is None):
            _update_averages(state, loss, logits, ids)
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


def _update_averages(state: TrainState, loss: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> None:
    """Fold one step's loss and accuracy into the running means (one wait for the device)."""
    loss_value, acc = torch.stack([loss.float(), (logits.argmax(1) == ids).float().mean()]).tolist()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"training diverged at step {state.step} (loss {loss_value}); lower --lr")
    state.loss_avg = loss_value if state.loss_avg is None else 0.8 * state.loss_avg + 0.2 * loss_value
    state.acc_avg = acc if state.acc_avg is None else 0.8 * state.acc_avg + 0.2 * acc


def _end_epoch(state: TrainState, val_x: torch.Tensor, val_y: torch.Tensor, amp: bool, epoch: float, log_path: Path) -> None:
    """Validate, append the epoch's record to the log and write ``log_path``."""
    val_acc = _evaluate(state.model, val_x, val_y, 1024, amp)
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


def _config_record(cfg: TrainConfig) -> dict:
    """JSON-able record of the settings that must match for --resume (those that shape the training)."""
    # The head and the magnification are fitted after training: a finished run can be
    # resumed to refit them with other options.
    ignored = ("transforms", "device", "num_threads", "checkpoint_minutes", "head_layer", "head_grid", "head_dim",
               "head_power", "whiten", "pca_patches", "pca_source", "magnification")
    record = {k: v for k, v in vars(cfg).items() if k not in ignored}
    record["images"], record["seed_scales"] = list(record["images"]), list(record["seed_scales"])
    record["transforms"] = cfg.transforms.to_dict()
    return json.loads(json.dumps(record))


