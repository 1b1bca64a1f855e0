"""Per-row LoRA layers (the gathered fast path) against the row-by-row reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from factories import tiny_model
from loratune.serve.lora_rows import (
    RowAdapterWeights,
    RowLoraLinear,
    ensure_row_lora,
    linear_shapes,
    reference_row_lora,
    set_rows,
)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_layer(in_f, out_f, ranks, dtype=torch.float32, seed=0) -> RowLoraLinear:
    g = torch.Generator().manual_seed(seed)
    layer = RowLoraLinear(nn.Linear(in_f, out_f).to(dtype), in_f, out_f)
    for adapter_id, r in enumerate(ranks, start=1):
        a = torch.randn(r, in_f, generator=g).to(dtype)
        b = torch.randn(out_f, r, generator=g).to(dtype)
        layer.add_adapter(adapter_id, RowAdapterWeights(a, b, scaling=0.5 + adapter_id))
    return layer


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(0, 3), min_size=1, max_size=6), t=st.integers(1, 4),
       ranks=st.lists(st.integers(1, 8), min_size=3, max_size=3), dtype=st.sampled_from(list(TOL)))
def test_gathered_rows_equal_row_by_row_reference(rows, t, ranks, dtype):
    layer = make_layer(12, 10, ranks, dtype)
    ids = tuple(None if r == 0 else r for r in rows)
    x = torch.randn(len(rows), t, 12).to(dtype)
    layer.plan_rows(ids)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_row_lora(layer, x, list(ids)), **TOL[dtype])


def test_base_rows_are_bitwise_the_base_layer_and_adapters_change_rows():
    layer = make_layer(8, 6, [2, 4])
    x = torch.randn(3, 2, 8)
    layer.plan_rows((None, 1, 2))
    with torch.no_grad():
        y, base = layer(x), layer.base_layer(x)
    assert torch.equal(y[0], base[0])
    assert not torch.allclose(y[1], base[1]) and not torch.allclose(y[2], base[2])
    layer.plan_rows((None, None, None))
    with torch.no_grad():
        assert torch.equal(layer(x), base)


def test_ensure_row_lora_wraps_linear_and_conv1d_in_place():
    for arch, name in (("llama", "model.layers.0.self_attn.q_proj"), ("gpt2", "transformer.h.0.attn.c_attn")):
        model = tiny_model(arch)
        shapes = linear_shapes(model)
        ids = torch.randint(0, 100, (2, 5))
        with torch.no_grad():
            before = model(ids).logits
        layer = ensure_row_lora(model, name)
        assert model.get_submodule(name) is layer and ensure_row_lora(model, name) is layer
        assert linear_shapes(model) == shapes  # the wrapper reports the wrapped layer's name and shape
        in_f, out_f = shapes[name]
        layer.add_adapter(1, RowAdapterWeights(torch.randn(2, in_f), torch.randn(out_f, 2), 1.0))
        set_rows(model, (None, None))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, before)
            set_rows(model, (None, 1))
            after = model(ids).logits
        assert torch.equal(after[0], before[0]) and not torch.allclose(after[1], before[1])


def test_bf16_rows_give_peft_logits_bitwise(tmp_path):
    """A bf16 base serves an adapter with PEFT's arithmetic (fp32 update, one rounding of the sum)."""
    from pathlib import Path

    from peft import LoraConfig, PeftModel, get_peft_model

    from loratune.serve.registry import prepare_adapter

    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(3)
    trained = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False))
    trained.save_pretrained(tmp_path / "a")
    peft = PeftModel.from_pretrained(tiny_model(dtype=torch.bfloat16), str(tmp_path / "a")).eval()
    served = tiny_model(dtype=torch.bfloat16)
    prepared = prepare_adapter("a", Path(tmp_path / "a"), linear_shapes(served), torch.bfloat16)
    for name, weights in prepared.layers.items():
        ensure_row_lora(served, name).add_adapter(1, weights)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft(ids).logits
        set_rows(served, (1, 1))
        assert torch.equal(served(ids).logits, want)
        with peft.disable_adapter():
            base = peft(ids).logits
        set_rows(served, (None, 1))  # a base row beside an adapter row
        mixed = served(ids).logits
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[1], want[1])
