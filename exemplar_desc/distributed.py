"""Work split across processes, GPUs and machines, following PyTorch's torchrun recipes.

``torchrun --nproc_per_node N -m exemplar_desc.train ...`` (or ``-m exemplar_desc.sfm``)
starts N processes (ranks) and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` joins them into one process
group (NCCL on CUDA, one GPU per rank, ``cuda:LOCAL_RANK``; Gloo on the CPU). Without
torchrun (or with one process) none of this runs and there is no distributed overhead.

Every collective waits at most the group's timeout for the other ranks, so a rank that
hangs or is lost ends the job with an error instead of a hang; :meth:`Distributed.run`
also tells every rank, and so rank 0, which rank failed and why.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .checks import OptionError

logger = logging.getLogger(__name__)

__all__ = [
    "Distributed",
    "DistributedError",
    "DEFAULT_TIMEOUT_MINUTES",
    "world_size_from_env",
    "rank_from_env",
    "local_rank_from_env",
    "init_distributed",
    "close_distributed",
]

T = TypeVar("T")

#: How long a collective operation waits for the other ranks before the job fails. In
#: training, rank 0 validates and writes checkpoints while the others wait in their next
#: step, and it samples the seed patches while they wait for them; in SfM, the ranks wait
#: for the slowest one's share of the images and for rank 0 to merge the features. This
#: must cover those.
DEFAULT_TIMEOUT_MINUTES = 30.0


class DistributedError(RuntimeError):
    """Another rank failed, or the ranks lost contact (a timeout or a lost process)."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job.

    Attributes:
        rank: 0 .. world_size - 1 over all machines; rank 0 logs and writes every shared file.
        world_size: number of processes; in training the global batch is world_size x --batch-size.
        local_rank: index on this machine (its GPU is ``cuda:local_rank``).
        device: where this rank computes.
        timeout_minutes: how long a collective waits for the other ranks.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank (pickled; for small objects such as a checkpoint)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` (on :attr:`device`) with rank 0's, in place; returns it."""
        dist.broadcast(tensor, src=0)
        return tensor

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum of ``values`` over the ranks (waits for the device and the others)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait until every rank gets here (at most :attr:`timeout_minutes`)."""
        dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (pickled; for small objects such as a list of names)."""
        objects: list = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every world_size-th one from index ``rank`` (round robin,
        so that shares of a sorted list are alike); the shares of all ranks partition ``items``."""
        return list(items[self.rank :: self.world_size])

    def run(self, what: str, work: Callable[[], T]) -> T:
        """Call ``work()`` here, then wait for every rank's to end; a barrier that passes on errors.

        Args:
            what: the step, for messages ("extracting features").
            work: this rank's part of the step (nothing on some ranks, if so).

        Returns:
            This rank's ``work()`` when it succeeded on every rank.

        Raises:
            The exception ``work()`` raised on this rank, unchanged; else
            DistributedError naming every rank whose ``work()`` raised and its error, or
            saying that the ranks lost contact (a rank hung past the timeout or died).
        """
        error: Exception | None = None
        result = None
        try:
            result = work()
        except Exception as err:  # told to every rank below, then raised here
            error = err
        try:
            messages = self.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        except RuntimeError as err:  # Gloo's timeout or a closed connection (DistBackendError)
            if error is not None:
                raise error from err
            raise DistributedError(
                f"not every rank finished {what} within the timeout of {self.timeout_minutes:g} "
                f"minutes, or one of them was lost ({' '.join(str(err).split())})"
            ) from err
        if error is not None:
            raise error
        failed = [f"rank {rank}: {message}" for rank, message in enumerate(messages) if message is not None]
        if failed:
            raise DistributedError(f"{what} failed on {'; '.join(failed)}")
        return result


def world_size_from_env() -> int:
    """``WORLD_SIZE`` set by torchrun, 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """``RANK`` set by torchrun, 0 without it."""
    return int(os.environ.get("RANK", "0"))


def local_rank_from_env() -> int:
    """``LOCAL_RANK`` set by torchrun (the rank on this machine), 0 without it."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(
    device_name: str, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, option: str = "device"
) -> Distributed | None:
    """Join the torchrun job this process belongs to; None when it runs alone.

    Args:
        device_name: the device option: ``auto`` (CUDA when available), ``cuda`` or ``cpu``;
            a rank always computes on ``cuda:LOCAL_RANK``, so ``cuda:N`` is refused.
        timeout_minutes: how long a collective waits for the other ranks before failing.
        option: the argument or field ``device_name`` came from, named by the errors (a
            command line gives its flag).

    Raises:
        OptionError: ``cuda:N``, or fewer GPUs on this machine than local ranks (refused
            on every rank alike, before joining, so that rank 0 reports it).
    """
    if world_size_from_env() <= 1:
        return None
    local_rank = local_rank_from_env()
    if device_name.startswith("cuda:"):
        raise OptionError(option, device_name, "under torchrun each rank uses cuda:LOCAL_RANK; give cuda, cpu or auto")
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        # LOCAL_WORLD_SIZE (torchrun's --nproc_per_node), not this rank's index, so that
        # every rank of the machine refuses and rank 0 says why.
        local_ranks = max(local_rank + 1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if local_ranks > torch.cuda.device_count():
            raise OptionError(option, device_name, f"{local_ranks} processes on this machine need a GPU each; "
                                                   f"{torch.cuda.device_count()} here")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Importing torch._dynamo (the int8 path's quantisation does) takes references to the live
    # process groups that destroy_process_group leaves behind, and Gloo's threads then outlive
    # it: one still freeing a finished collective when the interpreter exits aborts the rank.
    # Imported before the group exists, it holds none.
    importlib.import_module("torch._dynamo")

    dist.init_process_group(
        "nccl" if cuda else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=device if cuda else None,
    )
    info = Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device, timeout_minutes)
    logger.info("rank %d of %d on %s (%s)", info.rank, info.world_size, device, dist.get_backend())
    return info


def close_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
