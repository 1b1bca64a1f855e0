"""Tests for batch plans and collation (loratune.data.batching), including packed attention isolation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from factories import VOCAB, tiny_model
from loratune.data import IGNORE_INDEX, collate, plan_batches, split_by_tokens

FP32_ATOL = 1e-5  # per-token loss tolerance, fp32 tiny model: packed vs separate runs


def make_examples(lengths: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]  # an untrained "prompt" third
        labels[0] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def on(device, batch: dict) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def per_token_losses(model, batch) -> torch.Tensor:
    """Next-token CE at every position (0 where the label is ignored): (B, T-1)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return loss


def test_collate_padded_layout():
    exs = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(exs, packing=False, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    # first label always ignored
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_packed_layout_and_truncation():
    exs = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
           {"input_ids": [8, 9, 10, 11], "labels": [8, 9, 10, 11]}]
    batch = collate(exs, packing=True, pad_token_id=0, max_seq_length=3)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2]]
    assert exs[0]["labels"] == [5, 6, 7]  # inputs are not modified


@pytest.mark.parametrize(
    "attn, device",
    [("sdpa", "cpu"), ("eager", "cpu"), pytest.param("sdpa", "cuda", marks=pytest.mark.gpu)],
)
def test_packed_losses_equal_separate_runs(attn, device):
    model = tiny_model("llama", seed=0, dtype=torch.float32).to(device)
    model.config._attn_implementation = attn
    exs = make_examples([7, 12, 3, 9], seed=1)
    packed = on(device, collate(exs, packing=True, pad_token_id=0))
    with torch.no_grad():
        got = per_token_losses(model, packed)[0]  # (N-1,)
        padded = per_token_losses(model, on(device, collate(exs, packing=False, pad_token_id=0)))  # (B, T-1)
        separate = [per_token_losses(model, on(device, collate([ex], packing=False, pad_token_id=0)))[0]
                    for ex in exs]
        # vacuity check: the same packed row with positions that do not restart mixes examples
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1], device=device)[None])
        leaked = per_token_losses(model, leaky)[0]
    start = 0
    for i, (ex, ref) in enumerate(zip(exs, separate)):
        n = len(ex["input_ids"])
        # packed position start+t predicts token start+t+1; the last one predicts the next example's
        # first token, whose label is IGNORE_INDEX
        torch.testing.assert_close(got[start : start + n - 1], ref, atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(padded[i, : n - 1], ref, atol=FP32_ATOL, rtol=0)
        start += n
    assert not torch.allclose(leaked, got, atol=1e-3)


def test_packed_gradients_equal_separate_runs():
    model = tiny_model("llama", seed=2)
    weight = model.model.layers[0].self_attn.q_proj.weight
    weight.requires_grad_(True)
    exs = make_examples([6, 10, 4], seed=3)
    per_token_losses(model, collate(exs, packing=True, pad_token_id=0)).sum().backward()
    packed_grad, weight.grad = weight.grad.clone(), None
    for ex in exs:
        per_token_losses(model, collate([ex], packing=False, pad_token_id=0)).sum().backward()
    torch.testing.assert_close(packed_grad, weight.grad, atol=1e-5, rtol=1e-4)
    assert packed_grad.abs().sum() > 0


def test_plan_is_deterministic_and_covers_every_example():
    lengths = [5, 40, 12, 7, 33, 2, 18, 9, 26, 11]
    a = plan_batches(lengths, 3, 7, 0)
    assert a == plan_batches(lengths, batch_size=3, seed=7, epoch=0)
    assert a != plan_batches(lengths, 3, 7, 1) and a != plan_batches(lengths, 3, 8, 0)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [3, 3, 3, 1]


def test_a_packed_micro_batch_is_cut_to_the_token_budget():
    lengths = [5, 40, 12, 7, 33, 2, 18, 9, 26, 11, 40, 40]
    pieces = split_by_tokens(list(range(12)), lengths, 40, 80)
    assert [i for p in pieces for i in p] == list(range(12))  # the same examples, in order
    assert all(sum(lengths[i] for i in p) <= 80 for p in pieces) and len(pieces) > 1
    assert split_by_tokens([3, 1], lengths, 40, 0) == [[3, 1]]  # 0: no budget, one pass


def test_a_long_example_goes_alone_and_lengths_are_cut_to_max_seq_length():
    lengths = [100, 10, 10, 10, 500, 10, 10, 10, 10, 10]
    pieces = split_by_tokens(list(range(10)), lengths, 1024, 120)
    assert [4] in pieces  # longer than the budget: alone
    assert all(sum(lengths[i] for i in p) <= 120 for p in pieces if p != [4])
    # examples longer than max_seq_length count as truncated: two 300-token rows cut to 100 share 200
    assert split_by_tokens([0, 1], [300, 300], 100, 200) == [[0, 1]]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), min_size=0, max_size=60),
    batch_size=st.integers(1, 5),
    world_size=st.integers(1, 4),
    seed=st.integers(0, 3),
)
def test_ddp_shards_are_disjoint_equal_and_match_the_global_plan(lengths, batch_size, world_size, seed):
    full = plan_batches(lengths, batch_size, seed, 0)
    shards = [plan_batches(lengths, batch_size, seed, 0, world_size, r)
              for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    # micro-batch k of rank r is micro-batch k*world_size + r of the single-process plan; a rank
    # without one in the last round gets an empty micro-batch, so nothing is dropped
    for r, shard in enumerate(shards):
        for k, batch in enumerate(shard):
            g = k * world_size + r
            assert batch == (full[g] if g < len(full) else [])
    assert len(shards[0]) == -(-len(full) // world_size)
    seen = [i for s in shards for b in s for i in b]
    assert sorted(seen) == list(range(len(lengths)))


def test_ddp_global_batch_equals_single_process_batch():
    lengths = list(range(1, 33))
    single = plan_batches(lengths, 4, 3, 2)  # one process, batch 4
    ranks = [plan_batches(lengths, 2, 3, 2, 2, r) for r in range(2)]  # two processes, batch 2
    for step, batch in enumerate(single):
        assert sorted(batch) == sorted(ranks[0][step] + ranks[1][step])
