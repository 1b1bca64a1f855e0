"""evaluate: the loss is the trainer's per-token loss on the trained tokens, base vs adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from loratune.data import IGNORE_INDEX, DataConfig
from loratune.errors import ConfigError, DataError
from loratune.tools.evaluation import (
    evaluate_base_and_adapter,
    evaluate_examples,
    load_eval_examples,
    model_vocab_size,
    perplexity,
)
from loratune.tools.load_trained import load_model
from test_load_trained import save_tiny_adapter, save_tiny_model_dir

ROWS = [
    {"prompt": "What is 2+2?", "completion": " 4"},
    {"prompt": "Name a colour.", "completion": " Blue, like the sky."},
    {"prompt": "Say hi", "completion": " hi there, friend"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = save_tiny_model_dir(root / "base")
    loaded = load_model(adapter=save_tiny_adapter(root / "adapter", model_dir, scale=0.3), dtype="float32")
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return loaded, str(data)


def manual_loss(model, examples) -> float:
    """Full logits, one example at a time, mean CE over labels != IGNORE_INDEX."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"])
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[1:]
            total += float(F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((target != IGNORE_INDEX).sum())
    return total / count


def test_loss_matches_a_manual_cross_entropy_and_ignores_batch_size(setup):
    loaded, data = setup
    examples, stats = load_eval_examples(data, loaded.tokenizer, DataConfig(packing=False))
    assert stats.format == "prompt_completion" and len(examples) == 3
    r1 = evaluate_examples(loaded.model, examples, pad_token_id=0, batch_size=1)
    r3 = evaluate_examples(loaded.model, examples, pad_token_id=0, batch_size=3)
    assert r1.loss == pytest.approx(manual_loss(loaded.model, examples), rel=1e-5)
    assert r3.loss == pytest.approx(r1.loss, rel=1e-5)
    assert r1.tokens == sum(sum(lab != IGNORE_INDEX for lab in ex["labels"][1:]) for ex in examples)
    assert r1.perplexity == pytest.approx(math.exp(r1.loss))


def test_base_and_adapter_side_by_side(setup):
    loaded, data = setup
    examples, _ = load_eval_examples(data, loaded.tokenizer)
    results = evaluate_base_and_adapter(loaded.model, examples, pad_token_id=0)
    assert set(results) == {"base", "adapter"}
    with loaded.model.disable_adapter():
        base = manual_loss(loaded.model, examples)
    assert results["base"].loss == pytest.approx(base, rel=1e-5)
    assert results["adapter"].loss != pytest.approx(results["base"].loss, rel=1e-3)  # the adapter acts
    plain = evaluate_base_and_adapter(loaded.model.get_base_model(), examples, pad_token_id=0)
    assert set(plain) == {"base"}


def test_completion_only_off_scores_every_token(setup):
    loaded, data = setup
    only, _ = load_eval_examples(data, loaded.tokenizer)
    every, _ = load_eval_examples(data, loaded.tokenizer, DataConfig(completion_only_loss=False))
    n_only = evaluate_examples(loaded.model, only, pad_token_id=0).tokens
    assert evaluate_examples(loaded.model, every, pad_token_id=0).tokens > n_only


def test_bad_files_name_the_file_and_line(setup, tmp_path):
    loaded, _ = setup
    with pytest.raises(ConfigError, match="eval_file .*missing.jsonl"):
        load_eval_examples(str(tmp_path / "missing.jsonl"), loaded.tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": \n')
    with pytest.raises(DataError, match="bad.jsonl line 2"):
        load_eval_examples(str(bad), loaded.tokenizer)


def test_token_ids_are_checked_against_the_model_vocabulary(setup, tmp_path):
    loaded, _ = setup
    vocab = model_vocab_size(loaded.model)
    assert vocab == model_vocab_size(loaded.model.get_base_model()) == 1024
    rows = tmp_path / "ids.jsonl"
    rows.write_text(f'{{"input_ids": [1, 2, {vocab - 1}]}}\n{{"input_ids": [1, 2, {vocab}]}}\n')
    assert len(load_eval_examples(str(rows), loaded.tokenizer)[0]) == 2  # unchecked without vocab_size
    with pytest.raises(DataError,
                       match=f"ids.jsonl line 2: token id {vocab} is outside the model's vocabulary"):
        load_eval_examples(str(rows), loaded.tokenizer, vocab_size=vocab)


def test_perplexity_overflows_to_inf():
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == math.inf
