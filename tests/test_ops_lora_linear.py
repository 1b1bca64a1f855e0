"""Fused lora_linear against the plain reference: outputs and gradients, fp32 and bf16 bases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from loratune.ops.lora_linear import lora_linear, lora_linear_reference

# Relative to the largest magnitude of the expected tensor: a bf16 base runs the low-rank products
# in bf16 (8 bits of mantissa), the reference runs them in fp32.
TOL = {torch.float32: dict(rtol=1e-5, scale=1e-5), torch.bfloat16: dict(rtol=2e-2, scale=2e-2)}


def assert_close(actual, expected, dtype, msg=""):
    tol = TOL[dtype]
    atol = tol["scale"] * max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=atol, msg=msg)


def make(lead, d_in, d_out, r, dtype, bias, fan_in_fan_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=g).to(dtype)
    w_shape = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
    weight = (torch.randn(w_shape, generator=g) / d_in**0.5).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype) if bias else None
    lora_A = torch.randn(r, d_in, generator=g) / d_in**0.5
    lora_B = torch.randn(d_out, r, generator=g)  # non-zero, so the low-rank branch matters
    return x, weight, b, lora_A, lora_B


def forward_backward(fn, x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, x_lora=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B)]
    xl = None if x_lora is None else x_lora.detach().clone().requires_grad_()
    y = fn(leaves[0], weight, bias, leaves[1], leaves[2], scaling, fan_in_fan_out, xl)
    g = torch.Generator().manual_seed(7)
    y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
    grads = [t.grad for t in leaves] + ([] if xl is None else [xl.grad])
    return y.detach(), grads


def check(lead, d_in, d_out, r, dtype, bias, fan_in_fan_out, scaling=2.0, dropout=False):
    x, weight, b, lora_A, lora_B = make(lead, d_in, d_out, r, dtype, bias, fan_in_fan_out)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    x_lora = x * keep * 2 if dropout else None  # what dropout(p=0.5) hands the low-rank branch
    ref_y, ref_grads = forward_backward(lora_linear_reference, x, weight, b, lora_A, lora_B, scaling,
                                        fan_in_fan_out, x_lora)
    y, grads = forward_backward(lora_linear, x, weight, b, lora_A, lora_B, scaling, fan_in_fan_out, x_lora)
    assert y.dtype == dtype and y.shape == (*lead, d_out)
    assert_close(y, ref_y, dtype, "y")
    for name, got, want in zip(["x", "lora_A", "lora_B", "x_lora"], grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_close(got, want, dtype, name)


@settings(max_examples=30, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), d_in=st.integers(1, 24),
    d_out=st.integers(1, 24), r=st.integers(1, 8), bias=st.booleans(), fan_in_fan_out=st.booleans(),
    scaling=st.floats(0.1, 4.0), dropout=st.booleans(),
)
def test_fused_equals_reference_fp32(lead, d_in, d_out, r, bias, fan_in_fan_out, scaling, dropout):
    check(tuple(lead), d_in, d_out, r, torch.float32, bias, fan_in_fan_out, scaling, dropout)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_reference_bf16(fan_in_fan_out, bias):
    check((3, 17), 48, 40, 8, torch.bfloat16, bias, fan_in_fan_out)


def test_fused_equals_reference_bf16_with_dropout_input():
    check((2, 9), 32, 24, 4, torch.bfloat16, True, False, dropout=True)


def test_low_rank_branch_changes_output():
    x, weight, b, lora_A, lora_B = make((2, 5), 16, 12, 4, torch.float32, True, False)
    y0 = lora_linear(x, weight, b, lora_A, torch.zeros_like(lora_B), 2.0)
    torch.testing.assert_close(y0, torch.nn.functional.linear(x, weight, b))  # B = 0: exactly the base
    y1 = lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert not torch.allclose(y0, y1)


class RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_never_forms_delta_weight_or_copies_the_base(fan_in_fan_out):
    d_in, d_out = 24, 40  # neither equals N = 2 * 7, so any (out, in)-sized tensor is a weight copy or B@A
    x, weight, b, lora_A, lora_B = make((2, 7), d_in, d_out, 4, torch.bfloat16, True, fan_in_fan_out)
    x.requires_grad_()
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    with RecordShapes() as rec:
        lora_linear(x, weight, b, lora_A, lora_B, 2.0, fan_in_fan_out).sum().backward()
    weight_sized = [op for op in rec.ops if sorted(op[1]) == sorted((d_out, d_in))
                    and not op[0].startswith(("aten.t.", "aten.transpose", "aten.view", "aten.detach"))]
    assert any(op[1] == (14, d_out) for op in rec.ops)  # the recorder does see the products
    assert weight_sized == []


def test_falls_back_to_reference_when_base_is_trainable():
    x, weight, b, lora_A, lora_B = make((4,), 8, 6, 2, torch.float32, True, False)
    weight.requires_grad_()
    lora_linear(x, weight, b, lora_A, lora_B, 1.0).sum().backward()
    assert weight.grad is not None  # the fused node would have dropped it


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_reference_cuda(dtype):
    x, weight, b, lora_A, lora_B = (t.cuda() if t is not None else None
                                    for t in make((4, 33), 64, 96, 16, dtype, True, False))
    ref_y, ref_grads = forward_backward(lora_linear_reference, x, weight, b, lora_A, lora_B, 2.0, False)
    y, grads = forward_backward(lora_linear, x, weight, b, lora_A, lora_B, 2.0, False)
    assert_close(y, ref_y, dtype)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, dtype)


def test_reference_paths_switches_to_the_reference():
    from loratune.ops import reference_paths

    x, weight, b, lora_A, lora_B = make((4,), 8, 6, 2, torch.bfloat16, True, False)
    lora_A.requires_grad_()
    fused = lora_linear(x, weight, b, lora_A, lora_B, 1.0)
    with reference_paths():
        ref = lora_linear(x, weight, b, lora_A, lora_B, 1.0)
    assert "LoraLinearFn" in type(fused.grad_fn).__name__
    assert "LoraLinearFn" not in type(ref.grad_fn).__name__
