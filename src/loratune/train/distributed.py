"""Data-parallel training through torch.distributed: the same command under `torchrun`.

`torchrun --nproc_per_node N` sets RANK / WORLD_SIZE / LOCAL_RANK; `init_distributed` then joins
the process group (NCCL on CUDA, gloo on CPU). Without those variables everything here is a no-op
for a single process, so the loop calls these helpers unconditionally. A single process under
torchrun joins a group of one only when asked (`alone=True`: fsdp shards over it, so the sharded
code path runs on one GPU too).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    joined: bool = False  # this process joined a process group (and leaves it in shutdown_distributed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(*, alone: bool = False) -> DistEnv:
    """Join the process group torchrun described in the environment, or return a 1-process env.

    `alone`: join even a group of one process (torchrun --nproc_per_node 1).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    joined = False
    if (world_size > 1 or (alone and launched)) and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        logger.info("joined %s process group: rank %d of %d", backend, rank, world_size)
        joined = True
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, joined=joined)


def shutdown_distributed(env: DistEnv) -> None:
    """Leave the process group (only if we joined one)."""
    if env.joined and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few floats over all ranks (float64, so token counts stay exact)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_min(value: int, env: DistEnv) -> int:
    """The minimum of an integer over all ranks."""
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Collect one picklable object from every rank (returned on every rank, in rank order)."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is True on any rank (e.g. Ctrl-C seen by one process)."""
    if not env.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(env: DistEnv) -> None:
    """Wait for every rank."""
    if env.enabled:
        dist.barrier()
