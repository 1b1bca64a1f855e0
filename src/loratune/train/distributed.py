"""Data-parallel training through torch.distributed: the same command under `torchrun`.

`torchrun --nproc_per_node N` sets RANK / WORLD_SIZE / LOCAL_RANK; `init_distributed` then joins
the process group (NCCL on CUDA, gloo on CPU). Without those variables everything here is a no-op
for a single process, so the loop calls these helpers unconditionally. A single process under
torchrun joins a group of one only when asked (`alone=True`: fsdp shards over it, so the sharded
code path runs on one GPU too).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from loratune.errors import ConfigError, LoratuneError, one_line

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

    Raises:
        ConfigError: naming each launcher variable (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
            MASTER_PORT) that is not a number, out of range or missing, before any process group.
    """
    rank, world_size, local_rank = launch_ranks()
    cuda = torch.cuda.is_available()
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    joining = (world_size > 1 or (alone and launched)) and not dist.is_initialized()
    problems = rendezvous_problems() if joining else []
    if cuda and local_rank >= torch.cuda.device_count():
        problems.append(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                        "device(s); start at most that many processes per node")
    if problems:
        raise ConfigError(problems, source="launcher environment")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    joined = False
    if joining:
        backend = "nccl" if cuda else "gloo"
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        except dist.DistNetworkError as exc:
            raise ConfigError([rendezvous_failure(exc)], source="launcher environment") from None
        logger.info("joined %s process group: rank %d of %d", backend, rank, world_size)
        joined = True
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, joined=joined)


def launch_ranks() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun set them; (0, 1, 0) for a plain process.

    Raises:
        ConfigError: a variable that is not an integer, WORLD_SIZE < 1, or a rank outside
            [0, WORLD_SIZE) (a RANK left over from another job would make this process skip saving).
    """
    problems: list[str] = []
    values = {name: _int_variable(name, default, problems)
              for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))}
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if not problems:
        if world_size < 1:
            problems.append(f"WORLD_SIZE={world_size} must be >= 1 (the number of processes)")
        for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank)):
            if world_size >= 1 and not 0 <= value < world_size:
                problems.append(f"{name}={value} must be in [0, WORLD_SIZE={world_size}); unset RANK, "
                                "WORLD_SIZE and LOCAL_RANK to train in one process, or start with torchrun")
    if problems:
        raise ConfigError(problems, source="launcher environment")
    return rank, world_size, local_rank


def rendezvous_problems() -> list[str]:
    """What keeps the env:// rendezvous from working: MASTER_ADDR / MASTER_PORT missing or bad."""
    problems = []
    if not os.environ.get("MASTER_ADDR", "").strip():
        problems.append("MASTER_ADDR is not set: several processes need the address of rank 0 "
                        "(torchrun sets it; or run without WORLD_SIZE for one process)")
    port = _int_variable("MASTER_PORT", None, problems)
    if "MASTER_PORT" not in os.environ:
        problems.append("MASTER_PORT is not set: several processes need the port of rank 0 "
                        "(torchrun sets it)")
    elif port is not None and not 1 <= port <= 65535:
        problems.append(f"MASTER_PORT={port} must be a TCP port in [1, 65535]")
    return problems


def rendezvous_failure(exc: Exception) -> str:
    """Say why joining the process group at MASTER_ADDR:MASTER_PORT failed, and what to change."""
    where = f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}"
    if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
        return (f"MASTER_PORT={os.environ.get('MASTER_PORT')} is already in use on this machine (another job "
                "or program listens there); choose a free port (torchrun --master_port PORT) or let "
                "torchrun --standalone pick one")
    return f"cannot join the process group at {where}: {one_line(exc, 300)}"


def _int_variable(name: str, default: int | None, problems: list[str]) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw.strip())
    except ValueError:
        problems.append(f"{name}={raw!r} is not an integer")
        return default


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


@contextlib.contextmanager
def together(env: DistEnv, what: str) -> Iterator[None]:
    """Run a block without collectives on every rank; when it fails on one rank, fail on all of them.

    The rank that failed raises its own error; every other rank raises a LoratuneError naming that
    rank and its message, instead of meeting a peer that has left in its next collective (a deep
    transport traceback from gloo, or a wait until the 30-minute timeout elsewhere). `what` says
    what the block was doing ("loading the data and the model").

    Raises:
        LoratuneError: another rank failed in the block (on the ranks where it did not fail).
    """
    try:
        yield
    except Exception as exc:
        text = one_line(exc) if isinstance(exc, LoratuneError) else f"{type(exc).__name__}: {one_line(exc)}"
        gather_objects(text, env)  # the peers learn why this rank stops
        raise
    failed = [(rank, text) for rank, text in enumerate(gather_objects(None, env)) if text is not None]
    if failed:
        rank, text = failed[0]
        others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise LoratuneError(f"process {rank} of {env.world_size} failed {what}{others}, so every process "
                            f"stops: {text}")


@contextlib.contextmanager
def peer_loss_explained(env: DistEnv) -> Iterator[None]:
    """Turn a collective that failed because another process is gone into one LoratuneError.

    When a process stops (its own error, SIGKILL, the out-of-memory killer), the others fail in
    their next collective with a transport error (gloo: "Connection closed by peer") whose
    traceback says nothing about the cause; the cause is in the stopped process's output.

    Raises:
        LoratuneError: naming this process and the transport's first line.
    """
    try:
        yield
    except RuntimeError as exc:
        if not (env.enabled and _lost_peer(exc)):
            raise
        first = re.sub(r"^\[[^\]]*\]\s*", "", one_line(exc)).split(". ")[0]
        raise LoratuneError(f"process {env.rank} of {env.world_size} lost contact with the other processes "
                            f"({first}); one of them stopped: its own error is above") from None


def _lost_peer(exc: RuntimeError) -> bool:
    """True for a collective's failure that a vanished peer causes (gloo, NCCL, the TCP store)."""
    if isinstance(exc, dist.DistError):  # DistBackendError (NCCL), DistNetworkError, DistStoreError
        return True
    text = str(exc)
    return "gloo" in text and any(t in text for t in ("closed by peer", "reset by peer", "Timed out"))


def barrier(env: DistEnv) -> None:
    """Wait for every rank."""
    if env.enabled:
        dist.barrier()


def data_parallel(runner: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """Wrap `runner` in DDP, which averages the adapter's gradients over the ranks.

    The frozen base's buffers (rotary tables, quantized codes) are the same on every rank: never
    broadcast them. torch 2.13 deprecates `broadcast_buffers` for `forward_sync_buffers`, which would
    still broadcast them once at start; its own warning says to keep `broadcast_buffers=False` until
    there is a replacement, so the warning (one per rank, pointing here) is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`broadcast_buffers` is deprecated",
                                category=FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            broadcast_buffers=False)
