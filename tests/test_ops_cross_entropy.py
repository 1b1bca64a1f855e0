"""chunked_cross_entropy_sum against the full-logits reference: values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratune.ops.cross_entropy import chunked_cross_entropy_sum, cross_entropy_sum_reference
from loratune.ops.int8_matmul import quantize_rows

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
}


def make_inputs(n, d, v, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


def run(fn, hidden, weight, bias, targets, **kw):
    tensors = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    for t in tensors:
        t.grad = None
    loss = fn(hidden, weight, bias, targets, **kw)
    (loss * 3.0).backward()  # a non-unit upstream gradient
    return loss.detach(), [t.grad.clone() for t in tensors]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 40), d=st.integers(1, 24), v=st.integers(2, 70),
    chunk=st.integers(1, 50), bias=st.booleans(),
)
def test_chunked_equals_reference_fp32(n, d, v, chunk, bias):
    inputs = make_inputs(n, d, v, torch.float32, bias)
    ref_loss, ref_grads = run(cross_entropy_sum_reference, *inputs)
    loss, grads = run(chunked_cross_entropy_sum, *inputs, chunk_rows=chunk)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **TOL[torch.float32])


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_chunked_equals_reference_bf16(chunk):
    inputs = make_inputs(33, 16, 50, torch.bfloat16, bias=False)
    ref_loss, ref_grads = run(cross_entropy_sum_reference, *inputs)
    loss, grads = run(chunked_cross_entropy_sum, *inputs, chunk_rows=chunk)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.bfloat16])
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, rg, **TOL[torch.bfloat16])


def test_frozen_weight_gets_no_grad_and_no_grad_mode_works():
    hidden, weight, _, targets = make_inputs(10, 8, 30, torch.float32, bias=False)
    weight.requires_grad_(False)
    loss = chunked_cross_entropy_sum(hidden, weight, None, targets, chunk_rows=4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        again = chunked_cross_entropy_sum(hidden, weight, None, targets, chunk_rows=4)
    torch.testing.assert_close(again, loss.detach())


def _int8_head_inputs(dtype=torch.float32):
    hidden, weight, _, targets = make_inputs(48, 32, 300, dtype, bias=False, seed=1)
    with torch.no_grad():
        hidden.mul_(4)  # peaked softmax rows, as a trained model's are
    weight.requires_grad_(False)
    return hidden, weight, targets, quantize_rows(weight)  # as quant.int8.attach_head_codes rounds it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_head_gradient_keeps_the_loss_and_is_right_on_average(dtype):
    hidden, weight, targets, codes = _int8_head_inputs(dtype)
    ref_loss, (ref_grad,) = run(chunked_cross_entropy_sum, hidden, weight, None, targets, chunk_rows=20)
    draws = []
    for seed in range(64):
        torch.manual_seed(seed)
        loss, (grad,) = run(chunked_cross_entropy_sum, hidden, weight, None, targets, chunk_rows=20,
                            int8_weight=codes)
        assert grad.dtype == dtype
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)  # logits and loss stay in float
        draws.append(grad.float())
    # What the rounding of the gradient averages to: the other classes' share through the weight's
    # int8 codes, the target's through the float weight.
    w_int8 = codes[0].float() * codes[1][:, None]
    probs = torch.softmax(hidden.detach().float() @ weight.float().T, dim=-1)
    rows = torch.arange(len(targets))
    p_target = probs[rows, targets].clone()
    probs[rows, targets] = 0
    expected = 3.0 * (probs @ w_int8 + (p_target - 1)[:, None] * weight.float()[targets])
    one, mean = draws[0], torch.stack(draws).mean(0)
    rel = lambda g: float((g - expected).norm() / expected.norm())  # noqa: E731
    # Each draw is noisy, their mean is not (down to bf16's own rounding of the result).
    assert rel(one) < 0.1 and rel(mean) < rel(one) / (4 if dtype == torch.float32 else 2)
    exact = ref_grad.float()
    assert (mean - exact).norm() / exact.norm() < (0.02 if dtype == torch.float32 else 0.05)
    torch.manual_seed(0)
    again = run(chunked_cross_entropy_sum, hidden, weight, None, targets, chunk_rows=20, int8_weight=codes)
    torch.testing.assert_close(again[1][0].float(), draws[0], rtol=0, atol=0)  # the generator decides


def test_int8_head_codes_are_ignored_where_the_head_itself_trains():
    hidden, weight, targets, codes = _int8_head_inputs()
    weight.requires_grad_(True)
    ref_loss, ref_grads = run(chunked_cross_entropy_sum, hidden, weight, None, targets, chunk_rows=20)
    loss, grads = run(chunked_cross_entropy_sum, hidden, weight, None, targets, chunk_rows=20,
                      int8_weight=codes)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=0, atol=0)


@pytest.mark.gpu
def test_chunked_equals_reference_cuda():
    inputs = [t.detach().cuda().requires_grad_() if t.is_floating_point() else t.cuda()
              for t in make_inputs(300, 64, 1000, torch.bfloat16, bias=False)]
    inputs.insert(2, None)
    ref_loss, ref_grads = run(cross_entropy_sum_reference, *inputs)
    loss, grads = run(chunked_cross_entropy_sum, *inputs, chunk_rows=64)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.bfloat16])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **TOL[torch.bfloat16])


def test_confidently_wrong_rows_keep_an_exact_loss():
    hidden = torch.eye(4)
    weight = torch.zeros(6, 4)
    weight[0] = 300.0  # every row puts ~all mass on class 0
    targets = torch.tensor([1, 2, 0, 5])
    ref = cross_entropy_sum_reference(hidden, weight, None, targets)
    got = chunked_cross_entropy_sum(hidden, weight, None, targets, chunk_rows=3)
    assert ref.item() > 500  # p[target] underflows fp32 here
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


@pytest.mark.parametrize("softmax_rows", [1, 2, 5])
def test_softmax_in_row_blocks_rounds_the_gradient_as_one_pass_does(softmax_rows, monkeypatch):
    """The fp32 softmax runs a few rows at a time and writes the bf16 gradient over the logits:
    bit for bit what one fp32 softmax over the chunk, cast to bf16, gives; underflowing rows in any
    block keep their exact loss."""
    import loratune.ops.cross_entropy as ce

    hidden, weight, _, targets = make_inputs(23, 16, 50, torch.bfloat16, bias=False)
    with torch.no_grad():
        weight[7] = 40.0  # rows whose target is not 7 are confidently wrong
    targets[::4] = 7
    logits = hidden.detach() @ weight.detach().t()
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    want_loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    probs[torch.arange(23), targets] -= 1.0
    want_grad = probs.to(torch.bfloat16) @ weight.detach()
    monkeypatch.setattr(ce, "SOFTMAX_BYTES", 4 * 50 * softmax_rows)
    loss = chunked_cross_entropy_sum(hidden, weight.detach(), None, targets, chunk_rows=11)
    loss.backward()
    assert want_loss.item() > 1000
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-5, atol=1e-3)
    assert torch.equal(hidden.grad, want_grad)
