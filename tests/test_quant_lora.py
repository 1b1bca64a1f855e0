"""LoRA on a quantized base (QLoRA): equals LoRA on the dequantized weight, trains, saves and
loads, counts parameters, and merges only after dequantizing. Layers alone: test_quant.py."""

from __future__ import annotations

import copy

import pytest
import torch

from factories import tiny_batch, tiny_model
from loratune import LoraConfig, PeftModel, get_peft_model
from loratune.errors import MergeError
from loratune.quant import dequantize_model, quantize_model, quantized_layers

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
KINDS = {   # name -> quantize_model kwargs
    "nf4": dict(bits=4, quant_type="nf4"),
    "nf4-dq": dict(bits=4, quant_type="nf4", double_quant=True),
    "fp4": dict(bits=4, quant_type="fp4"),
    "int8": dict(bits=8),
}


def _lora_config(**overrides) -> LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return LoraConfig(**(kwargs | overrides))


def _copy_lora_weights(src, dst) -> None:
    lora = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    result = dst.load_state_dict(lora, strict=False)
    assert not result.unexpected_keys and lora


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_qlora_equals_lora_on_dequantized_weight(kind, arch):
    ids = tiny_batch()
    quantized = quantize_model(tiny_model(arch), compute_dtype=torch.float32, **KINDS[kind])
    plain = dequantize_model(copy.deepcopy(quantized), dtype=torch.float32)
    qlora, lora = get_peft_model(quantized, _lora_config()), get_peft_model(plain, _lora_config())
    _copy_lora_weights(qlora, lora)
    with qlora.disable_adapter():
        base = qlora(ids).logits
    out = qlora(ids).logits
    assert not torch.allclose(out, base, atol=1e-3)   # the adapter does something
    torch.testing.assert_close(out, lora(ids).logits, **TOL[torch.float32])


def test_qlora_layer_in_bf16_equals_closed_form():
    model = get_peft_model(quantize_model(tiny_model(), bits=4, double_quant=True), _lora_config())
    layer = model.get_submodule("model.model.layers.0.mlp.down_proj")
    x = torch.randn(2, 5, layer.in_features)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = (x.bfloat16() @ layer.base_layer.dequantize().t()).float()   # (B, T, out)
    torch.testing.assert_close(layer(x), base + layer.scaling["default"] * (x @ A.t() @ B.t()),
                               **TOL[torch.bfloat16])


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_qlora_training_loss_falls_and_only_lora_changes(kind):
    torch.manual_seed(0)
    base = quantize_model(tiny_model(), **KINDS[kind])
    model = get_peft_model(base, _lora_config(r=8, init_lora_weights=True))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny_batch(2, 16)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2 and losses[-1] == min(losses), losses
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    changed = [n for n, p in model.named_parameters()
               if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_before)   # every A and B moved: gradients reach all layers


def test_parameter_counts_include_packed_weights():
    plain = get_peft_model(tiny_model(), _lora_config())
    qlora = get_peft_model(quantize_model(tiny_model(), bits=4, double_quant=True), _lora_config())
    assert qlora.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()


def test_save_load_round_trip_on_quantized_base(tmp_path):
    ids = tiny_batch()
    model = get_peft_model(quantize_model(tiny_model(), **KINDS["nf4-dq"]), _lora_config())
    expected = model(ids).logits
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(".lora_" in k for k in keys)   # no quantized base storage in the adapter file
    fresh_base = quantize_model(tiny_model(), **KINDS["nf4-dq"])   # quantization is deterministic
    with torch.no_grad():
        base_logits = fresh_base(ids).logits
    loaded = PeftModel.from_pretrained(fresh_base, str(tmp_path))
    assert quantized_layers(loaded)
    assert not torch.allclose(base_logits, expected, atol=1e-3)
    assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_after_dequantize_matches_adapter_model(arch, tmp_path):
    """The recipe of docs/qlora.md: quantized base -> dequantize to bf16 -> merge; state the gap."""
    ids = tiny_batch()
    qlora = get_peft_model(quantize_model(tiny_model(arch, dtype=torch.bfloat16), bits=4), _lora_config())
    with pytest.raises(MergeError, match="dequantize"):
        qlora.merge_adapter()
    reference = qlora(ids).logits.float()
    with qlora.disable_adapter():
        adapter_effect = (qlora(ids).logits.float() - reference).abs().max().item()
    qlora.save_pretrained(str(tmp_path))

    # 1. dequantize a freshly quantized base, then load the adapter and merge
    base = dequantize_model(quantize_model(tiny_model(arch, dtype=torch.bfloat16), bits=4), torch.bfloat16)
    merged = PeftModel.from_pretrained(base, str(tmp_path)).merge_and_unload()
    assert not quantized_layers(merged)
    gap = (merged(ids).logits.float() - reference).abs().max().item()
    # bf16 rounding of W_deq + s*BA is the only difference: far below what the adapter changes
    assert gap < 0.05 * adapter_effect, (gap, adapter_effect)

    # 2. or dequantize the LoRA model in place, then merge (GPT-2 goes back to Conv1D)
    again = dequantize_model(qlora, torch.bfloat16).merge_and_unload()
    assert (again(ids).logits.float() - reference).abs().max().item() < 0.05 * adapter_effect


def test_load_base_model_in_4bit():
    from loratune.tools.loading import load_base_model

    model = load_base_model("preset:tiny-llama", dtype="bfloat16", load_in_4bit=True,
                            bnb_4bit_compute_dtype="bfloat16", bnb_4bit_use_double_quant=True)
    layers = quantized_layers(model)
    assert layers and all(layer.double_quant and layer.compute_dtype == torch.bfloat16 for _, layer in layers)
    assert not any(p.requires_grad for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = tiny_batch()
    grads = []
    for checkpointing in (False, True):
        base = quantize_model(tiny_model(), bits=4, double_quant=True)
        if checkpointing:
            base.activation_checkpointing_enable({"use_reentrant": False})
        torch.manual_seed(1)
        model = get_peft_model(base, _lora_config())
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, **TOL[torch.float32])


@pytest.mark.slow
def test_trainer_run_with_load_in_4bit(tmp_path):
    import yaml

    from loratune.train import run

    result = run(None, model_name_or_path="preset:tiny-llama", train_file="examples/data/train.jsonl",
                 output_dir=str(tmp_path), max_steps=6, learning_rate=5e-3, logging_steps=1,
                 per_device_train_batch_size=2, max_seq_length=64, load_in_4bit=True,
                 bnb_4bit_use_double_quant=True)
    assert result.final_loss < result.first_loss
    assert (tmp_path / "adapter_model.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "train_config.yaml").read_text())
    assert saved["load_in_4bit"] is True and saved["bnb_4bit_use_double_quant"] is True
