"""Per-example attention for packed rows against Transformers' block-diagonal sdpa, and the CPU
blocked kernel (`packed_causal_attention`) against causal sdpa run per example."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from factories import VOCAB, tiny_model
from loratune.data import IGNORE_INDEX
from loratune.ops.attention import (
    NAME,
    enable_varlen_attention,
    packed_bounds,
    packed_causal_attention,
    varlen_sdpa_attention,
)
from loratune.train.loss import token_loss_sum

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


def packed(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.masked_fill(position_ids == 0, IGNORE_INDEX)
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels}


def test_packed_bounds():
    q = torch.zeros(1, 2, 9, 4)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert packed_bounds(pos, q, q) == [(0, 3), (3, 5), (5, 9)]
    assert packed_bounds(torch.arange(9)[None], q, q) is None  # one sequence: plain sdpa
    assert packed_bounds(pos, q, torch.zeros(1, 2, 12, 4)) is None  # a cache in play
    assert packed_bounds(None, q, q) is None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_equals_block_diagonal_sdpa(arch, dtype, monkeypatch):
    import loratune.ops.attention as attention

    calls = []
    real = attention.packed_causal_attention
    monkeypatch.setattr(attention, "packed_causal_attention",
                        lambda q, k, v, b, s: calls.append(b) or real(q, k, v, b, s))
    batch = packed([5, 9, 1, 7])
    model = tiny_model(arch, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    ref_loss, _ = token_loss_sum(model, batch)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert enable_varlen_attention(model)
    assert model.config._attn_implementation == NAME
    loss, _ = token_loss_sum(model, batch)
    loss.backward()
    assert calls and all(b == [(0, 5), (5, 14), (14, 15), (15, 22)] for b in calls)  # the fast kernel ran
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], **TOL[dtype], msg=n)


def test_varlen_matches_separate_examples_and_padded_batches_still_work():
    model = tiny_model("llama")
    enable_varlen_attention(model)
    batch = packed([6, 4])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        second = model(input_ids=batch["input_ids"][:, 6:], use_cache=False).logits
        torch.testing.assert_close(logits[:, 6:], second, **TOL[torch.float32])
        ids = batch["input_ids"][:, :6].repeat(2, 1)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        short = model(input_ids=ids[1:, :4], use_cache=False).logits
        torch.testing.assert_close(padded[1:, :4], short, **TOL[torch.float32])


def test_generation_still_works():
    model = tiny_model("llama")
    enable_varlen_attention(model)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.gpu
def test_varlen_equals_block_diagonal_sdpa_cuda():
    batch = {k: v.cuda() for k, v in packed([5, 9, 7]).items()}
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        ref, _ = token_loss_sum(model, batch)
        enable_varlen_attention(model)
        got, _ = token_loss_sum(model, batch)
    torch.testing.assert_close(got, ref, **TOL[torch.bfloat16])


def per_example_sdpa(q, k, v, bounds, scale):
    """Reference: causal sdpa on each example, (H, N, hd) -> (N, H, hd)."""
    outs = [F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True, scale=scale,
                                           enable_gqa=True) for s, e in bounds]
    return torch.cat(outs, dim=1).transpose(0, 1)


def qkv(heads, kv_heads, lengths, dtype, dim=8, seed=0):
    """q in Transformers' layout (a transposed view of (N, H, hd)), k and v contiguous (KV, N, hd)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q = (2 * torch.randn(n, heads, dim, generator=g)).to(dtype).transpose(0, 1)
    k = (2 * torch.randn(kv_heads, n, dim, generator=g)).to(dtype)
    v = torch.randn(kv_heads, n, dim, generator=g).to(dtype)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return q, k, v, [(s, s + t) for s, t in zip(starts, lengths)]


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
@pytest.mark.parametrize("block", [4, 128])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_packed_causal_attention_matches_sdpa_per_example(heads, kv_heads, block, dtype):
    q0, k0, v0, bounds = qkv(heads, kv_heads, [1, 7, 9, 16, 37], dtype)
    scale = 0.3
    grad = torch.randn(q0.shape[1], heads, q0.shape[2], generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for fn in (packed_causal_attention, per_example_sdpa):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q0, k0, v0))
        kwargs = {"block": block} if fn is packed_causal_attention else {}
        out = fn(q, k, v, bounds, scale, **kwargs)
        out.backward(grad)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    if dtype in (torch.bfloat16, torch.float16):  # compare both with the float64 truth, not each other
        q, k, v = (t.detach().double().requires_grad_() for t in (q0, k0, v0))
        out = per_example_sdpa(q, k, v, bounds, scale)
        out.backward(grad.double())
        truth = (out.detach(), q.grad, k.grad, v.grad)
        for name, got, ref, want in zip("out q k v".split(), results[0], results[1], truth):
            assert got.dtype == dtype
            assert rel_err(got, want) < max(2.5 * rel_err(ref, want), 1e-2), name
    else:
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        for name, got, want in zip("out q k v".split(), *results):
            torch.testing.assert_close(got, want, **tol, msg=name)


def _score_precisions(monkeypatch):
    """Record oneDNN's fp32 precision at every score product of the blocked kernel."""
    from loratune.ops import attention

    seen, real = [], torch.baddbmm

    def spy(*args, **kwargs):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.torch, "baddbmm", spy)
    return seen


needs_precision_setting = pytest.mark.skipif(
    not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"),
    reason="this torch has no per-backend fp32 precision")


@needs_precision_setting
@pytest.mark.parametrize("dtype,during",
                         [(torch.bfloat16, "bf16"), (torch.float16, None), (torch.float32, None)])
def test_bf16_score_products_only_for_bf16_inputs_and_setting_put_back(dtype, during, monkeypatch):
    seen = _score_precisions(monkeypatch)
    before = torch.backends.mkldnn.matmul.fp32_precision
    q, k, v, bounds = qkv(6, 2, [5, 9], dtype)
    packed_causal_attention(q, k, v, bounds, 0.3, block=4)
    assert len(seen) == 5  # 2 + 3 blocks of 4 rows
    assert set(seen) == {during or before}
    assert torch.backends.mkldnn.matmul.fp32_precision == before


@needs_precision_setting
def test_bf16_score_setting_is_put_back_after_an_error(monkeypatch):
    from loratune.ops import attention

    before = torch.backends.mkldnn.matmul.fp32_precision

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(attention.torch, "baddbmm", broken)
    q, k, v, bounds = qkv(2, 2, [4], torch.bfloat16)
    with pytest.raises(RuntimeError, match="out of memory"):
        packed_causal_attention(q, k, v, bounds, 0.3)
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_bf16_score_products_give_the_fp32_scores(monkeypatch):
    """bf16 q and k are exact in bf16, so the faster product gives what the fp32 one gives, up to the
    order of the fp32 sums: outputs and gradients agree far inside bf16's own rounding."""
    from loratune.ops import attention

    q0, k0, v0, bounds = qkv(6, 2, [37, 128, 91], torch.bfloat16, dim=64)
    grad = torch.randn(q0.shape[1], 6, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    results = []
    for setting in (attention._MKLDNN_MATMUL, None):
        monkeypatch.setattr(attention, "_MKLDNN_MATMUL", setting)
        q, k, v = (t.detach().clone().requires_grad_() for t in (q0, k0, v0))
        out = packed_causal_attention(q, k, v, bounds, 0.125)
        out.backward(grad)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for name, fast, plain in zip("out q k v".split(), *results):
        assert rel_err(fast, plain) < 1e-3, name


def test_packed_causal_attention_gradcheck():
    q, k, v, bounds = qkv(4, 2, [3, 5], torch.float64, dim=4)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: packed_causal_attention(q, k, v, bounds, 0.5, block=2),
                                    (q, k, v))


def test_packed_causal_attention_rejects_bad_shapes():
    q, k, v, bounds = qkv(6, 4, [3], torch.float32)
    with pytest.raises(ValueError, match="packed_causal_attention"):
        packed_causal_attention(q, k, v, bounds, 1.0)
    q, k, v, _ = qkv(4, 2, [3, 5], torch.float32)
    # gap, empty, too long
    for bounds in ([(0, 3)], [(0, 3), (4, 8)], [(0, 3), (3, 3), (3, 8)], [(0, 9)], []):
        with pytest.raises(ValueError, match="bounds"):
            packed_causal_attention(q, k, v, bounds, 1.0)


class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("kwargs,fast", [
    ({}, True),
    ({"sliding_window": 16}, True),  # longer than every example: changes nothing
    ({"sliding_window": 4}, False),  # cuts into an example: the block-diagonal mask path
    ({"softcap": 30.0}, False),
    ({"dropout": 0.1}, False),
])
def test_fast_kernel_only_where_it_computes_the_same(kwargs, fast, monkeypatch):
    import loratune.ops.attention as attention

    calls = []
    real = attention.packed_causal_attention
    monkeypatch.setattr(attention, "packed_causal_attention", lambda *a: calls.append(1) or real(*a))
    fallback = []
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda *a, **k: fallback.append(k) or (None, None))
    q, k, v, bounds = qkv(4, 2, [5, 7], torch.float32)
    position_ids = torch.cat([torch.arange(e - s) for s, e in bounds])[None]
    varlen_sdpa_attention(_Module(), q[None], k[None], v[None], None, position_ids=position_ids, **kwargs)
    assert bool(calls) == fast and bool(fallback) == (not fast)


def test_causal_bias_is_a_slice_of_one_strip():
    from loratune.ops.attention import _STRIPS, _causal_bias

    _STRIPS.clear()
    for rep in (1, 3):
        for rows, cols in [(1, 1), (3, 3), (3, 10), (4, 4), (2, 700), (4, 9)]:
            bias = _causal_bias(rows, cols, 4, torch.float32, torch.device("cpu"), rep)
            future = torch.arange(cols)[None] > (cols - rows + torch.arange(rows)[:, None])
            want = torch.zeros(rows, cols).masked_fill_(future, float("-inf")).repeat_interleave(rep, dim=0)
            torch.testing.assert_close(bias, want)
    assert len(_STRIPS) == 2 and _STRIPS[(torch.float32, torch.device("cpu"), 4, 1)].shape == (4, 4 + 1024)
    assert _STRIPS[(torch.float32, torch.device("cpu"), 4, 3)].shape == (12, 4 + 1024)


def test_rows_with_a_long_example_take_the_flash_kernel(monkeypatch):
    import loratune.ops.attention as attention

    q, k, v, bounds = qkv(4, 2, [5, 7], torch.bfloat16)
    position_ids = torch.cat([torch.arange(e - s) for s, e in bounds])[None]
    fast, _ = varlen_sdpa_attention(_Module(), q[None], k[None], v[None], None, position_ids=position_ids)
    calls = []
    monkeypatch.setattr(attention, "BLOCKED_MAX_LENGTH", 6)  # the 7-token example is now "long"
    monkeypatch.setattr(attention, "packed_causal_attention", lambda *a: calls.append(1))
    flash, _ = varlen_sdpa_attention(_Module(), q[None], k[None], v[None], None, position_ids=position_ids)
    assert not calls and flash.shape == fast.shape == (1, 12, 4, 8) and flash.dtype == torch.bfloat16
    torch.testing.assert_close(flash, fast, **TOL[torch.bfloat16])


def test_example_starts_are_scanned_once_per_position_ids_tensor():
    from loratune.ops import attention

    q = torch.zeros(1, 2, 6, 4)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert packed_bounds(pos, q, q) == [(0, 3), (3, 6)]
    assert attention._LAST_STARTS[0]() is pos
    pos[0, 4] = 0  # changed in place: its version moves on, so it is scanned again
    assert packed_bounds(pos, q, q) == [(0, 3), (3, 4), (4, 6)]
    assert packed_bounds(torch.tensor([[0, 1, 0, 1, 2, 3]]), q, q) == [(0, 2), (2, 6)]  # another tensor


def test_the_starts_cache_does_not_keep_position_ids_alive():
    import gc
    import weakref

    q = torch.zeros(1, 2, 6, 4)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert packed_bounds(pos, q, q) == [(0, 3), (3, 6)]
    alive = weakref.ref(pos)
    del pos
    gc.collect()
    assert alive() is None
    # a new tensor: scanned
    assert packed_bounds(torch.tensor([[0, 1, 2, 0, 1, 2]]), q, q) == [(0, 3), (3, 6)]
