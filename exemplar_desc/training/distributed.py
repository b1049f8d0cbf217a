"""Data-parallel training across processes, GPUs and machines, following PyTorch's torchrun recipes.

``torchrun --nproc_per_node N -m exemplar_desc.train ...`` starts N processes (ranks) and
sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` joins them into one process group (NCCL on CUDA, one GPU per
rank, ``cuda:LOCAL_RANK``; Gloo on the CPU). Without torchrun (or with one process) none
of this runs and the training has no distributed overhead.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..cli import OptionError

logger = logging.getLogger(__name__)

__all__ = ["Distributed", "DEFAULT_TIMEOUT_MINUTES", "world_size_from_env", "rank_from_env", "init_distributed", "close_distributed"]

#: How long a collective operation waits for the other ranks before the job fails. Rank 0
#: validates and writes checkpoints while the others wait in their next step, and it
#: samples the seed patches while they wait for them, so this must cover those.
DEFAULT_TIMEOUT_MINUTES = 30.0


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel job.

    Attributes:
        rank: 0 .. world_size - 1 over all machines; rank 0 logs and writes every file.
        world_size: number of processes; the global batch is world_size x --batch-size.
        local_rank: index on this machine (its GPU is ``cuda:local_rank``).
        device: where this rank trains.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

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


def world_size_from_env() -> int:
    """``WORLD_SIZE`` set by torchrun, 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """``RANK`` set by torchrun, 0 without it."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_name: str, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Distributed | None:
    """Join the torchrun job this process belongs to; None when it runs alone.

    Args:
        device_name: the --device option: ``auto`` (CUDA when available), ``cuda`` or ``cpu``;
            a rank always trains on ``cuda:LOCAL_RANK``, so ``cuda:N`` is refused.
        timeout_minutes: how long a collective waits for the other ranks before failing.

    Raises:
        OptionError: ``--device cuda:N``, or fewer GPUs on this machine than local ranks.
    """
    if world_size_from_env() <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name.startswith("cuda:"):
        raise OptionError("--device", device_name, "under torchrun each rank uses cuda:LOCAL_RANK; give cuda, cpu or auto")
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise OptionError("--device", device_name, f"local rank {local_rank} needs a GPU of its own; {torch.cuda.device_count()} here")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=device if cuda else None,
    )
    info = Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device)
    logger.info("rank %d of %d on %s (%s)", info.rank, info.world_size, device, dist.get_backend())
    return info


def close_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
