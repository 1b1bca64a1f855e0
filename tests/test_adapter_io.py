"""Adapters on disk: PEFT's exact layout, save -> load gives the same logits, strict loading that
names every missing / unexpected / misshapen tensor, safe reading of adapter_model.bin."""

from __future__ import annotations

import json
import logging
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from factories import tiny_batch, tiny_model
from loratune import LoraConfig, PeftModel, get_peft_model
from loratune.adapter_io import read_adapter
from loratune.errors import AdapterError, ConfigError, UnsupportedFeatureError
from tolerances import assert_changed

CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules=["embed_tokens", "o_proj"], use_rslora=True, rank_pattern={"o_proj": 2})),
    ("llama", dict(target_modules=["q_proj", "down_proj"], use_dora=True)),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"])),
    ("qwen2", dict(target_modules=["q_proj", "k_proj"], bias="all", modules_to_save=["lm_head"])),
    ("qwen2", dict(target_modules=["q_proj"], bias="lora_only")),
]
IDS = ["llama", "embedding-rslora", "dora", "gpt2-conv1d", "qwen2-bias-all-mts", "qwen2-lora-only"]
FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * (0.2 if "lora_" in name else 0.02))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def saved(tmp_path, arch="llama", name="default", **kw):
    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=8, **kw), name)
    perturb(model)
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    return model, out


@pytest.mark.parametrize("arch,kw", CASES, ids=IDS)
def test_save_then_load_gives_the_same_logits(tmp_path, arch, kw):
    x = tiny_batch()
    model, out = saved(tmp_path, arch, **kw)
    expected = logits(model, x)
    assert_changed(expected, logits(tiny_model(arch), x))
    assert set(os.listdir(out)) == FILES
    loaded = PeftModel.from_pretrained(tiny_model(arch), str(out))
    assert torch.equal(logits(loaded, x), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    trainable = PeftModel.from_pretrained(tiny_model(arch), str(out), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_file_layout_is_peft_s(tmp_path):
    model, out = saved(tmp_path, target_modules=["q_proj", "embed_tokens"], use_dora=False)
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert not any("default" in k for k in keys)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["embed_tokens", "q_proj"] and cfg["inference_mode"] is True
    dora, out2 = saved(tmp_path / "d", target_modules=["q_proj"], use_dora=True)
    keys = set(load_file(str(out2 / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys


def test_model_card_is_written(tmp_path):
    _, out = saved(tmp_path, target_modules=["q_proj"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "q_proj" in card and "r=4" in card


def test_non_default_adapters_go_to_sub_folders(tmp_path):
    x = tiny_batch()
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    assert set(os.listdir(tmp_path)) == FILES | {"other"}
    assert set(os.listdir(tmp_path / "other")) == FILES
    model.set_adapter("other")
    expected = logits(model, x)
    assert_changed(expected, logits(tiny_model(), x))
    again = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "other"), adapter_name="other")
    assert again.active_adapters == ["other"]
    assert torch.equal(logits(again, x), expected)
    only = tmp_path / "only"
    model.save_pretrained(str(only), selected_adapters=["other"])
    assert os.listdir(only) == ["other"]
    with pytest.raises(ConfigError, match="'othre'"):
        model.save_pretrained(str(tmp_path / "typo"), selected_adapters=["default", "othre"])
    assert not (tmp_path / "typo").exists()


def test_load_adapter_adds_a_second_adapter(tmp_path):
    x = tiny_batch()
    first, out = saved(tmp_path, target_modules=["q_proj", "v_proj"])
    expected = logits(first, x)
    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    own = logits(model, x)
    assert_changed(expected, own)
    model.load_adapter(str(out), adapter_name="loaded")
    assert model.active_adapters == ["default"]  # loading does not activate
    assert torch.equal(logits(model, x), own)
    model.set_adapter("loaded")
    assert torch.equal(logits(model, x), expected)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".loaded." in n)
    model.load_adapter(str(out), adapter_name="trainable", is_trainable=True)
    model.set_adapter("trainable")
    assert any(p.requires_grad for n, p in model.named_parameters() if ".trainable." in n)


def rewrite_tensors(out, fn) -> None:
    path = str(out / "adapter_model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshapen"])
def test_strict_loading_names_the_bad_tensor(tmp_path, problem):
    x = tiny_batch()
    _, out = saved(tmp_path, target_modules=["q_proj"])
    bad_key = {"missing": Q0A, "unexpected": "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
               "misshapen": Q0A}[problem]

    def damage(tensors):
        if problem == "missing":
            del tensors[bad_key]
        elif problem == "unexpected":
            tensors[bad_key] = torch.zeros(4, 32)
        else:
            tensors[bad_key] = torch.zeros(3, 32)

    rewrite_tensors(out, damage)
    label = {"missing": "missing", "unexpected": "unexpected", "misshapen": "wrong shape"}[problem]
    user_model = tiny_model()
    user_model.model.layers[0].mlp.requires_grad_(False)  # the user's own trainable flags
    flags = {n: p.requires_grad for n, p in user_model.named_parameters()}
    with pytest.raises(AdapterError, match=label) as err:
        PeftModel.from_pretrained(user_model, str(out))
    assert bad_key in str(err.value)
    # The user's model is left as it came: no LoRA wrappers, the same trainable flags, base logits.
    assert {n: p.requires_grad for n, p in user_model.named_parameters()} == flags
    assert not any("lora_" in n or "base_layer" in n for n, _ in user_model.named_parameters())
    assert torch.equal(logits(user_model, x), logits(tiny_model(), x))
    model = get_peft_model(tiny_model(), LoraConfig(target_modules=["v_proj"]))
    before = logits(model, x)
    with pytest.raises(AdapterError, match=label):
        model.load_adapter(str(out), adapter_name="bad")
    assert "bad" not in model.peft_config and not any(".bad." in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, x), before)
    assert not any(type(m).__name__ == "LoraLinear" for n, m in model.named_modules() if "q_proj" in n)


def test_keys_outside_peft_layout_are_refused(tmp_path):
    _, out = saved(tmp_path, target_modules=["q_proj"])
    rewrite_tensors(out, lambda t: t.update({"model.layers.0.q_proj.lora_A.weight": torch.zeros(1)}))
    with pytest.raises(AdapterError, match="base_model.model."):
        read_adapter(str(out))


def test_config_with_unknown_fields_loads_with_a_warning(tmp_path, caplog):
    x = tiny_batch()
    model, out = saved(tmp_path, target_modules=["q_proj"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["brand_new_peft_option"] = {"x": 1}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="loratune"):
        loaded = PeftModel.from_pretrained(tiny_model(), str(out))
    assert "brand_new_peft_option" in caplog.text
    assert torch.equal(logits(loaded, x), logits(model, x))


@pytest.mark.parametrize("field,value", [("use_qalora", True), ("init_lora_weights", "loftq"),
                                         ("layer_replication", [[0, 1]]), ("peft_type", "ADALORA")])
def test_unsupported_feature_in_file_is_refused_by_name(tmp_path, field, value):
    _, out = saved(tmp_path, target_modules=["q_proj"])
    cfg = json.loads((out / "adapter_config.json").read_text()) | {field: value}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedFeatureError, match=str(value) if field == "peft_type" else field):
        PeftModel.from_pretrained(tiny_model(), str(out))


def to_bin(out) -> None:
    tensors = load_file(str(out / "adapter_model.safetensors"))
    os.remove(out / "adapter_model.safetensors")
    torch.save(tensors, out / "adapter_model.bin")


def test_bin_is_loaded_with_weights_only(tmp_path, monkeypatch):
    x = tiny_batch()
    model, out = saved(tmp_path, target_modules=["q_proj", "v_proj"])
    to_bin(out)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = PeftModel.from_pretrained(tiny_model(), str(out))
    assert calls == [True]
    assert torch.equal(logits(loaded, x), logits(model, x))
    with pytest.raises(AdapterError, match="only safetensors"):
        read_adapter(str(out), safetensors_only=True)


class Payload:
    def __reduce__(self):  # runs on an unsafe unpickle
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    _, out = saved(tmp_path, target_modules=["q_proj"])
    to_bin(out)
    with open(out / "adapter_model.bin", "wb") as fh:
        pickle.dump({Q0A: Payload()}, fh)
    with pytest.raises(AdapterError, match="weights_only"):
        PeftModel.from_pretrained(tiny_model(), str(out))


def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json"):
        PeftModel.from_pretrained(tiny_model(), str(tmp_path))
    _, out = saved(tmp_path, target_modules=["q_proj"])
    (out / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="safetensors"):
        read_adapter(str(out))
    os.remove(out / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        read_adapter(str(out))


def test_read_adapter_returns_config_and_tensors(tmp_path):
    _, out = saved(tmp_path, target_modules=["q_proj"])
    cfg, tensors = read_adapter(str(out))
    assert isinstance(cfg, LoraConfig) and cfg.r == 4 and cfg.target_modules == ["q_proj"]
    assert Q0A in tensors and tensors[Q0A].shape == (4, 32)


def test_an_adapter_of_another_base_says_which_base_it_was_trained_on(tmp_path):
    import json

    _, out = saved(tmp_path, target_modules=["q_proj"])
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/bigger"}))
    rewrite_tensors(out, lambda tensors: tensors.__setitem__(Q0A, torch.zeros(4, 48)))
    with pytest.raises(AdapterError, match=r"\(trained on 'org/bigger', loaded on .*: load it on its own"):
        PeftModel.from_pretrained(tiny_model(), str(out))
