"""Streaming text: decoding only the newest tokens gives, at every step, what decoding all of them gives."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loratune.serve.state import Generation
from loratune.tools.loading import load_tokenizer


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style SentencePiece BPE: "▁" for spaces, a stripped leading space, <0xXX> byte tokens."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "▁the", "▁cat", "s", "a", "t", "h", "e", "c", "▁é", ".", ",", "▁."]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class _State:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def decoded_steps(tokenizer, ids: list[int]) -> list[tuple[str, str]]:
    """(incremental, full) text after each token, as `Generation.deltas` sees them."""
    gen = Generation.__new__(Generation)
    gen.state, gen.tokens = _State(tokenizer), []
    gen._text, gen._prefix, gen._read = "", 0, 0
    steps = []
    for token in ids:
        gen.tokens.append(token)
        steps.append((gen._decode(), tokenizer.decode(gen.tokens, skip_special_tokens=True)))
    return steps


@pytest.mark.parametrize("make", [lambda: load_tokenizer("preset:tiny-llama"), byte_fallback_tokenizer],
                         ids=["byte-level BPE", "SentencePiece with byte fallback"])
@pytest.mark.parametrize("seed", range(6))
def test_incremental_decoding_equals_decoding_everything(make, seed):
    tokenizer = make()
    rng = random.Random(seed)
    # Random ids (special tokens included), then text whose CJK and emoji characters span several
    # byte tokens. A byte-fallback decoder turns a whole run of byte tokens into U+FFFD when the run is
    # not valid UTF-8, valid bytes included, so there random byte tokens (no model samples garbage
    # bytes for long) would change text already streamed in either way of decoding; they are left out.
    pool = [i for i in range(len(tokenizer)) if not tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
    ids = [rng.choice(pool) for _ in range(150)]
    text = "the cats, é. 日本語 🙂 ok"
    ids += [t for _ in range(3) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    steps = decoded_steps(tokenizer, ids)
    compared = 0
    for i, (incremental, full) in enumerate(steps):
        if full.endswith("\ufffd"):  # a character still incomplete: the stream waits for the next token
            continue
        assert incremental == full, f"token {i}: {incremental[-40:]!r} != {full[-40:]!r}"
        compared += 1
    assert compared > len(ids) // 2 and steps[-1][0] == steps[-1][1]
