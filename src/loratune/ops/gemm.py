"""Matrix products split into pieces where that is faster: a work-around for oneDNN's threading.

On some CPUs oneDNN runs some bf16 products far below the machine's rate (for instance on one
thread of two), and the same product in two or three calls does not; the shapes and timings
measured are in docs/performance.md ("ops.gemm"). Which shapes are hit depends on the CPU and the
library's heuristics, so nothing here is hard-coded. The first product with a given row count (and
the operands' layout, dtype and thread count), `matmul` runs whole and in each split way once, and
notes the ways that are bitwise equal to the whole product at that row count (the same sums in the
same order; it depends on the shape, not on the data). The next products of the shape (rows
rounded up to 256) take turns among those ways, each timed on real work, until each has `TRIALS`
timings; the shape then keeps the fastest way if its best time is at least 10% below the whole
product's, else the whole product. Once a shape runs whole, new row counts run whole without a
check; under a chosen split, a new row count is checked first and runs whole where the split is not
bitwise equal. So a choice, which depends on timing, never changes a result. Choices are cached for
the process (`loratune.ops.clear_caches()` forgets them).

The ways: "whole"; "rows", two halves of the rows (at least `MIN_ROWS` rows); "cols", two or more
equal column pieces of at most `PIECE_COLS` (at least `WIDE` columns). `matmul_reference` is the
plain product.
Only CPU half-precision products are considered (fp32 and other devices always run whole), and
inside `loratune.ops.reference_paths()` everything runs whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from loratune.ops import HALF_DTYPES, fast_paths_enabled, on_clear_caches

MIN_ROWS = 512  # fewer rows: a row split cannot pay for the second call
WIDE = 8192  # at least this many output columns: try column pieces
PIECE_COLS = 16384  # the widest column piece (a 512 x 16384 bf16 block is 16 MiB)
BUCKET = 256  # rows are rounded up to this for the cache key: packed batches, whose row count changes
# at every step, then share a few decisions instead of making a new one nearly every step
GAIN = 0.9  # a split must take at most this fraction of the whole product's best time
TRIALS = 4  # timed products of each kind before a shape's decision


@dataclass
class _Plan:
    """What is known about one shape: which ways are exact at which row count, timings, the choice."""

    exact: dict[int, tuple[str, ...]] = field(default_factory=dict)  # rows -> ways bitwise equal to whole
    times: dict[str, list[float]] = field(default_factory=dict)
    choice: str | None = None  # None while still timing


_PLANS: dict[tuple, _Plan] = {}


def matmul_reference(a: Tensor, b: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Return a @ b (+ bias): a (M, K), b (K, N), bias (N,) or None; written into `out` if given."""
    if bias is None:
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    return torch.addmm(bias, a, b) if out is None else torch.addmm(bias, a, b, out=out)


def matmul(a: Tensor, b: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Return the same (M, N) product as `matmul_reference`, split where that is faster."""
    ways = _ways(a, b)
    if not ways:
        return matmul_reference(a, b, bias, out)
    key = _key(a, b, bias)
    plan = _PLANS.get(key) or _PLANS.setdefault(key, _Plan())
    if plan.choice == "whole":  # no split for this shape: a new row count needs no exactness check
        return matmul_reference(a, b, bias, out)
    rows = a.shape[0]
    exact = plan.exact.get(rows)
    if exact is None:  # first product with this many rows: which splits sum in the same order?
        return _check(plan, ways, a, b, bias, out)
    if plan.choice is not None:
        return _run(plan.choice if plan.choice in exact else "whole", a, b, bias, out)
    if len(exact) == 1:
        return matmul_reference(a, b, bias, out)  # nothing to time at this row count
    return _trial(plan, exact, a, b, bias, out)


def _check(plan: _Plan, ways: tuple[str, ...], a: Tensor, b: Tensor, bias: Tensor | None,
           out: Tensor | None) -> Tensor:
    """Run the whole product and each split, note the splits that are bitwise equal at this row count,
    and count the runs as timings too: a shape whose row count changes at every call (the last loss
    chunk of packed batches) reaches its choice through its checks."""
    start = time.perf_counter()
    whole = matmul_reference(a, b, bias, out)
    timed = {"whole": time.perf_counter() - start}
    for way in ways:
        seconds = _time_if_same(way, whole, a, b, bias)
        if seconds is not None:
            timed[way] = seconds
    exact = plan.exact[a.shape[0]] = tuple(timed)
    for way, seconds in timed.items():
        plan.times.setdefault(way, []).append(seconds)
    _decide(plan, exact)
    return whole


def _trial(plan: _Plan, exact: tuple[str, ...], a: Tensor, b: Tensor, bias: Tensor | None,
           out: Tensor | None) -> Tensor:
    """Run the exact way with the fewest timings so far, record its time, choose once all have TRIALS."""
    way = min(exact, key=lambda w: len(plan.times.get(w, ())))
    start = time.perf_counter()
    result = _run(way, a, b, bias, out)
    plan.times.setdefault(way, []).append(time.perf_counter() - start)
    _decide(plan, exact)
    return result


def _decide(plan: _Plan, exact: tuple[str, ...]) -> None:
    if len(exact) > 1 and all(len(plan.times.get(w, ())) >= TRIALS for w in exact):
        plan.choice = choose({w: plan.times[w] for w in exact})


def choose(times: dict[str, list[float]]) -> str:
    """The fastest way by best time, if it beats the whole product by the GAIN margin, else "whole"."""
    best = min(times, key=lambda w: min(times[w]))
    return best if min(times[best]) <= GAIN * min(times["whole"]) else "whole"


def _ways(a: Tensor, b: Tensor) -> tuple[str, ...]:
    """The splits worth timing for this product (none: always run it whole)."""
    if not (a.device.type == "cpu" and a.dtype in HALF_DTYPES and a.dim() == 2 and b.dim() == 2
            and fast_paths_enabled()):
        return ()
    return (("rows",) if a.shape[0] >= MIN_ROWS else ()) + (("cols",) if b.shape[1] >= WIDE else ())


def _key(a: Tensor, b: Tensor, bias: Tensor | None) -> tuple:
    rows = -(-a.shape[0] // BUCKET) * BUCKET
    return (rows, a.shape[1], b.shape[1], a.stride(), b.stride(), a.dtype, bias is not None,
            torch.get_num_threads())


def _pieces(way: str, a: Tensor, b: Tensor, bias: Tensor | None):
    """(rows, cols, a part, b part, bias part) for each product a split way runs."""
    if way == "rows":  # two halves of the rows
        half = a.shape[0] // 2
        for rows in (slice(0, half), slice(half, None)):
            yield rows, slice(None), a[rows], b, bias
        return
    n = b.shape[1]  # "cols": two or more equal pieces of at most PIECE_COLS output columns
    width = -(-n // max(2, -(-n // PIECE_COLS)))
    for c in range(0, n, width):
        cols = slice(c, c + width)
        yield slice(None), cols, a, b[:, cols], None if bias is None else bias[cols]


def _run(way: str, a: Tensor, b: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    if way == "whole":
        return matmul_reference(a, b, bias, out)
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    for rows, cols, a_part, b_part, bias_part in _pieces(way, a, b, bias):
        matmul_reference(a_part, b_part, bias_part, out[rows, cols])
    return out


def _time_if_same(way: str, whole: Tensor, a: Tensor, b: Tensor, bias: Tensor | None) -> float | None:
    """Seconds the split's products take if `way` gives `whole` bit for bit, else None. One piece at
    a time, so the check never holds a second full-size result (the LM head's logits chunk is 48 MiB)."""
    seconds = 0.0
    for rows, cols, a_part, b_part, bias_part in _pieces(way, a, b, bias):
        start = time.perf_counter()
        part = matmul_reference(a_part, b_part, bias_part)
        seconds += time.perf_counter() - start
        if not torch.equal(whole[rows, cols], part):
            return None
    return seconds


def plans() -> dict[tuple, str | None]:
    """The choices so far (for logs and tests): shape key -> "whole", "rows" or "cols" (None: timing)."""
    return {key: plan.choice for key, plan in _PLANS.items()}


def exact_ways() -> dict[tuple, dict[int, tuple[str, ...]]]:
    """Per shape key and exact row count, the ways found bitwise equal to the whole product."""
    return {key: dict(plan.exact) for key, plan in _PLANS.items()}


@on_clear_caches
def clear_plans() -> None:
    """Forget every choice (the next products of each shape are timed again)."""
    _PLANS.clear()
