"""Stopping a training run on SIGINT or SIGTERM, after a checkpoint."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

__all__ = ["TrainingInterrupted", "stop_on_signals"]


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the training after a checkpoint was written; resuming the run continues it.

    Attributes:
        signum: the signal's number; checkpoint: the checkpoint's path; step: the steps done.
    """

    def __init__(self, signum: int, checkpoint: Path, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint written to {checkpoint}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


@contextmanager
def stop_on_signals(stop: dict) -> Iterator[None]:
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
