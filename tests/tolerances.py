"""The one tolerance table every core test uses: how close two computations must be per dtype.

`TOL[dtype]` is (atol, rtol) for comparing two *different but equivalent* computations of the same
tensor (e.g. merged vs unmerged weights, fused vs reference, ours vs PEFT). Identities that hold
exactly (fresh adapter == base, disabled == base) are asserted with `torch.equal`, never here.
The bf16/fp16 rows cover one rounding of the merged weight to the base dtype propagated through a
two-layer model; they are not loosened per test.
"""

from __future__ import annotations

import torch

TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    """Keyword arguments for torch.testing.assert_close / torch.allclose at this dtype."""
    atol, rtol = TOL[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Assert two tensors agree within the table's tolerance for `dtype` (default: expected's)."""
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol(dtype))


def assert_changed(actual: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Assert two tensors differ by more than the tolerance: the test is not vacuous."""
    dtype = dtype or baseline.dtype
    atol, rtol = TOL[dtype]
    assert not torch.allclose(actual.float(), baseline.float(), atol=atol, rtol=rtol), "output did not change"
