"""Tiny random Hugging Face models built from configs; nothing is downloaded.

Factories, not fixtures, so each test picks the architecture, dtype and seed it needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

VOCAB = 128
# the packaged real model (slow tests) and the tasks shipped for it
SMOLLM2 = "preset:smollm2-135m-instruct"
TASKS = Path(__file__).resolve().parents[1] / "examples" / "tasks"


def tiny_config(arch: str = "llama", **overrides) -> PretrainedConfig:
    """Return a config for a 2-layer model of the given architecture (llama, gpt2, qwen2, mistral)."""
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
        )
    elif arch == "qwen2":
        cfg = Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True,
        )
    elif arch == "mistral":  # a sliding window shorter than tiny_batch's sequences
        cfg = MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            sliding_window=4, tie_word_embeddings=False,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str = "llama", *, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """Build a tiny random causal LM in eval mode (dropout off), deterministic for a seed."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def tiny_batch(batch: int = 2, seq: int = 8, *, seed: int = 1) -> torch.Tensor:
    """Random token ids (B, T) inside the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def tiny_gguf_model(directory, *, arch: str = "llama", outtype: str = "f32", seed: int = 0,
                    name: str = "tiny.gguf"):
    """Write a tiny random model and the `preset:tiny-llama` tokenizer (byte-level BPE, ChatML template)
    as one GGUF file in `directory`; return (path, model, tokenizer).

    Transformers reads it back with `from_pretrained(directory, gguf_file=name)`: with outtype f32 the
    weights are bitwise the model's, and the tokenizer encodes like the original.
    """
    from pathlib import Path

    from loratune.tools.gguf import write_gguf_model
    from loratune.tools.loading import load_tokenizer

    tokenizer = load_tokenizer("preset:tiny-llama")
    # the preset model's vocab_size: ids past the tokenizer's are written as [PAD<id>] tokens
    model = tiny_model(arch, seed=seed, vocab_size=1024)
    path = Path(directory) / name
    write_gguf_model(model, tokenizer, path, outtype, name=f"tiny-{arch}")
    return path, model, tokenizer
