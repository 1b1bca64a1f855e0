"""LoraLinear's fused path (loratune.ops.lora_linear) against its reference path, inside models."""

from __future__ import annotations

import pytest
import torch

from factories import tiny_batch, tiny_model
from loratune import LoraConfig, get_peft_model
from loratune.ops import reference_paths
from tolerances import assert_changed, assert_close


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x).logits
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference_outputs_and_grads(arch, dtype):
    model = get_peft_model(tiny_model(arch, dtype=dtype),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    x = tiny_batch(2, 6)
    with reference_paths():
        fresh, _ = _loss_and_grads(model, x)
    with torch.no_grad():  # a trained-looking adapter, so the LoRA branch matters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    fast_out, fast_grads = _loss_and_grads(model, x)
    with reference_paths():
        ref_out, ref_grads = _loss_and_grads(model, x)
    assert_changed(ref_out, fresh)
    assert_close(fast_out, ref_out, dtype)
    assert fast_grads.keys() == ref_grads.keys() and fast_grads
    for name in ref_grads:
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        assert_close(fast_grads[name] / scale, ref_grads[name] / scale, dtype)


def test_fused_fresh_adapter_is_bitwise_base():
    base = tiny_model("llama", dtype=torch.bfloat16)
    x = tiny_batch()
    expected = base(x).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(model(x).logits, expected)


def test_fused_path_not_used_for_mixed_batches_or_two_adapters():
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                           "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    x = tiny_batch(2, 5)
    model.set_adapter(["a", "b"])
    both = model(x).logits
    with reference_paths():
        assert_close(both, model(x).logits)
    mixed = model(x, adapter_names=["a", "b"]).logits
    model.set_adapter("a")
    assert_close(mixed[:1], model(x[:1]).logits)
