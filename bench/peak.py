"""Measure this machine's matrix-product peak: FLOP/s of large square matmuls, median of repeats.

    python bench/peak.py [--size 2048] [--repeats 7] [--dtypes bf16,fp32] [--device cpu] [--json]

Prints the median over repeats and, with --json, also the best repeat ("bf16_best", ...). The
best repeat is what bench/train_speed.py divides by for MFU: on a machine shared with other jobs the
median is dragged down by their load (giving MFU above 100%), while interference can only slow a
repeat, never speed it up. Uses the thread count torch starts with (all cores) unless --threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


def matmul_flops_per_s(dtype: torch.dtype, size: int = 2048, repeats: int = 7, device: str = "cpu",
                       best: bool = False) -> float:
    """Return the median (or best) FLOP/s of `a @ b` for (size, size) operands of this dtype.

    int8 is `torch._int_mm` (int32 sums), the product `base_compute: int8` runs: its "FLOP" are
    integer multiply-adds counted the same way.
    """
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (size, size), device=device, dtype=dtype)
        b = torch.randint(-127, 128, (size, size), device=device, dtype=dtype)
        out = torch.empty(size, size, device=device, dtype=torch.int32)
        mm = lambda: torch._int_mm(a, b, out=out)  # noqa: E731
    else:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        mm = lambda: torch.mm(a, b, out=out)  # noqa: E731
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):  # warm-up: kernel selection, page faults
        mm()
    sync()
    inner = max(1, int(4e12 // (2 * size**3))) if device.startswith("cuda") else 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            mm()
        sync()
        times.append((time.perf_counter() - start) / inner)
    return 2 * size**3 / (min(times) if best else statistics.median(times))


def measure_peaks(dtypes=("bf16", "fp32"), size: int = 2048, repeats: int = 7, device: str = "cpu") -> dict:
    """Return {"bf16": median FLOP/s, "bf16_best": best repeat, ...} plus the threads and device."""
    result = {}
    for name in dtypes:
        result[name] = matmul_flops_per_s(DTYPES[name], size, repeats, device)
        result[f"{name}_best"] = matmul_flops_per_s(DTYPES[name], size, repeats, device, best=True)
    result.update(threads=torch.get_num_threads(), size=size, device=device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure_peaks(args.dtypes.split(","), args.size, args.repeats, args.device)
    if args.json:
        print(json.dumps(result))
        return
    for name in args.dtypes.split(","):
        print(f"{name}: {result[name] / 1e9:8.1f} GFLOP/s  "
              f"({args.size}^3 matmul, {result['threads']} threads)")


if __name__ == "__main__":
    main()
