"""Build the files of the `preset:tiny-llama` preset (tokenizer + model config).

Run from the repository root after examples/data/make_examples.py:

    .venv/bin/python src/loratune/presets/make_tiny_tokenizer.py

It trains a byte-level BPE tokenizer (the `tokenizers` library, same family as GPT-2, Llama 3 and
Qwen) on the example dataset and writes, into src/loratune/presets/tiny-llama/:

  tokenizer.json         the BPE model; adds <s> (BOS) in front of every encoded text, like Llama
  tokenizer_config.json  bos/eos/pad tokens and a ChatML chat_template that starts with {{ bos_token }}
  config.json            a 4-layer Llama config with initializer_range 0.2 (see below)
  preset.json            the seed the weights are drawn with

The weights are not shipped: `loratune.tools.loading` draws them from the config with a fixed seed, so
every load gives the same model. initializer_range is 0.2 rather than the usual 0.02: with 0.02
the logits (unit-RMS hidden state times a small head) stay near uniform and LoRA moves the loss
slowly. Measured on the example data, 60 steps, batch 16, LoRA r=8 on all linear layers, lr 3e-3:
the loss goes 12.0 -> 1.9 with 0.2 and 6.9 -> 3.5 with 0.02 (tests/test_loading.py, slow, checks
the ordering).
Any byte sequence encodes (byte-level alphabet), so the tokenizer also works on text it never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1024
PAD, BOS, IM_START, IM_END = "<pad>", "<s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END]  # ids 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ALPACA_WORDS = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n\n### Input:\n\n### Response:\n"
)
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 3,
    "pad_token_id": 0,
}


def corpus(data_dir: Path) -> list[str]:
    """Return the example dataset as the strings the tokenizer will see (rendered ChatML)."""
    texts = [ALPACA_WORDS]
    for name in ("train.jsonl", "eval.jsonl"):
        for line in (data_dir / name).read_text(encoding="utf-8").splitlines():
            texts.append("".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"
                                 for m in json.loads(line)["messages"]))
    for line in (data_dir / "alpaca.jsonl").read_text(encoding="utf-8").splitlines():
        texts.append("\n".join(json.loads(line).values()))
    return texts


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    assert tok.get_vocab_size() <= VOCAB_SIZE
    return tok


def main() -> None:
    root = Path(__file__).resolve().parents[3]
    out = Path(__file__).resolve().parent / "tiny-llama"
    out.mkdir(exist_ok=True)
    tok = train_tokenizer(corpus(root / "examples" / "data"))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": IM_END, "pad_token": PAD,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    preset = {"description": "4-layer Llama with random weights drawn from `seed`; for demos and tests",
              "seed": 0}
    (out / "preset.json").write_text(json.dumps(preset, indent=2) + "\n")


if __name__ == "__main__":
    main()
