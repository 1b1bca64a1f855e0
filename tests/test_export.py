"""merge_to_directory: a plain HF directory whose logits equal the adapter model's, or nothing."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratune.errors import ConfigError
from loratune.tools import export
from loratune.tools.export import PROBE_LENGTH, logits_of, merge_to_directory, probe_batch
from loratune.tools.load_trained import load_model
from test_load_trained import save_tiny_adapter, save_tiny_model_dir

MERGED_FILES = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = save_tiny_model_dir(root / "base")
    return base, save_tiny_adapter(root / "adapter", base, scale=0.3)


def test_probe_batch_is_fixed_and_in_vocab(dirs):
    tok = AutoTokenizer.from_pretrained(dirs[0])
    a, b = probe_batch(tok, 1024), probe_batch(tok, 1024)
    assert torch.equal(a, b) and a.shape == (3, PROBE_LENGTH)
    assert int(a.max()) < 1024 and int(a.min()) >= 0


def test_float32_merge_writes_a_plain_hf_directory_with_equal_logits(dirs, tmp_path):
    base, adapter = dirs
    loaded = load_model(adapter=adapter, dtype="float32")
    probe = probe_batch(loaded.tokenizer, 1024)
    reference = logits_of(loaded.model, probe)
    with loaded.model.disable_adapter():
        assert (logits_of(loaded.model, probe) - reference).abs().max() > 1e-2  # the adapter matters
    out = str(tmp_path / "merged")
    report = merge_to_directory(loaded, out, dtype="float32")
    assert report.passed and report.published and report.weights_identical
    assert sorted(os.listdir(out)) == MERGED_FILES == report.files
    plain = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no loratune
    assert plain.dtype == torch.float32
    assert not any("lora" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(logits_of(plain, probe), reference, atol=report.tolerance, rtol=0)
    assert report.max_abs_diff == report.written_diff  # float32: what was checked is what was written
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_bfloat16_merge_and_qlora_merge(dirs, tmp_path):
    base, adapter = dirs
    report = merge_to_directory(load_model(adapter=adapter, dtype="float32"), str(tmp_path / "bf16"))
    assert report.passed and report.dtype == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16
    quant = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}
    loaded = load_model(adapter=adapter, dtype="float32", quant=quant)
    assert loaded.quantized == "4-bit nf4"
    reference = logits_of(loaded.model, probe_batch(loaded.tokenizer, 1024))
    report = merge_to_directory(loaded, str(tmp_path / "qlora"))
    assert report.passed and "4-bit nf4" in report.reference
    assert sorted(os.listdir(tmp_path / "qlora")) == MERGED_FILES
    assert report.max_abs_logit == pytest.approx(float(reference.abs().max()))


def test_a_wrong_merge_fails_and_writes_nothing(dirs, tmp_path, monkeypatch):
    _, adapter = dirs
    monkeypatch.setattr(export, "merge_into_base", lambda loaded: loaded.model.unload())  # drops the adapter
    out = tmp_path / "merged"
    report = merge_to_directory(load_model(adapter=adapter, dtype="float32"), str(out), dtype="float32")
    assert not report.passed and not report.published
    assert report.max_abs_diff > report.tolerance
    assert not out.exists() and os.listdir(tmp_path) == []  # no temp directory left behind either


def test_the_verdict_and_the_write_decision_are_one_condition(dirs, tmp_path):
    assert export.check_passed(0.5, 1.0, True) and export.check_passed(1.0, 1.0, True)
    assert not export.check_passed(1.5, 1.0, True) and not export.check_passed(0.5, 1.0, False)
    assert not export.check_passed(float("nan"), 1.0, True)  # a NaN logit difference never passes
    export.check_tolerance(None)
    export.check_tolerance(0.0)
    loaded = load_model(adapter=dirs[1], dtype="float32")
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="--tolerance must be a finite number >= 0"):
            merge_to_directory(loaded, str(tmp_path / "o"), dtype="float32", tolerance=bad)
    assert not (tmp_path / "o").exists()


def test_output_dir_rules(dirs, tmp_path):
    _, adapter = dirs
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        export.check_merge_output_dir(str(tmp_path / "full"), adapter)
    with pytest.raises(ConfigError, match="is the adapter directory"):
        export.check_merge_output_dir(adapter, adapter)
    (tmp_path / "empty").mkdir()
    export.check_merge_output_dir(str(tmp_path / "empty"), adapter)
    with pytest.raises(ConfigError, match="--output_dir is empty"):  # "" would be the current directory
        export.check_merge_output_dir("", adapter)
    with pytest.raises(ConfigError, match="'.*full/x' is a file, not a directory"):
        export.check_merge_output_dir(str(tmp_path / "full" / "x" / "out"), adapter)
    loaded = load_model(dirs[0], dtype="float32")
    with pytest.raises(ConfigError, match="needs an adapter"):
        merge_to_directory(loaded, str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="--dtype 'int4'"):
        merge_to_directory(loaded, str(tmp_path / "o"), dtype="int4")


def save_tiny_gpt2_dir(path) -> str:
    """GPT-2 (Conv1D layers, weights stored (in, out)) with the preset tokenizer."""
    from transformers import GPT2Config

    from loratune.tools.loading import load_tokenizer

    config = GPT2Config(vocab_size=1024, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                        eos_token_id=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    load_tokenizer("preset:tiny-llama").save_pretrained(str(path))
    return str(path)


def save_tiny_qwen2_tied_dir(path) -> str:
    """Qwen2 with tied input/output embeddings, with the preset tokenizer."""
    from transformers import Qwen2Config

    from loratune.tools.loading import load_tokenizer

    config = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    load_tokenizer("preset:tiny-llama").save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["gpt2-conv1d", "qwen2-tied", "dora", "modules_to_save"])
def test_merge_other_adapter_kinds(tmp_path, kind):
    from loratune import LoraConfig, get_peft_model
    from loratune.tools.loading import load_base_model

    if kind == "gpt2-conv1d":
        base = save_tiny_gpt2_dir(tmp_path / "base")
        config = LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False)
    elif kind == "qwen2-tied":
        base = save_tiny_qwen2_tied_dir(tmp_path / "base")
        config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    else:
        base = save_tiny_model_dir(tmp_path / "base")
        extra = {"use_dora": True} if kind == "dora" else {"modules_to_save": ["lm_head"]}
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **extra)
    model = get_peft_model(load_base_model(base, dtype="float32"), config)
    if kind == "modules_to_save":
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "modules_to_save" in n).mul_(1.5)
    model.save_pretrained(str(tmp_path / "adapter"))
    report = merge_to_directory(load_model(adapter=str(tmp_path / "adapter"), dtype="float32"),
                                str(tmp_path / "merged"), dtype="float32")
    assert report.passed and report.published, report
    assert sorted(os.listdir(tmp_path / "merged")) == MERGED_FILES
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())


def test_a_bf16_written_model_is_checked_in_float32_where_bf16_is_emulated(monkeypatch):
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    monkeypatch.setattr(export, "bf16_supported", lambda device: False)
    assert next(export._computable(model).parameters()).dtype == torch.float32
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    monkeypatch.setattr(export, "bf16_supported", lambda device: True)
    assert next(export._computable(model).parameters()).dtype == torch.bfloat16
