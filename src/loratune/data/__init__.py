"""Training data: read rows, detect their format, tokenize with loss masks, plan and collate batches.

Public API (the trainer and CLI use only these names):
  IGNORE_INDEX                  label of tokens that take no loss (-100, HF convention)
  DataConfig                    every data setting and default
  build_datasets(cfg, tok, seed) -> DatasetBundle(train, eval, stats, eval_stats)
  answer_rows(raw, cfg, tok)    -> [PromptAnswer(where, prompt, answer, prompt_ids)] for exact match
  check_vocab(bundle, vocab_size) DataError naming rows with token ids the model does not have
  plan_batches(lengths, batch_size, seed, epoch, world_size, rank) -> micro-batches of examples
  split_by_tokens(indices, lengths, max_seq_length, budget) -> a packed micro-batch cut to a token budget
  plan_id(lengths, batch_size, seed) -> a digest that changes when the plan would (kept in checkpoints)
  collate(examples, packing=, pad_token_id=, max_seq_length=) -> dict of tensors
  preview(cfg, tok, n) -> PreviewReport (.to_text())
Examples are {"input_ids": list[int], "labels": list[int]} with UNSHIFTED labels: label[t] is
token t, the model's loss shifts; the first token of every example has label IGNORE_INDEX.
"""

from loratune.data.batching import collate, plan_batches, plan_id, split_by_tokens
from loratune.data.build import (
    DatasetBundle,
    DataStats,
    PromptAnswer,
    answer_rows,
    build_datasets,
    check_vocab,
    read_sources,
    tokenize_rows,
)
from loratune.data.config import FORMATS, DataConfig
from loratune.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, Segment, detect_format, render_chat
from loratune.data.preview import PreviewExample, PreviewReport, preview, render_example
from loratune.data.tokenize import IGNORE_INDEX

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_WITH_INPUT", "FORMATS", "IGNORE_INDEX", "DataConfig", "DataStats",
    "DatasetBundle", "PreviewExample", "PreviewReport", "PromptAnswer", "Segment", "answer_rows",
    "build_datasets", "check_vocab", "collate",
    "detect_format", "plan_batches", "plan_id", "preview", "read_sources", "render_chat", "render_example",
    "split_by_tokens",
    "tokenize_rows",
]
