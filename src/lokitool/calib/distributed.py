"""Data-parallel calibration through torch.distributed.

Launched as `torchrun --nproc-per-node N -m lokitool calibrate ...`: every rank takes its own
windows (rank r takes windows r, r + N, ...), streams its own sums, and the sums are all-reduced
(NCCL on GPU, gloo on CPU) before the PCA, so the result equals a single-process run on the same
windows up to float64 rounding. Rank 0 alone writes the file and reports progress.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from .moments import Statistics


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The world torchrun (or any launcher setting RANK / WORLD_SIZE / LOCAL_RANK) describes."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def process_group(device: str) -> Iterator[World]:
    """Join the launcher's process group for the duration of a run (a no-op for one process).

    `device` is the user's --device; on CUDA each rank takes GPU `LOCAL_RANK`."""
    world = launched_world()
    if not world.distributed or torch.distributed.is_initialized():
        yield world
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=_dt.timedelta(minutes=30))
    try:
        yield world
    finally:
        torch.distributed.destroy_process_group()


def shard(tokens: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's windows: [N, L] -> [ceil((N - rank) / size), L]."""
    return tokens[world.rank :: world.size]


def all_reduce_(stats: Statistics) -> Statistics:
    """Sum every rank's statistics in place (a no-op without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return stats
    for sums in stats.all_sums():
        for tensor in sums.tensors():
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return stats


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
