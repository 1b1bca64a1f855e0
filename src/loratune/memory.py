"""How much memory a device has free, and refusing an allocation up front when it cannot fit.

A config can ask for any rank: `r: 100000` on a 2048-wide model is gigabytes per layer. Allocating
first and failing later takes the machine into swap or the OOM killer, so the size is estimated
from the target layers' shapes and compared with what the device has free. CPU memory is read from
/proc/meminfo (MemAvailable); where that cannot be read, nothing is refused. `rss_bytes` reports
what a process holds now, `peak_rss_bytes` what it has held at most (training records it per rank).
"""

from __future__ import annotations

import sys

import torch

from .errors import InsufficientMemoryError

MEMINFO = "/proc/meminfo"


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for new allocations on `device`, or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no driver, or a device index that does not exist
            return None
    if device.type != "cpu":
        return None
    try:
        with open(MEMINFO, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file says kB and means KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    """The resident memory (RSS) this process holds now, in bytes, or None where /proc cannot tell."""
    import os

    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """The most resident memory (RSS) this process has held so far, in bytes (getrusage's ru_maxrss)."""
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_fits(needed: int, device: torch.device | str, what: str, hint: str) -> None:
    """Raise InsufficientMemoryError when `needed` bytes exceed what `device` has free.

    Raises:
        InsufficientMemoryError: naming `what`, both figures and the `hint`.
    """
    free = available_bytes(device)
    if free is not None and needed > free:
        raise InsufficientMemoryError(f"{what} needs about {format_bytes(needed)} ({needed:,} bytes), but "
                                      f"only {format_bytes(free)} is available on {torch.device(device)}; "
                                      f"{hint}")
