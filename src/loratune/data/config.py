"""`DataConfig`: every data default in one frozen dataclass, each field documented for `--help`.

Field names are the flat keys users write in YAML / as flags (TRL and HF names where they exist).
Validation collects every problem and raises one `ConfigError`; whether the files exist is checked
when they are read (`build_datasets`), so a config can be built before the data is in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loratune.errors import ConfigError

FORMATS = ("auto", "text", "prompt_completion", "messages", "alpaca", "sharegpt", "tokenized")


def _help(text: str, **extra) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from and how it becomes token ids and labels."""

    train_file: str | None = field(
        default=None, metadata=_help("training data: a .jsonl, .json, .csv or .parquet file")
    )
    eval_file: str | None = field(default=None,
                                  metadata=_help("evaluation data file (same formats as train_file)"))
    dataset_name: str | None = field(
        default=None, metadata=_help("a `datasets` name or local dataset directory, instead of train_file")
    )
    dataset_config_name: str | None = field(default=None,
                                            metadata=_help("the dataset configuration (subset) name"))
    dataset_split: str = field(default="train", metadata=_help("split of dataset_name to train on"))
    eval_split: str | None = field(default=None, metadata=_help("split of dataset_name to evaluate on"))
    eval_samples: int = field(
        default=0,
        metadata=_help("hold out this many training rows (seeded) as the eval set when no eval data is "
                       "given"),
    )
    max_seq_length: int = field(
        default=1024, metadata=_help("examples longer than this many tokens are truncated (and counted)")
    )
    packing: bool = field(
        default=True,
        metadata=_help("pack several examples per row, padding-free, attention kept inside each example"),
    )
    max_tokens_per_batch: int = field(
        default=0,
        metadata=_help("packed micro-batches hold at most this many tokens (0: auto, sized from the "
                       "model so activations stay near 2.5 GiB; the value used is written to "
                       "train_config.yaml)"),
    )
    completion_only_loss: bool = field(
        default=True,
        metadata=_help("train only on completion / assistant tokens (false: on every token)"),
    )
    skip_bad_rows: bool = field(
        default=False, metadata=_help("skip malformed rows (and report how many) instead of stopping")
    )
    dataset_format: str = field(
        default="auto",
        metadata=_help("row format; auto detects it from the column names", choices=FORMATS),
    )
    text_column: str | None = field(default=None, metadata=_help("column holding plain text (format text)"))
    prompt_column: str | None = field(default=None,
                                      metadata=_help("column holding the prompt (format prompt_completion)"))
    completion_column: str | None = field(
        default=None, metadata=_help("column holding the completion (format prompt_completion)")
    )
    messages_column: str | None = field(
        default=None, metadata=_help("column holding a role/content (or ShareGPT from/value) message list")
    )

    def __post_init__(self) -> None:
        problems = []
        if self.train_file and self.dataset_name:
            problems.append("train_file and dataset_name are both set; give one data source")
        if self.eval_split and not self.dataset_name:
            problems.append("eval_split needs dataset_name (for files use eval_file)")
        if self.eval_samples < 0:
            problems.append(f"eval_samples must be >= 0, got {self.eval_samples}")
        if self.eval_samples and (self.eval_file or self.eval_split):
            problems.append("eval_samples holds out training rows; it cannot be combined with "
                            "eval_file/eval_split")
        if self.max_tokens_per_batch < 0:
            problems.append(f"max_tokens_per_batch must be >= 0 (0: auto), got {self.max_tokens_per_batch}")
        if self.max_seq_length < 2:
            problems.append(f"max_seq_length must be >= 2, got {self.max_seq_length}")
        if self.dataset_format not in FORMATS:
            problems.append(f"dataset_format {self.dataset_format!r} is not one of: {', '.join(FORMATS)}")
        if self.text_column and (self.prompt_column or self.completion_column or self.messages_column):
            problems.append("text_column cannot be combined with prompt/completion/messages columns")
        if self.messages_column and (self.prompt_column or self.completion_column):
            problems.append("messages_column cannot be combined with prompt_column/completion_column")
        if problems:
            raise ConfigError(problems)

    @property
    def has_source(self) -> bool:
        return bool(self.train_file or self.dataset_name)
