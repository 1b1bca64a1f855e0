"""Per-example attention for packed rows against Transformers' block-diagonal sdpa."""

from __future__ import annotations

import pytest
import torch

from factories import VOCAB, tiny_model
from loratune.data import IGNORE_INDEX
from loratune.ops.attention import NAME, enable_varlen_attention, packed_bounds
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
    real = attention.packed_bounds
    monkeypatch.setattr(attention, "packed_bounds", lambda *a: calls.append(real(*a)) or calls[-1])
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
    assert calls and all(b == [(0, 5), (5, 14), (14, 15), (15, 22)] for b in calls)  # the split path ran
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], **TOL[dtype], msg=n)


def test_varlen_matches_separate_examples_and_padded_batches_still_work():
    model = tiny_model("llama")
    enable_varlen_attention(model)
    batch = packed([6, 4])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
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
