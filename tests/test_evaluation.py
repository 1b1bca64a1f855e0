"""evaluate: the loss is the trainer's per-token loss on the trained tokens, base vs adapter; exact match
scores greedy answers against expected ones."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from loratune import LoraConfig, get_peft_model
from loratune.data import IGNORE_INDEX, DataConfig
from loratune.errors import ConfigError, DataError
from loratune.tools.evaluation import (
    ANSWER_MARGIN,
    default_max_new_tokens,
    evaluate_base_and_adapter,
    evaluate_examples,
    exact_match,
    exact_match_base_and_adapter,
    load_answer_rows,
    load_eval_examples,
    model_vocab_size,
    perplexity,
)
from loratune.tools.load_trained import load_model
from loratune.tools.loading import load_base_model
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


# Exact match: a model whose answers are known in advance. Attention and MLP outputs are zeroed,
# so the next token depends on the current token only (a bigram table written into the embedding
# and the output head): after "\n" (the end of every prompt below) the base says "yes" and stops;
# the adapter, a rank-1 LoRA on lm_head, turns that first step to "n", and the model goes on "o", stop.
NEWLINE, T_Y, T_ES, T_N, T_O, EOS = 202, 92, 734, 81, 82, 3  # "\n", "y", "es", "n", "o", "<|im_end|>"
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "Is it raining?"}, {"role": "assistant", "content": "yes"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it dry?"},
                  {"role": "assistant", "content": "yes"}, {"role": "user", "content": "Sure?"},
                  {"role": "assistant", "content": "no"}]},
    {"messages": [{"role": "user", "content": "Is it late?"}, {"role": "assistant", "content": "yes"}]},
]
PROMPT_ROWS = [{"prompt": "Q: Is snow hot?\n", "completion": "  no\n"},  # compared stripped
               {"prompt": "Q: Is it Monday?\n", "completion": "maybe"}]


def save_answering_model(root) -> tuple[str, str]:
    """Save the bigram model above and its adapter under `root`; return (base dir, adapter dir)."""
    base_dir = save_tiny_model_dir(root / "answering-base")
    model = load_base_model(base_dir, dtype="float32")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for k, (now, then) in enumerate([(NEWLINE, T_Y), (T_Y, T_ES), (T_ES, EOS), (T_N, T_O), (T_O, EOS)]):
            embed[now] = 0.0
            embed[now, k] = 5.0  # normalised to 8 * e_k by the final RMSNorm
            head[then, k] = 10.0
    model.save_pretrained(base_dir)
    lora = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["lm_head"],
                                            base_model_name_or_path=base_dir))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_A" in name:
                p.zero_()[0, 0] = 1.0  # reads the "\n" direction only
            elif "lora_B" in name:
                p.zero_()[T_N, 0] = 30.0  # 30 * 8 beats the base's 10 * 8 for "y"
    lora.save_pretrained(str(root / "answering-adapter"))
    return base_dir, str(root / "answering-adapter")


@pytest.fixture(scope="module")
def answering(tmp_path_factory):
    root = tmp_path_factory.mktemp("answering")
    base_dir, adapter_dir = save_answering_model(root)
    files = []
    for name, rows in (("chat.jsonl", CHAT_ROWS), ("prompts.jsonl", PROMPT_ROWS)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(str(root / name))
    return load_model(adapter=adapter_dir, dtype="float32"), *files


@pytest.mark.parametrize(("which", "expected", "base_right", "adapter_right"), [
    (1, ["yes", "no", "yes"], [True, False, True], [False, True, False]),
    (2, ["no", "maybe"], [False, False], [True, False]),
])
def test_exact_match_scores_the_known_answers_of_base_and_adapter(answering, which, expected, base_right,
                                                                 adapter_right):
    loaded, path = answering[0], answering[which]
    rows = load_answer_rows(path, loaded.tokenizer)
    results = exact_match_base_and_adapter(loaded.model, loaded.tokenizer, rows, batch_size=2)
    base, adapter = results["base"], results["adapter"]
    assert [r.answer for r in base.records] == ["yes"] * len(rows)
    assert [r.answer for r in adapter.records] == ["no"] * len(rows)
    assert [r.expected for r in base.records] == expected  # stripped
    assert [r.correct for r in base.records] == base_right
    assert [r.correct for r in adapter.records] == adapter_right
    assert (base.correct, base.n, base.accuracy) == (sum(base_right), len(rows), sum(base_right) / len(rows))
    assert (adapter.correct, adapter.accuracy) == (sum(adapter_right), sum(adapter_right) / len(rows))
    name = path.rsplit("/", 1)[-1]
    assert [r.where for r in base.records] == [f"{name} line {i}" for i in range(1, len(rows) + 1)]


def test_prompts_are_the_text_the_model_saw_in_training_before_the_answer(answering):
    loaded, chat, prompts = answering
    tok = loaded.tokenizer
    # A conversation: the chat template of the turns before the last assistant turn, with the
    # assistant header; earlier assistant turns are part of the prompt.
    rows = load_answer_rows(chat, tok)
    turns = CHAT_ROWS[1]["messages"]
    assert rows[1].prompt == tok.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
    # A string prompt is trained on as it is, with no chat template, although the tokenizer has one.
    assert load_answer_rows(prompts, tok)[0].prompt == "Q: Is snow hot?\n"
    for path in (chat, prompts):
        examples, _ = load_eval_examples(path, tok)
        for row, ex in zip(load_answer_rows(path, tok), examples):
            labels = ex["labels"]
            # where the last trained span (the answer) starts
            start = max(i for i in range(1, len(labels))
                        if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)
            assert row.prompt_ids == ex["input_ids"][:start]  # the same tokens, one BOS
            assert row.prompt_ids.count(tok.bos_token_id) == 1


def test_answers_do_not_depend_on_the_batch_size(setup):
    loaded, data = setup  # a random adapter: answers are arbitrary text of different lengths
    rows = load_answer_rows(data, loaded.tokenizer)
    one = exact_match(loaded.model, loaded.tokenizer, rows, batch_size=1, max_new_tokens=8)
    three = exact_match(loaded.model, loaded.tokenizer, rows, batch_size=3, max_new_tokens=8)
    assert [r.answer for r in one.records] == [r.answer for r in three.records]
    assert len({r.answer for r in one.records}) > 1 and all(r.answer for r in one.records)
    assert not loaded.model.training


def test_the_default_answer_length_is_the_longest_answer_plus_a_margin(answering):
    loaded, _, prompts = answering
    rows = load_answer_rows(prompts, loaded.tokenizer)
    longest = len(loaded.tokenizer("maybe", add_special_tokens=False)["input_ids"])
    assert default_max_new_tokens(loaded.tokenizer, rows) == longest + ANSWER_MARGIN


def test_rows_without_an_answer_name_the_file_line_and_field(answering, tmp_path):
    loaded = answering[0]
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl line 2: missing field 'completion'"):
        load_answer_rows(str(missing), loaded.tokenizer)
    assert len(load_answer_rows(str(missing), loaded.tokenizer, DataConfig(skip_bad_rows=True))) == 1
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "just text"}\n')
    with pytest.raises(ConfigError, match=r"text.jsonl: its rows are 'text' \(columns \['text'\]\), "
                                          r"which have no separate answer"):
        load_answer_rows(str(text), loaded.tokenizer)
    alone = tmp_path / "alone.jsonl"
    alone.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"alone.jsonl line 1: the conversation starts with its answer"):
        load_answer_rows(str(alone), loaded.tokenizer)
