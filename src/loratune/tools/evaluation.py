"""Loss, perplexity and exact-match accuracy of a model on a data file, for `loratune eval` and the trainer.

The file is read, rendered and masked exactly as training data is (`loratune.data`), so the loss
is over the same tokens the trainer trains on (completions / assistant turns by default), and it
is the trainer's loss (`loratune.train.loss.token_loss_sum`): the mean next-token cross-entropy
per trained token, summed over every batch before dividing. perplexity = exp(loss).
For a LoraModel, `evaluate_base_and_adapter` scores the same examples with the adapter disabled
and enabled.

Exact match (`exact_match`) scores answers instead of tokens: for each row with a prompt and one
right answer (`loratune.data.answer_rows`: prompt/completion, messages, ...) the model decodes
greedily from the prompt text it saw in training, up to a stop token or `max_new_tokens`; the row
is right when that text, stripped of surrounding whitespace, equals the expected answer stripped.
By default `max_new_tokens` is the longest expected answer in tokens plus ANSWER_MARGIN, enough to
see the stop token (or trailing whitespace) after the longest right answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from loratune.data import DataConfig, check_vocab, collate
from loratune.data.build import DatasetBundle, DataStats, PromptAnswer, answer_rows, tokenize_rows
from loratune.data.sources import read_file
from loratune.tools.generation import GenerationSettings, generate_batch_ids
from loratune.train.loss import token_loss_sum

ANSWER_MARGIN = 16  # new tokens allowed past the longest expected answer (module docstring)


@dataclass(frozen=True)
class EvalResult:
    """Mean loss per trained token, its perplexity, and how many tokens and examples it covers."""

    loss: float
    perplexity: float
    tokens: int
    examples: int

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "examples": self.examples}


def load_eval_examples(path: str, tokenizer, data_config: DataConfig | None = None, *,
                       vocab_size: int | None = None) -> tuple[list[dict], DataStats]:
    """Read and tokenize an eval file as training would (format detection, masks, EOS, truncation).

    With `vocab_size` (the loaded model's, `model_vocab_size`), token ids are checked against it as
    training checks them (`check_vocab`): pre-tokenized rows may hold ids the model does not have.

    Raises:
        ConfigError: missing file, unsupported suffix, undetectable format.
        DataError: malformed rows, or token ids outside the vocabulary, named by file and line.
    """
    cfg = data_config or DataConfig()
    examples, stats, wheres = tokenize_rows(read_file(path, field_name="eval_file"), cfg, tokenizer)
    if vocab_size is not None:
        check_vocab(DatasetBundle(examples, None, stats, wheres=wheres), vocab_size)
    return examples, stats


def model_vocab_size(model: nn.Module) -> int:
    """Rows of the input embedding of a plain HF model or a LoraModel (of the original layer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings()
    for wrapped in ("base_layer", "original_module"):  # a LoRA embedding, or one in modules_to_save
        embedding = getattr(embedding, wrapped, embedding)
    return embedding.weight.shape[0]


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def loss_sum_over(model: nn.Module, batches: Iterable[list[dict]], *, pad_token_id: int, packing: bool,
                  max_seq_length: int | None, device: torch.device | str) -> tuple[float, int]:
    """(summed token loss, trained tokens) over batches of examples, in eval mode (the mode is restored).

    The one scoring loop of `loratune eval` and the trainer's evaluation.
    """
    was_training = model.training
    model.eval()
    loss_sum, n_tokens = 0.0, 0
    try:
        for examples in batches:
            batch = collate(examples, packing=packing, pad_token_id=pad_token_id,
                            max_seq_length=max_seq_length)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            part, count = token_loss_sum(model, batch)
            loss_sum, n_tokens = loss_sum + float(part), n_tokens + int(count)
    finally:
        model.train(was_training)
    return loss_sum, n_tokens


def evaluate_examples(model: nn.Module, examples: list[dict], *, pad_token_id: int, batch_size: int = 8,
                      max_seq_length: int | None = None) -> EvalResult:
    """Score examples in padded batches of `batch_size` (in order; results do not depend on it)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = (examples[start:start + batch_size] for start in range(0, len(examples), batch_size))
    loss_sum, n_tokens = loss_sum_over(model, batches, pad_token_id=pad_token_id, packing=False,
                                       max_seq_length=max_seq_length, device=next(model.parameters()).device)
    loss = loss_sum / max(n_tokens, 1)
    return EvalResult(loss, perplexity(loss), n_tokens, len(examples))


def evaluate_base_and_adapter(model: nn.Module, examples: list[dict], *, pad_token_id: int,
                              batch_size: int = 8) -> dict[str, EvalResult]:
    """{"base": ..., "adapter": ...} for a LoraModel; {"base": ...} for a plain model."""
    results = {}
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            results["base"] = evaluate_examples(model, examples, pad_token_id=pad_token_id,
                                                batch_size=batch_size)
        results["adapter"] = evaluate_examples(model, examples, pad_token_id=pad_token_id,
                                               batch_size=batch_size)
    else:
        results["base"] = evaluate_examples(model, examples, pad_token_id=pad_token_id, batch_size=batch_size)
    return results


@dataclass(frozen=True)
class AnswerRecord:
    """One scored row: what was asked, what was expected, what the model answered."""

    where: str
    prompt: str
    question: str
    expected: str
    answer: str
    correct: bool


@dataclass(frozen=True)
class ExactMatchResult:
    """Share of rows answered exactly right (0.0 when there are none), with every row's record."""

    accuracy: float
    correct: int
    n: int
    records: list[AnswerRecord]

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "n": self.n}


def load_answer_rows(path: str, tokenizer, data_config: DataConfig | None = None) -> list[PromptAnswer]:
    """Read an eval file as prompts and expected answers (see `loratune.data.answer_rows`).

    Raises:
        ConfigError: missing file, unsupported suffix, rows without a separate answer (plain text).
        DataError: rows with a missing or malformed prompt/answer field, named by file and line.
    """
    return answer_rows(read_file(path, field_name="eval_file"), data_config or DataConfig(), tokenizer)


def default_max_new_tokens(tokenizer, rows: list[PromptAnswer]) -> int:
    """The longest expected answer in tokens plus ANSWER_MARGIN."""
    longest = max((len(tokenizer(r.answer.strip(), add_special_tokens=False)["input_ids"]) for r in rows),
                  default=0)
    return longest + ANSWER_MARGIN


def is_exact_match(answer: str, expected: str) -> bool:
    """True when the two texts are equal once surrounding whitespace is stripped."""
    return answer.strip() == expected.strip()


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer, rows: list[PromptAnswer], *, max_new_tokens: int | None = None,
                batch_size: int = 8) -> ExactMatchResult:
    """Greedy-decode an answer for every row, `batch_size` rows per forward, and score it.

    Rows are batched by prompt length (less padding) and reported in their own order. The model
    runs in eval mode (its mode is restored).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    settings = GenerationSettings(max_new_tokens=max_new_tokens or default_max_new_tokens(tokenizer, rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))
    answers: list[str] = [""] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            new = generate_batch_ids(model, tokenizer, [rows[i].prompt_ids for i in chunk], settings)
            for i, ids in zip(chunk, new):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    records = [AnswerRecord(r.where, r.prompt, r.question, r.answer.strip(), a, is_exact_match(a, r.answer))
               for r, a in zip(rows, answers)]
    correct = sum(r.correct for r in records)
    return ExactMatchResult(correct / len(records) if records else 0.0, correct, len(records), records)


def exact_match_base_and_adapter(model: nn.Module, tokenizer, rows: list[PromptAnswer], *,
                                 max_new_tokens: int | None = None,
                                 batch_size: int = 8) -> dict[str, ExactMatchResult]:
    """{"base": ..., "adapter": ...} for a LoraModel (base = adapter disabled); {"base": ...} otherwise."""
    kwargs = {"max_new_tokens": max_new_tokens or default_max_new_tokens(tokenizer, rows),
              "batch_size": batch_size}
    if not hasattr(model, "disable_adapter"):
        return {"base": exact_match(model, tokenizer, rows, **kwargs)}
    with model.disable_adapter():
        base = exact_match(model, tokenizer, rows, **kwargs)
    return {"base": base, "adapter": exact_match(model, tokenizer, rows, **kwargs)}
