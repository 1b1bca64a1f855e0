"""Tests for loratune.tools.loading: presets, local directories, dtype choice, error messages."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from factories import tiny_model
from loratune.dtypes import bf16_supported
from loratune.errors import ConfigError
from loratune.tools import loading
from loratune.tools.loading import (
    DEFAULT_MODEL,
    PRESETS_DIR,
    list_presets,
    load_base_model,
    load_tokenizer,
    save_preset_as_hf_dir,
)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def preset_fp32():
    return load_base_model(DEFAULT_MODEL, dtype="float32")


def test_default_preset_is_listed_and_small():
    assert DEFAULT_MODEL in list_presets()
    shipped = sum(p.stat().st_size for p in PRESETS_DIR.rglob("*") if p.is_file())
    assert shipped < 1_000_000


def test_preset_weights_are_deterministic_and_leave_global_rng_alone(preset_fp32):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = load_base_model(DEFAULT_MODEL, dtype="float32")
    assert torch.equal(torch.rand(3), expected_next)
    assert _same_weights(preset_fp32, again)


def test_preset_is_llama_with_large_init_and_named_by_preset(preset_fp32):
    cfg = preset_fp32.config
    assert cfg.model_type == "llama" and cfg.initializer_range == pytest.approx(0.2)
    assert cfg.name_or_path == DEFAULT_MODEL
    # the large init shows in the weights: std of a projection is ~0.2, not ~0.02
    std = preset_fp32.model.layers[0].self_attn.q_proj.weight.std().item()
    assert 0.15 < std < 0.25


def test_base_model_is_frozen_and_in_eval_mode(preset_fp32):
    assert not any(p.requires_grad for p in preset_fp32.parameters())
    assert not preset_fp32.training


def test_bf16_preset_is_the_fp32_preset_cast(preset_fp32):
    bf16 = load_base_model(DEFAULT_MODEL, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(preset_fp32.state_dict().items(), bf16.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_preset_tokenizer_has_special_tokens_and_chat_template():
    tok = load_tokenizer(DEFAULT_MODEL)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "<|im_end|>")
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # adds BOS like Llama
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("What is 2 + 3?", add_special_tokens=False)["input_ids"]) == "What is 2 + 3?"
    assert len(tok) <= AutoConfig.from_pretrained(PRESETS_DIR / "tiny-llama").vocab_size


def test_local_dir_written_from_preset_loads_back(tmp_path, preset_fp32):
    out = save_preset_as_hf_dir(DEFAULT_MODEL, tmp_path / "tiny")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert _same_weights(load_base_model(out, dtype="float32"), preset_fp32)
    tok = load_tokenizer(out)
    assert tok.chat_template == load_tokenizer(DEFAULT_MODEL).chat_template


def test_local_dir_from_factory_model_and_missing_pad_token(tmp_path):
    model = tiny_model("llama", seed=3)
    model.save_pretrained(tmp_path)
    tok = load_tokenizer(DEFAULT_MODEL)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg.get("pad_token") is None
    loaded = load_base_model(tmp_path, dtype="float32", device="cpu")
    assert _same_weights(loaded, model)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert load_tokenizer(tmp_path).pad_token == "<|im_end|>"  # falls back to EOS


@pytest.mark.parametrize(
    "name, expected",
    [
        ("preset:nope",
         "unknown preset 'preset:nope'; available presets: preset:smollm2-135m-instruct, preset:tiny-llama"),
        ("./no/such/dir", "is not a local directory, a hub id"),
        ("a/b/c", "is not a local directory, a hub id"),
    ],
)
def test_bad_model_names_raise_config_error(name, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_base_model(name)
    with pytest.raises(ConfigError):
        load_tokenizer(name)


def test_file_and_empty_dir_are_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        load_base_model(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_base_model(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_weights_name_the_file(tmp_path, damage):
    tiny_model("llama", seed=3).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "truncate":
        with open(weights, "r+b") as fh:
            fh.truncate(5000)
    else:
        weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=f"cannot read the weights in {weights} .*truncated or corrupt"):
        load_base_model(tmp_path, dtype="float32")


def test_truncated_pytorch_bin_weights_name_the_file(tmp_path):
    model = tiny_model("llama", seed=3)
    model.config.save_pretrained(tmp_path)
    weights = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    with open(weights, "r+b") as fh:
        fh.truncate(5000)
    with pytest.raises(ConfigError, match=f"cannot read the weights in {weights} "):
        load_base_model(tmp_path, dtype="float32")


def test_hub_id_offline_is_a_config_error():
    # conftest sets HF_HUB_OFFLINE=1: nothing is downloaded, the message says why
    with pytest.raises(ConfigError, match=r"cannot load 'loratune-tests/not-cached' from the Hugging Face "
                                          r"hub \(there is no local"):
        load_tokenizer("loratune-tests/not-cached")


def test_quantized_loading_needs_one_mode():
    with pytest.raises(ConfigError, match="pick one"):
        load_base_model(DEFAULT_MODEL, load_in_4bit=True, load_in_8bit=True)


def test_quantized_loading_calls_quantize_model(monkeypatch):
    calls = []

    def fake_quantize_model(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(loading, "quantize_model", fake_quantize_model)
    load_base_model(DEFAULT_MODEL, load_in_8bit=True)
    load_base_model(DEFAULT_MODEL, load_in_4bit=True, bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype="float16", quant_backend="torch")
    auto = torch.bfloat16 if bf16_supported("cpu") else torch.float32  # the compute dtype follows the CPU
    assert calls == [
        {"bits": 8, "quant_type": "nf4", "compute_dtype": auto, "double_quant": False, "backend": "auto",
         "int8_compute": False, "smooth": None, "codes": None},
        {"bits": 4, "quant_type": "nf4", "compute_dtype": torch.float16, "double_quant": True,
         "backend": "torch", "int8_compute": False, "smooth": None, "codes": None},
    ]


def test_bf16_by_name_on_a_cpu_without_native_bf16_warns_once(monkeypatch, caplog):
    from loratune import dtypes

    monkeypatch.setattr(dtypes, "_cpu_has_bf16", lambda: False)
    dtypes._warn_emulated_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="loratune.dtypes"):
        assert dtypes.resolve_dtype("bfloat16") == torch.bfloat16
        assert dtypes.resolve_dtype("auto") == torch.float32
        dtypes.resolve_dtype(torch.bfloat16)
    assert [r.message for r in caplog.records if "emulates" in r.message] == [caplog.records[0].message]


@pytest.mark.parametrize(("cap", "native"), [("AVX2", False), ("avx512_core", False),
                                             ("AVX512_CORE_BF16", None), (None, None)])
def test_an_instruction_set_cap_below_avx512_bf16_makes_bf16_emulated(monkeypatch, cap, native):
    """ONEDNN_MAX_CPU_ISA below AVX512-BF16 sends torch's bf16 matmuls down the emulated path."""
    from pathlib import Path

    from loratune import dtypes

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has_flags = "avx512_bf16" in flags or "amx_bf16" in flags
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    dtypes._cpu_has_bf16.cache_clear()
    try:
        assert dtypes._cpu_has_bf16() is (has_flags if native is None else native)
    finally:
        dtypes._cpu_has_bf16.cache_clear()


def _lora_losses(base, steps: int) -> list[float]:
    """Train LoRA r=8 on all linear layers over the example data; return the loss of every step."""
    from pathlib import Path

    from loratune import LoraConfig, get_peft_model
    from loratune.data import DataConfig, build_datasets, collate, plan_batches

    tok = load_tokenizer(DEFAULT_MODEL)
    train_file = Path(__file__).resolve().parents[1] / "examples" / "data" / "train.jsonl"
    data = build_datasets(DataConfig(train_file=str(train_file), packing=False), tok).train
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for indices in plan_batches([len(ex["input_ids"]) for ex in data], 8, 128, False, 0, 0)[:steps]:
        batch = collate([data[i] for i in indices], packing=False, pad_token_id=tok.pad_token_id)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_preset_init_lets_lora_move_the_loss():
    steps = 40
    preset = _lora_losses(load_base_model(DEFAULT_MODEL, dtype="float32"), steps)
    cfg = AutoConfig.from_pretrained(PRESETS_DIR / "tiny-llama")
    cfg.initializer_range = 0.02
    torch.manual_seed(0)
    usual = _lora_losses(AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False), steps)
    first, last = sum(preset[:5]) / 5, sum(preset[-5:]) / 5
    assert last < 0.5 * first
    assert last < sum(usual[-5:]) / 5
