"""GGUF LoRA adapters: byte for byte what llama.cpp's converter writes, and what it cannot load refused.

The golden files in tests/golden/gguf_adapter/ are the converter's output for the adapters beside
them (tests/golden/make_gguf_adapter_golden.py). The slow test re-runs the converter when its
sources are in the cache `make llama-cpp-src` fills, to catch a converter that changed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

from factories import tiny_model
from loratune import LoraConfig, get_peft_model
from loratune.adapter_io import PREFIX
from loratune.errors import ConfigError, UnsupportedFeatureError
from loratune.tools.gguf import rope_row_order, write_gguf_model
from loratune.tools.gguf_adapter import write_gguf_adapter
from loratune.tools.loading import load_tokenizer
from test_inspection import write_adapter

GOLDEN = Path(__file__).parent / "golden" / "gguf_adapter"
BASE = json.loads((GOLDEN / "base" / "config.json").read_text())
CASES = sorted((p.parent.name, p.stem) for p in GOLDEN.glob("*/*.gguf"))
LLAMA_CPP_SRC = Path(os.environ.get("LORATUNE_LLAMA_CPP_SRC",
                                    os.path.expanduser("~/.cache/loratune/llama.cpp/src")))


def contents(path) -> tuple[dict, dict]:
    """(key -> value, tensor name -> (type, shape, bytes)) of a GGUF file, in file order."""
    reader = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: (t.tensor_type.name, [int(n) for n in t.shape], t.data.tobytes())
               for t in reader.tensors}
    return kv, tensors


def assert_same_gguf(ours, reference):
    kv, tensors = contents(ours)
    want_kv, want_tensors = contents(reference)
    assert list(kv.items()) == list(want_kv.items())
    assert [(n, t[:2]) for n, t in tensors.items()] == [(n, t[:2]) for n, t in want_tensors.items()]
    assert [n for n in tensors if tensors[n][2] != want_tensors[n][2]] == []
    assert Path(ours).read_bytes() == Path(reference).read_bytes()


def test_golden_files_cover_the_cases():
    assert CASES == [("all_linear", "bf16"), ("all_linear", "f16"), ("all_linear", "f32"),
                     ("all_linear", "q8_0"), ("qv", "f32"), ("rslora", "f32")]


@pytest.mark.parametrize(("case", "outtype"), CASES)
def test_adapter_equals_llama_cpp_converter_output(tmp_path, case, outtype):
    out = write_gguf_adapter(str(GOLDEN / case / "adapter"), BASE, tmp_path / "a.gguf", outtype)
    assert_same_gguf(out, GOLDEN / case / f"{outtype}.gguf")


def test_rslora_alpha_makes_llama_cpp_scale_by_alpha_over_sqrt_r(tmp_path):
    config = json.loads((GOLDEN / "rslora" / "adapter" / "adapter_config.json").read_text())
    kv, tensors = contents(write_gguf_adapter(str(GOLDEN / "rslora" / "adapter"), BASE, tmp_path / "a.gguf"))
    rank = tensors["blk.0.attn_q.weight.lora_a"][1][1]  # ne = [in, r]
    llama_cpp_scale = kv["adapter.lora.alpha"] / rank
    assert config["use_rslora"] and rank == config["r"]
    assert llama_cpp_scale == pytest.approx(config["lora_alpha"] / math.sqrt(config["r"]), rel=1e-6)


def test_adapter_on_the_gguf_base_equals_the_merged_gguf_model(tmp_path):
    """W + alpha / r * lora_b @ lora_a, computed from the GGUF files as llama.cpp does, is the merged
    model's GGUF weight: the q/k row permutation of the adapter matches the model writer's."""
    tokenizer = load_tokenizer("preset:tiny-llama")
    model = tiny_model("llama", vocab_size=1024)
    write_gguf_model(model, tokenizer, tmp_path / "base.gguf", "f32")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ConfigError, match="still holds LoRA layers"):
        write_gguf_model(peft_model, tokenizer, tmp_path / "unmerged.gguf")
    adapter = write_gguf_adapter(str(tmp_path / "adapter"), model.config, tmp_path / "a.gguf")
    write_gguf_model(peft_model.merge_and_unload(), tokenizer, tmp_path / "merged.gguf", "f32")
    base, merged = (gguf_arrays(tmp_path / f) for f in ("base.gguf", "merged.gguf"))
    lora = gguf_arrays(adapter)
    alpha = contents(adapter)[0]["adapter.lora.alpha"]
    targets = [n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")]
    assert len(targets) == 2 * 7
    for name in targets:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]  # (R, in), (out, R)
        expected = base[name] + alpha / a.shape[0] * (b @ a)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged["blk.0.attn_q.weight"], base["blk.0.attn_q.weight"])  # not vacuous


def gguf_arrays(path) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(t.data.copy()).float() for t in gguf.GGUFReader(path).tensors}


def test_rope_permutation_applies_to_lora_b_rows_only():
    b = torch.randn(32, 4)
    a = torch.randn(4, 16)
    assert torch.equal(rope_row_order(b, 4) @ a, rope_row_order(b @ a, 4))


@pytest.mark.parametrize(("config", "reason"), [
    (LoraConfig(r=8, use_dora=True), "DoRA"),
    (LoraConfig(r=8, modules_to_save=["lm_head"]), "modules_to_save ['lm_head']"),
    (LoraConfig(r=8, bias="all"), "bias='all'"),
    (LoraConfig(r=8, alpha_pattern={"v_proj": 32}), "alpha_pattern"),
    (LoraConfig(r=8, use_rslora=True, rank_pattern={"v_proj": 4}), "rsLoRA with ranks [4, 8]"),
    (LoraConfig(r=8, init_lora_weights="pissa"), "init_lora_weights='pissa'"),
])
def test_what_llama_cpp_cannot_load_is_refused_by_name(tmp_path, config, reason):
    ranks = {f"model.layers.0.self_attn.{t}": config.rank_pattern.get(t, 8) for t in ("q_proj", "v_proj")}
    adapter = write_adapter(tmp_path / "a", config, ranks)
    with pytest.raises(UnsupportedFeatureError, match="llama.cpp cannot load this adapter") as err:
        write_gguf_adapter(adapter, BASE, tmp_path / "out.gguf")
    assert reason in str(err.value)
    assert not (tmp_path / "out.gguf").exists()


def test_rank_pattern_without_rslora_is_written_with_each_modules_rank():
    tensors = contents(GOLDEN / "all_linear" / "f32.gguf")[1]
    assert tensors["blk.0.ffn_down.weight.lora_a"][1] == [64, 8]  # ne = [in, r]
    assert tensors["blk.0.ffn_up.weight.lora_a"][1] == [32, 4]


def test_unsupported_base_and_tied_head_are_refused(tmp_path):
    adapter = write_adapter(tmp_path / "a", LoraConfig(r=8, target_modules=["lm_head"]), {"lm_head": 8})
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        write_gguf_adapter(adapter, {**BASE, "model_type": "gpt2"}, tmp_path / "out.gguf")
    with pytest.raises(ConfigError, match="lm_head: the base model ties it"):
        write_gguf_adapter(adapter, {**BASE, "tie_word_embeddings": True}, tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_embedding_lora_and_foreign_modules_are_refused(tmp_path):
    extra = {f"{PREFIX}model.embed_tokens.lora_embedding_A": torch.zeros(8, 100),
             f"{PREFIX}model.embed_tokens.lora_embedding_B": torch.zeros(16, 8)}
    cfg = LoraConfig(r=8, target_modules=["q_proj", "embed_tokens", "c_attn"])
    ranks = {"model.layers.0.self_attn.q_proj": 8, "transformer.h.0.attn.c_attn": 8}
    with pytest.raises(UnsupportedFeatureError) as err:
        write_gguf_adapter(write_adapter(tmp_path / "a", cfg, ranks, extra=extra), BASE, tmp_path / "o.gguf")
    assert "embedding layers ['embed_tokens']" in str(err.value)
    assert "['transformer.h.0.attn.c_attn'] have no llama.cpp tensor" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "outtype"), CASES)
def test_golden_files_are_what_the_current_converter_writes(tmp_path, case, outtype):
    converter = LLAMA_CPP_SRC / "convert_lora_to_gguf.py"
    if not converter.is_file():
        pytest.skip(f"llama.cpp converter not found at {converter} (run `make llama-cpp-src`, or set "
                    "LORATUNE_LLAMA_CPP_SRC to a llama.cpp source directory)")
    adapter = GOLDEN / case / "adapter"
    if case == "rslora":
        sys.path.insert(0, str(GOLDEN.parent))
        from make_gguf_adapter_golden import reference_input
        adapter = reference_input(adapter, tmp_path)
    subprocess.run([sys.executable, str(converter), "--base", str(GOLDEN / "base"), "--outtype", outtype,
                    "--outfile", str(tmp_path / "ref.gguf"), str(adapter)], check=True, cwd=LLAMA_CPP_SRC,
                   capture_output=True)
    assert_same_gguf(tmp_path / "ref.gguf", GOLDEN / case / f"{outtype}.gguf")
