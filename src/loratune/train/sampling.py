"""Sample generations shown during and after training: eval logs and the before/after demo.

A prompt is taken from a tokenized example as the tokens before its first trained label, so it
works for every data format (for plain `text`, where every token trains, the first few tokens).
"""

from __future__ import annotations

from torch import nn

from loratune.data import IGNORE_INDEX
from loratune.tools import generation
from loratune.tools.generation import GenerationSettings

PROMPT_TOKENS_FOR_TEXT = 8


def example_prompt_ids(example: dict) -> list[int]:
    """Return the untrained prefix of a tokenized example (its prompt)."""
    ids = [int(i) for i in example["input_ids"]]
    labels = [int(i) for i in example["labels"]]
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
    if first <= 1:  # nothing untrained but BOS: a plain-text example
        first = min(PROMPT_TOKENS_FOR_TEXT, max(1, len(ids) // 2))
    return ids[:first]


def sample_completion(model: nn.Module, tokenizer, ids: list[int], *, max_new_tokens: int = 32) -> str:
    """Greedy-decode a continuation of `ids` and return only the new text (`loratune generate`'s decoding,
    with its stop tokens). Puts the model in eval mode for the call and restores its previous mode.
    """
    was_training = model.training
    model.eval()
    try:
        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        return generation.generate_text(model, tokenizer, ids, settings).strip()
    finally:
        model.train(was_training)


def sample_generations(model: nn.Module, tokenizer, examples: list[dict], *,
                       max_new_tokens: int = 32) -> list[dict]:
    """Generate for each example's prompt: [{"prompt": str, "completion": str}]."""
    out = []
    for example in examples:
        ids = example_prompt_ids(example)
        out.append({
            "prompt": tokenizer.decode(ids, skip_special_tokens=True),
            "completion": sample_completion(model, tokenizer, ids, max_new_tokens=max_new_tokens),
        })
    return out
