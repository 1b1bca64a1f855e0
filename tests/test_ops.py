"""`loratune.ops.clear_caches`: one call empties every process-wide cache of the fast paths."""

from __future__ import annotations

import torch

from loratune import ops
from loratune.ops import attention, compiled, gemm


def test_clear_caches_empties_all_four(monkeypatch):
    monkeypatch.delenv(compiled.ENV, raising=False)
    a = torch.randn(1024, 576).to(torch.bfloat16)
    b = torch.randn(576, 576).to(torch.bfloat16)
    gemm.matmul(a, b)
    attention._causal_bias(3, 5, 4, torch.float32, torch.device("cpu"))
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    q = torch.zeros(1, 2, 5, 4)
    attention.packed_bounds(pos, q, q)
    compiled.disable("switched off by the test")
    assert gemm.plans() and attention._STRIPS and attention._LAST_STARTS[0]() is pos
    assert not compiled.enabled()

    ops.clear_caches()
    assert gemm.plans() == {} and attention._STRIPS == {} and attention._LAST_STARTS == [None, None, None]
    assert compiled.enabled()  # LORATUNE_COMPILE unset: on again


def test_clear_caches_reads_loratune_compile_again(monkeypatch):
    monkeypatch.setenv(compiled.ENV, "0")
    ops.clear_caches()
    assert not compiled.enabled()
    monkeypatch.delenv(compiled.ENV)
    ops.clear_caches()
    assert compiled.enabled()
