"""Several processes under ``torchrun``: the process group and what the pipeline needs of it.

:func:`init_world` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` or a rendezvous) and joins the default process group: NCCL on
CUDA (each process on ``cuda:LOCAL_RANK``), gloo on the CPU. Without torchrun it returns a world
of one process and never calls a collective. Every collective gets ``timeout`` seconds: a rank
that dies (SIGKILL, out of memory) makes the others fail with an error instead of waiting
forever; torchrun also stops the other workers as soon as one exits with an error.

>>> world, device = init_world("cpu", timeout=600)  # one process: no process group
>>> (world.rank, world.size, world.main, device)
(0, 1, True, 'cpu')
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "current_world", "init_world", "leave_world"]


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes; rank 0 writes files and logs."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives are called."""
        return self.size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def written_by_main(self, write: Callable[..., object], *args: object) -> None:
        """Rank 0 calls ``write(*args)``; every rank returns once it is done (the files are
        there for all)."""
        if self.main:
            write(*args)
        self.barrier()

    def exists(self, *paths: Path) -> bool:
        """Whether every path is a file, as rank 0 sees it: the same answer on every rank.

        A stage is skipped on resume when its files exist. Were each rank to look for itself, a
        rank running late could find a file that rank 0 has just written in this very stage,
        skip it, and leave the others waiting at its barrier until the collective timeout.
        """
        found = all(Path(p).is_file() for p in paths)
        if self.active:
            shared = [found]
            dist.broadcast_object_list(shared, src=0)
            found = bool(shared[0])
        return found

    def check_same(self, what: str, tensors: dict[str, torch.Tensor]) -> None:
        """Raise ``RuntimeError`` unless every rank holds bit-identical ``tensors`` (float64
        checksums per entry, compared with one all-reduce of their max and min)."""
        if not self.active or not tensors:
            return
        names = list(tensors)  # checksums stay on the tensors' device: no host round trip
        sums = torch.stack([_checksum(tensors[n]) for n in names])
        high, low = sums.clone(), sums.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        differ = (high != low).nonzero().flatten().tolist()
        if differ:
            raise RuntimeError(
                f"{what} differs between ranks in {names[differ[0]]} (and {len(differ) - 1} "
                "more); the processes are out of step, which is a bug: please report it"
            )

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank."""
        if self.active:
            for buf in model.buffers():
                dist.broadcast(buf, src=0)


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Two float64 sums that any change of a value or of its position alters."""
    flat = t.detach().flatten().double()
    ramp = torch.arange(1, len(flat) + 1, device=flat.device, dtype=torch.float64) / len(flat)
    return torch.stack([flat.sum(), (flat * ramp).sum()])


def current_world(distributed: bool) -> World:
    """The world of the initialized default process group (``distributed=True``), else one
    process. Raises ``ValueError`` when ``distributed`` is asked for without a group."""
    if not distributed:
        return World()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs torch.distributed.init_process_group() first")
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(dist.get_rank(), dist.get_world_size(), local)


def init_world(device: str, timeout: float) -> tuple[World, str]:
    """Join torchrun's process group (when ``WORLD_SIZE`` > 1); return the world and the device
    this process uses (``cuda`` becomes ``cuda:LOCAL_RANK``). Raises ``ValueError`` with the fix
    when the environment is not torchrun's or the device does not fit it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    missing = [
        v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set; start several processes with "
            "torchrun (torchrun --nproc-per-node N -m permask run ...), or unset WORLD_SIZE"
        )
    world = World(int(os.environ["RANK"]), size, int(os.environ["LOCAL_RANK"]))
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.device(device).index not in (None, world.local_rank):
            raise ValueError(
                f"under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda, not "
                f"{device!r} (CUDA_VISIBLE_DEVICES picks the GPUs)"
            )
        torch.cuda.set_device(world.local_rank)
        device = f"cuda:{world.local_rank}"
    elif kind != "cpu":
        raise ValueError(f"several processes run on cuda (NCCL) or cpu (gloo), not {kind!r}")
    if not dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return world, device


def leave_world() -> bool:
    """Leave the process group (if any); return whether this process is rank 0 (prints)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    main = dist.get_rank() == 0
    dist.destroy_process_group()
    return main
