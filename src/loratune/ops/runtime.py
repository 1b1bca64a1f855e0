"""Process-wide CPU settings for training, measured in docs/performance.md; the trainer applies them.

`tune_cpu_runtime()` does three things, each a measured win on x86 (figures in docs/performance.md,
"ops.runtime"):
- flush denormals to zero: AdamW's second moment of small LoRA gradients drifts into the denormal
  range, where every multiply traps to microcode;
- keep large freed blocks in the process (glibc `mallopt`): by default every multi-MB tensor is a
  fresh `mmap`, and its first touch page-faults; a training step allocates hundreds of them. RSS
  then stays at its peak instead of shrinking between steps; the peak itself is unchanged.
  Sharded training (fsdp) asks for the opposite, `allocator="return"`: gathering each layer's
  weights and freeing them again, tens of times a step, fragments a heap that keeps everything
  (measured with gloo: RSS grew by a whole model per step), so every block of 1 MiB or more is
  mapped on its own and handed back when freed;
- optionally pin the intra-op thread count (torch's default is one per physical core, which is
  right on a machine of one's own; on a shared, oversubscribed machine fewer threads can win,
  because OpenMP threads that outnumber free cores spin at barriers).

Nothing here changes numerics beyond flushing denormals (values below 1.2e-38) to zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
_TRIM_THRESHOLD = 1 << 31  # never shrink the heap for less than 2 GiB of free space at its top
_RETURN_MMAP_THRESHOLD = 1 << 20  # "return": blocks of 1 MiB and more are mapped alone, unmapped when freed
_RETURN_TRIM_THRESHOLD = 128 << 10  # glibc's default


def tune_cpu_runtime(*, flush_denormal: bool = True, allocator: bool | str = True,
                     threads: int | None = None) -> dict[str, object]:
    """Apply the CPU settings; return what was applied (for the run's log).

    allocator: True or "keep" (keep freed memory), "return" (hand big freed blocks back), False.
    threads: intra-op threads, or None to leave torch's count alone.
    """
    applied: dict[str, object] = {}
    if flush_denormal:
        applied["flush_denormal"] = torch.set_flush_denormal(True)  # False where the CPU lacks it
    if allocator in (True, "keep"):
        applied["allocator"] = keep_freed_memory()
    elif allocator == "return":
        applied["allocator"] = "return" if return_freed_memory() else False
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
        applied["threads"] = torch.get_num_threads()
    logger.info("cpu runtime: %s", applied)
    return applied


@contextlib.contextmanager
def tuned_cpu_runtime(**kwargs) -> Iterator[dict[str, object]]:
    """`tune_cpu_runtime(**kwargs)` for the block, then put back what can be put back: flush-to-zero
    off (torch's default) and the thread count from before. The allocator thresholds stay: freed
    memory kept in the process does no harm afterwards.
    """
    threads_before = torch.get_num_threads()
    applied = tune_cpu_runtime(**kwargs)
    try:
        yield applied
    finally:
        if applied.get("flush_denormal"):
            torch.set_flush_denormal(False)
        if "threads" in applied:
            torch.set_num_threads(threads_before)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds so big freed blocks are reused, not unmapped.

    Returns False (nothing changed) off glibc.
    """
    return _set_thresholds(_MMAP_THRESHOLD, _TRIM_THRESHOLD)


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (and the trim threshold at its default): big blocks are
    unmapped when freed, and glibc no longer raises the threshold as it does by default.

    Returns False (nothing changed) off glibc.
    """
    return _set_thresholds(_RETURN_MMAP_THRESHOLD, _RETURN_TRIM_THRESHOLD)


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return (bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
            and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)))
