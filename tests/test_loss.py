"""token_loss_sum (chunked, hidden states -> head) against the full-logits reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factories import VOCAB, tiny_model
from loratune.data import IGNORE_INDEX
from loratune.train.loss import token_loss_sum, token_loss_sum_reference

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
}


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    labels[0, :4] = IGNORE_INDEX  # a prompt that is not trained
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 4]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[position_ids == 0] = IGNORE_INDEX  # first token of each example
    labels[0, 6:8] = IGNORE_INDEX
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels}


def loss_and_grads(fn, model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = fn(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), n, grads


def assert_same(model, batch, dtype):
    ref_loss, ref_n, ref_grads = loss_and_grads(token_loss_sum_reference, model, batch)
    loss, n, grads = loss_and_grads(token_loss_sum, model, batch)
    assert n == ref_n > 0
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL[dtype], msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch])
def test_fast_equals_reference_fp32(arch, make_batch):
    model = tiny_model(arch)
    assert_same(model, make_batch(), torch.float32)


def test_fast_equals_reference_bf16():
    model = tiny_model("llama", dtype=torch.bfloat16)
    assert_same(model, padded_batch(), torch.bfloat16)


def test_fast_equals_reference_with_frozen_base_and_trainable_subset():
    model = tiny_model("llama")
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name)  # stands in for LoRA: only some inner weights train
    assert_same(model, packed_batch(), torch.float32)


def test_token_count_and_value_change_with_labels():
    model = tiny_model("llama")
    batch = padded_batch()
    loss, n = token_loss_sum(model, batch)
    batch["labels"][1, 3] = IGNORE_INDEX  # perturb: one fewer trained token
    loss2, n2 = token_loss_sum(model, batch)
    assert n2 == n - 1 and not torch.equal(loss, loss2)


def test_no_trained_tokens_gives_zero_and_backward_works():
    model = tiny_model("llama")
    batch = padded_batch()
    batch["labels"].fill_(IGNORE_INDEX)
    loss, n = token_loss_sum(model, batch)
    assert n == 0 and loss.item() == 0.0
    loss.backward()


class ScaledHead(nn.Module):
    """A head that is not a plain Linear: the fast path must defer to the reference."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x) * 0.5

    @property
    def weight(self):
        return self.head.weight


def test_unrecognised_head_falls_back_to_reference():
    model = tiny_model("llama")
    model.lm_head = ScaledHead(model.lm_head)
    assert_same(model, padded_batch(), torch.float32)
