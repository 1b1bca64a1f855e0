"""load_model: base from the adapter config, quantization from train_config.yaml, loud failures."""

from __future__ import annotations

import os

import pytest
import torch

from loratune import LoraConfig, get_peft_model
from loratune.errors import AdapterError, ConfigError
from loratune.tools.load_trained import (
    QUANT_DEFAULTS,
    load_model,
    read_train_config,
    resolve_base_name,
    resolve_quant,
)
from loratune.tools.loading import load_base_model, load_tokenizer

PRESET = "preset:tiny-llama"


def save_tiny_model_dir(path) -> str:
    """A 2-layer, 32-wide Llama with the preset's tokenizer (and chat template), as an HF directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=3,
                         pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(path))
    load_tokenizer(PRESET).save_pretrained(str(path))
    return str(path)


def save_tiny_adapter(path, base: str, *, seed: int = 0, scale: float = 0.05, train_config: str | None = None,
                      **lora) -> str:
    """Save an adapter for `base` with small random lora_B (so it changes the output)."""
    base_model = load_base_model(base, dtype="float32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        base_model_name_or_path=base, **lora)
    model = get_peft_model(base_model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(str(path))
    if train_config is not None:
        with open(os.path.join(path, "train_config.yaml"), "w", encoding="utf-8") as fh:
            fh.write(train_config)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("base"))


def test_base_defaults_to_the_adapter_config(tmp_path, model_dir):
    path = save_tiny_adapter(tmp_path / "a", model_dir)
    loaded = load_model(adapter=path, dtype="float32")
    assert loaded.base_name == model_dir
    assert loaded.adapter_config.r == 4
    assert loaded.quantized is None
    assert hasattr(loaded.model, "disable_adapter") and not loaded.model.training
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        with loaded.model.disable_adapter():
            base = loaded.model(input_ids=ids).logits
        adapted = loaded.model(input_ids=ids).logits
    assert not torch.allclose(base, adapted)  # the adapter is really applied


def test_quantization_comes_from_train_config_and_flags_win(tmp_path, model_dir):
    path = save_tiny_adapter(tmp_path / "a", model_dir,
                             train_config="load_in_4bit: true\nbnb_4bit_quant_type: fp4\n")
    assert read_train_config(path)["load_in_4bit"] is True
    quant = resolve_quant(path)
    assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == "fp4"
    assert resolve_quant(path, {"load_in_4bit": False, "bnb_4bit_quant_type": None})["load_in_4bit"] is False
    assert resolve_quant(None) == QUANT_DEFAULTS
    loaded = load_model(adapter=path, dtype="float32")
    assert loaded.quantized == "4-bit fp4"
    assert any(getattr(m, "is_quantized", False) for m in loaded.model.modules())


def test_a_bit_width_flag_replaces_the_one_the_adapter_was_trained_with(tmp_path):
    (tmp_path / "train_config.yaml").write_text("load_in_4bit: true\nbnb_4bit_use_double_quant: true\n")
    quant = resolve_quant(str(tmp_path), {"load_in_8bit": True, "load_in_4bit": None})
    assert (quant["load_in_4bit"], quant["load_in_8bit"]) == (False, True)
    with pytest.raises(ConfigError, match="pick one"):
        resolve_quant(str(tmp_path), {"load_in_8bit": True, "load_in_4bit": True})


@pytest.mark.parametrize("text, field", [
    ("load_in_4bit: 'no'\n", None),   # the word for False, not a truthy string
    ("load_in_4bit: [true]\n", "load_in_4bit"),
    ("load_in_4bit: true\nbnb_4bit_quant_type: nf5\n", "bnb_4bit_quant_type"),
    ("load_in_4bit: true\nbnb_4bit_compute_dtype: int8\n", "bnb_4bit_compute_dtype"),
])
def test_quantization_values_in_train_config_are_typed_or_named_with_the_file(text, field, tmp_path):
    (tmp_path / "train_config.yaml").write_text(text)
    if field is None:
        assert resolve_quant(str(tmp_path))["load_in_4bit"] is False
        return
    with pytest.raises(ConfigError, match=rf"train_config\.yaml: {field}"):
        resolve_quant(str(tmp_path))


def test_bad_inputs_raise_named_errors(tmp_path):
    with pytest.raises(ConfigError, match="--model_name_or_path"):
        resolve_base_name(None, None, None)
    with pytest.raises(ConfigError, match="base_model_name_or_path"):
        resolve_base_name(None, LoraConfig(), "adapter_dir")
    with pytest.raises(AdapterError, match="does not exist"):
        load_model(adapter=str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train_config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="train_config.yaml"):
        resolve_quant(str(bad))
    with pytest.raises(ConfigError, match="pick one"):
        resolve_quant(None, {"load_in_4bit": True, "load_in_8bit": True})


def test_a_file_given_as_the_adapter_is_named_as_a_file(tmp_path, model_dir):
    path = save_tiny_adapter(tmp_path / "a", model_dir)
    with pytest.raises(AdapterError,
                       match=r"adapter_model.safetensors: is a file, not an adapter directory; did you mean "
                                           rf"its directory {path}\?"):
        load_model(adapter=os.path.join(path, "adapter_model.safetensors"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AdapterError,
                       match="notes.txt: is a file, not an adapter directory; pass the adapter directory"):
        load_model(adapter=str(tmp_path / "notes.txt"))


def test_nan_or_inf_adapter_weights_are_refused_at_load(tmp_path, model_dir):
    from safetensors.torch import load_file, save_file

    path = save_tiny_adapter(tmp_path / "a", model_dir)
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, weights)
    with pytest.raises(AdapterError,
                       match=rf"{path}: 1 of {len(tensors)} adapter tensor\(s\) hold NaN or Inf "
                                           rf"values \({key}\)"):
        load_model(adapter=path, dtype="float32")


def test_resolve_device():
    from loratune.tools.load_trained import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="'banana' is not a device"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")
