"""Loss and perplexity of a model on a data file, for `loratune eval`.

The file is read, rendered and masked exactly as training data is (`loratune.data`), so the loss
is over the same tokens the trainer trains on (completions / assistant turns by default), and it
is the trainer's loss (`loratune.train.loss.token_loss_sum`): the mean next-token cross-entropy
per trained token, summed over every batch before dividing. perplexity = exp(loss).
For a LoraModel, `evaluate_base_and_adapter` scores the same examples with the adapter disabled
and enabled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from loratune.data import DataConfig, check_vocab, collate
from loratune.data.build import DatasetBundle, DataStats, tokenize_rows
from loratune.data.sources import read_file
from loratune.train.loss import token_loss_sum


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
