"""The `tokenizer.*` keys of a GGUF model: from a Transformers byte-level BPE tokenizer, or copied
from another GGUF file.

llama.cpp needs the vocabulary in id order, a type per token (normal, control, user-defined), the
merges, the special token ids, whether BOS/EOS are added, the chat template, and the name of the
pre-tokenizer (the regex that splits text before BPE), which it only knows by name
(`tokenizer.ggml.pre`). The name is recognised from the tokenizer's own pre-tokenizer description;
one we cannot name is refused rather than guessed, since a wrong split changes every encoding.
SentencePiece vocabularies (Llama 2, Mistral v0.1) are not written here: pass `vocab_from` a GGUF.
"""

from __future__ import annotations

import json
import os

import gguf

from loratune.errors import ConfigError

# The regexes of the Split pre-tokenizers llama.cpp knows by name (tokenizer.json spelling).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def add_vocab(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, *,
              vocab_from: str | os.PathLike | None = None) -> None:
    """Add the tokenizer keys to `writer`: copied from `vocab_from` (a GGUF), else built.

    Raises:
        ConfigError: a tokenizer that is not byte-level BPE, or one with more tokens than the model.
    """
    if vocab_from is not None:
        copy_vocab(writer, vocab_from)
        return
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges_of(tokenizer))
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, {"unk": "add_unk_token_id"}.get(kind, f"add_{kind}_token_id"))(token_id)
    add_bos, add_eos = special_tokens_added(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def copy_vocab(writer: gguf.GGUFWriter, source: str | os.PathLike) -> None:
    """Copy every `tokenizer.*` key of the GGUF file `source` into `writer`, values unchanged."""
    try:
        reader = gguf.GGUFReader(os.fspath(source))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the tokenizer of GGUF file {os.fspath(source)!r}: {exc}") from exc
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)


def token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types, padded to the model's vocab_size with
    `[PAD<id>]` (user-defined) the way llama.cpp's converter pads."""
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(vocab)} tokens but the model's vocab_size is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no tokenizer.json (a fast tokenizer); "
                          "GGUF export writes byte-level BPE tokenizers")
    spec = json.loads(backend.to_str())
    if (spec.get("model") or {}).get("type") != "BPE":
        kind = (spec.get("model") or {}).get("type")
        raise ConfigError(f"tokenizer model {kind!r}: GGUF export writes byte-level "
                          "BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM family); for others pass a GGUF "
                          "file to copy the vocabulary from")
    return spec


def merges_of(tokenizer) -> list[str]:
    """BPE merges as "left right" strings, in rank order."""
    merges = _backend_json(tokenizer)["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer ("gpt-2", "smollm", "llama-bpe", "qwen2").

    Raises:
        ConfigError: a pre-tokenizer llama.cpp has no name for, described in the message.
    """
    pre = _backend_json(tokenizer).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise ConfigError(f"pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name; GGUF export knows "
                      "byte-level GPT-2, SmolLM (digits split), Llama 3 and Qwen2 splits")


def special_tokens_added(tokenizer) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS in front and EOS at the end (observed, not configured)."""
    ids = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos
