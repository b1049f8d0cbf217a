"""The state a training run carries from step to step, and its checkpoint (``checkpoint.pt``).

A checkpoint holds the weights (the whole classifier and the optimizer state while the run
goes on; the conv trunk alone once it is finished), every random generator, the counters,
and the record of the settings that must match for the run to be resumed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checks import OptionError
from ..distributed import Distributed
from ..model_io import save_torch
from ..networks import ExemplarClassifier
from .config import TrainConfig
from .transforms import TransformConfig

logger = logging.getLogger(__name__)

__all__ = ["TrainState", "CheckpointMismatch", "save_checkpoint", "load_checkpoint", "read_checkpoint", "restore_state", "config_record"]

#: The head's form, which shapes the training when a loss on descriptors trains through the head.
HEAD_FORM = ("head_layer", "head_grid", "head_dim", "head_power", "head_pooling")
#: What makes the pool of photo pairs (triplet term or distill_photos): the patches and the pairs' views.
PHOTO_POOL = ("magnification", "min_patch_side", "pair_photos", "pair_views", "pair_noise", "pair_jpeg", "pair_shading")
#: Settings a run may change when it resumes: the machine's, and the head and magnification,
#: which are fitted after training (a finished run is resumed to refit them).
RESUME_FREE = ("device", "num_threads", "checkpoint_minutes", *HEAD_FORM, "whiten", "pca_patches", "pca_source", "whitening",
               *PHOTO_POOL, "pair_shrinkage", "pair_emphasis", "pair_tune_steps", "pair_temperature")


@dataclass
class TrainState:
    """Everything a run carries from step to step; the checkpoint holds all but the timing.

    Attributes:
        model: the classifier being trained (on the training device, channels-last).
        network: what the steps run: ``model``, or ``model`` in DistributedDataParallel.
        optimizer: SGD over ``model``'s parameters.
        generator: draws the class ids and transformations (on the training device).
        global_batch: samples per step over all ranks (world size x batch size).
        step: optimizer steps done, over all sessions of the run.
        samples: training samples seen over all sessions and ranks (progress is counted in
            samples, so a run may resume with another world size).
        elapsed_before: training seconds of the earlier sessions (resumed runs).
        time_progress: fraction of the time budget used, as last agreed by the ranks.
        log: one record per finished epoch (``log.json``).
        trained_on: the device(s) that ran training steps, for the model card.
        session_start, session_first_samples: when and where this session began (samples/s).
        last_checkpoint: time.time() of the last checkpoint written in this session.
        loss_avg, acc_avg: running means of the training loss and surrogate accuracy (rank 0's batches).
        init: the init model's record (:func:`.init_model.init_trunk`), None for a run from random weights.
        teacher: the loss distill's teacher (eval mode, on the training device; its name is in
            the configuration, so a resumed run loads it again), else None.
        photo_pairs: the pool of positive pairs with ``triplet_pairs`` photos or ``distill_photos``: two
            (K, 1, P, P) standardised patch batches on the training device (made again on resuming), else None.
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
    teacher: torch.nn.Module | None = None
    photo_pairs: tuple[torch.Tensor, torch.Tensor] | None = None

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

    def update_averages(self, loss: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """Fold one step's loss and accuracy into the running means (one wait for the device)."""
        loss_value, acc = torch.stack([loss.float(), (logits.argmax(1) == ids).float().mean()]).tolist()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training diverged at step {self.step} (loss {loss_value}); lower the learning rate")
        self.loss_avg = loss_value if self.loss_avg is None else 0.8 * self.loss_avg + 0.2 * loss_value
        self.acc_avg = acc if self.acc_avg is None else 0.8 * self.acc_avg + 0.2 * acc


class CheckpointMismatch(OptionError):
    """A checkpoint made with other settings than the run that would resume it (``option`` ``"resume"``).

    Attributes:
        changed: (setting, checkpoint's value, this run's value) for each setting that differs;
            a setting is a TrainConfig field or a transformation family.
    """

    def __init__(self, path: str, changed: list[tuple[str, Any, Any]], names: dict[str, str] | None = None) -> None:
        self.changed, self.names = changed, names or {}
        listed = "; ".join(f"{self.names.get(key, key)} {old!r} -> {new!r}" for key, old, new in changed)
        super().__init__("resume", path, f"made with other options: {listed}; give the old values or another {self.names.get('workdir', 'workdir')}")

    def named(self, names: dict[str, str]) -> "CheckpointMismatch":
        """The same error, each setting (and ``workdir``) under its name in ``names`` (e.g. its command-line flag)."""
        return CheckpointMismatch(self.value, self.changed, names)

    def __reduce__(self):  # pickled to the other ranks of a distributed run
        return CheckpointMismatch, (self.value, self.changed, self.names)


def config_record(cfg: TrainConfig) -> dict:
    """JSON-able record of the settings that must match for a resumed run (those that shape the training)."""
    free = set(RESUME_FREE) - set(HEAD_FORM if cfg.learned_head else ()) - set(PHOTO_POOL if cfg.photo_pairs else ())
    record = {k: v for k, v in vars(cfg).items() if k not in free and k != "transforms"}
    record["images"], record["seed_scales"] = list(record["images"]), list(record["seed_scales"])
    record["transforms"] = cfg.transforms.to_dict()
    return json.loads(json.dumps(record))


def _global_rng_state(device: torch.device) -> torch.Tensor:
    """State of torch's global generator for ``device`` (dropout draws from it)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


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
        "config": config_record(cfg),
        "generator_device": state.generator.device.type,
        "device_name": state.trained_on,
        "init": state.init,
    }
    save_torch(path, record)


def load_checkpoint(path: Path, cfg: TrainConfig, device: torch.device) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` for ``cfg`` onto ``device``.

    Raises:
        OptionError (``resume``): no checkpoint, or an unreadable one.
        CheckpointMismatch: one made with other training settings (each named, with its old and new value).
    """
    if not path.is_file():
        raise OptionError("resume", str(path), "no checkpoint there; start a new run instead of resuming")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(checkpoint, dict) or not {"config", "step", "elapsed", "generator"} <= checkpoint.keys():
            raise ValueError("not a training checkpoint")
    except Exception:  # torch raises many types, with long messages, for truncated or foreign files
        raise OptionError(
            "resume", str(path), "not a readable training checkpoint (truncated, corrupt or another kind of file); delete it to start again"
        ) from None
    # A setting newer than the checkpoint was at its default there.
    old, new = {**config_record(TrainConfig()), **checkpoint["config"]}, config_record(cfg)
    changed = [(key, old.get(key), value) for key, value in new.items() if key != "transforms" and old.get(key) != value]
    # A family newer than the checkpoint was at its default there (the identity).
    old_t = {**TransformConfig().to_dict(), **old.get("transforms", {})}
    changed += [(key, old_t[key], value) for key, value in new["transforms"].items() if old_t[key] != value]
    if changed:
        raise CheckpointMismatch(str(path), changed)
    return checkpoint


def read_checkpoint(path: Path, cfg: TrainConfig, dist: Distributed | None = None) -> dict:
    """:func:`load_checkpoint` on the CPU by rank 0, sent to the other ranks (a checkpoint is small).

    Raises:
        OptionError: as :func:`load_checkpoint`, on every rank.
    """
    checkpoint: dict | OptionError | None = None
    if dist is None or dist.is_main:
        try:
            checkpoint = load_checkpoint(path, cfg, torch.device("cpu"))
        except OptionError as err:
            checkpoint = err
    checkpoint = dist.broadcast_object(checkpoint) if dist is not None else checkpoint
    if isinstance(checkpoint, OptionError):
        raise checkpoint
    return checkpoint


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
        logger.warning("checkpoint was made on %s, resuming on %s: random samples restart from the run's seed", generator_device, here)
    state.step, state.elapsed_before = checkpoint["step"], checkpoint["elapsed"]
    # Checkpoints from before distributed training counted steps of one process only.
    state.samples = checkpoint.get("samples", state.step * state.global_batch)
    state.trained_on = checkpoint.get("device_name", state.trained_on)
    state.init = checkpoint.get("init")
    state.log = json.loads(log_path.read_text()) if log_path.is_file() else []
