"""GGUF models: what Transformers' GGUF reader gets back from `write_gguf_model`."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from factories import tiny_gguf_model, tiny_model
from loratune.errors import ConfigError
from loratune.tools.gguf import rope_row_order, write_gguf_model
from loratune.tools.loading import load_tokenizer

TEXTS = ("Hello world 123", "<|im_start|>user\nhi<|im_end|>\n", "  spaces\tand\nnewlines ü 4567")


def read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_model_reads_back_bitwise_with_the_same_tokenizer(tmp_path, arch):
    path, model, tokenizer = tiny_gguf_model(tmp_path, arch=arch)
    loaded, loaded_tok = read_back(path)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    for text in TEXTS:
        assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.chat_template == tokenizer.chat_template
    specials = (loaded_tok.bos_token, loaded_tok.eos_token, loaded_tok.pad_token)
    assert specials == ("<s>", "<|im_end|>", "<pad>")


def test_f16_model_reads_back_as_the_weights_rounded_to_f16(tmp_path):
    path, model, _ = tiny_gguf_model(tmp_path, outtype="f16")
    got = read_back(path)[0].state_dict()
    for key, value in model.state_dict().items():
        rounded = value if value.ndim == 1 else value.half().float()  # norms stay F32
        assert torch.equal(got[key], rounded), key


def test_q8_0_model_is_close_and_keeps_norms_f32(tmp_path):
    path, model, _ = tiny_gguf_model(tmp_path, outtype="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    got = read_back(path)[0].state_dict()
    for key, value in model.state_dict().items():
        assert torch.allclose(got[key], value, atol=value.abs().max().item() / 100), key


def test_file_has_llama_cpp_metadata(tmp_path):
    path, model, _ = tiny_gguf_model(tmp_path)
    fields = gguf.GGUFReader(path).fields
    value = {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")}
    assert value["general.architecture"] == "llama" and value["general.type"] == "model"
    assert value["llama.block_count"] == 2 and value["llama.attention.head_count_kv"] == 2
    assert value["llama.rope.dimension_count"] == 8 and value["llama.vocab_size"] == 1024
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True


def test_rope_row_order_is_the_inverse_of_the_readers_permutation():
    rows = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3)  # 4 heads of 8
    interleaved = rope_row_order(rows, 4)
    # head 0: Transformers rows (0..3 first half, 4..7 second) -> llama.cpp pairs (0,4),(1,5),...
    assert interleaved[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    back = interleaved.reshape(4, 4, 2, 3).transpose(1, 2).reshape(32, 3)
    assert torch.equal(back, rows)


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="model_type 'gpt2'.*llama, mistral, qwen2"):
        write_gguf_model(tiny_model("gpt2"), load_tokenizer("preset:tiny-llama"), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_unknown_outtype_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--outtype 'q4_k'"):
        tiny_gguf_model(tmp_path, outtype="q4_k")
    assert list(tmp_path.iterdir()) == []
