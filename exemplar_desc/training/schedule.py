"""How far a training run is, and the learning rate there (the paper's step schedule)."""

from __future__ import annotations

from ..distributed import Distributed
from .checkpoint import TrainState
from .config import TrainConfig

__all__ = ["PAPER_LR_STEPS", "SYNC_EVERY", "lr_at", "RunClock"]

#: The official schedule, relative to the run's length: lr x1 for 1.2M of 1.56M iterations,
#: then x0.4, x0.1, x0.04, x0.01 in equal parts.
PAPER_LR_STEPS = ((0.0, 1.0), (0.77, 0.4), (0.83, 0.1), (0.89, 0.04), (0.94, 0.01))

#: In a distributed run the ranks agree every this many steps on whether the time budget is
#: spent and whether to stop on a signal (one all-reduce; the steps in between need no agreement).
SYNC_EVERY = 10


def lr_at(progress: float, base_lr: float) -> float:
    """Learning rate at ``progress`` in [0, 1] of the run (the official step schedule, rescaled)."""
    factor = 1.0
    for start, value in PAPER_LR_STEPS:
        if progress >= start:
            factor = value
    return base_lr * factor


class RunClock:
    """How far the run is, by samples or by the time budget, and whether to stop on a signal.

    Every rank must take the same lr and stop at the same step, so in a distributed run the
    ranks agree on both (:meth:`sync`): rank 0's clock rules, and a signal any rank has
    received stops them all (torchrun passes a signal on to every rank, but each gets it at
    its own step, and a rank that stopped alone would leave the others waiting for it).

    Args:
        stop: ``stop["signum"]``, set by :func:`.signals.stop_on_signals` on this rank.
    """

    def __init__(self, state: TrainState, cfg: TrainConfig, stop: dict, dist: Distributed | None) -> None:
        self.state, self.stop, self.dist = state, stop, dist
        self.total_samples = cfg.num_classes * cfg.samples_per_class * cfg.epochs
        self.budget_s = None if cfg.time_budget_minutes is None else cfg.time_budget_minutes * 60

    def sync(self) -> int | None:
        """Update the time used; return the signal to stop on (None: go on)."""
        main_rank = self.dist is None or self.dist.is_main
        used = self.state.elapsed / self.budget_s if self.budget_s is not None and main_rank else 0.0
        signum = float(self.stop.get("signum") or 0)
        if self.dist is not None:
            used, signum = self.dist.max([used, signum])
        if self.budget_s is not None:
            self.state.time_progress = used
        return int(signum) or None

    def progress(self) -> float:
        """Fraction of the run done: by samples, or by wall time when a time budget is set."""
        return min(max(self.state.samples / self.total_samples, self.state.time_progress), 1.0)
