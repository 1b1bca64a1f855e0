"""`preview`: show what the model will be trained on, before training.

The report holds a few examples cut into runs of trained / untrained tokens, the share of trained
tokens, the length distribution and the truncation count. `PreviewReport.to_text()` renders it for
the terminal (the CLI prints it): trained runs are wrapped in [[ ]], or coloured with `color=True`.
"""

from __future__ import annotations

from dataclasses import dataclass

from loratune.data.build import DataStats, read_sources, tokenize_rows
from loratune.data.config import DataConfig
from loratune.data.tokenize import IGNORE_INDEX

GREEN, RESET = "\033[32m", "\033[0m"
HISTOGRAM_BINS = 8
HISTOGRAM_WIDTH = 40


@dataclass(frozen=True)
class PreviewExample:
    """One tokenized example as text runs: (text, trained) pairs in order."""

    where: str
    runs: list[tuple[str, bool]]
    n_tokens: int
    n_trained: int

    def to_text(self, *, color: bool = False) -> str:
        parts = []
        for text, trained in self.runs:
            if not trained:
                parts.append(text)
            else:
                parts.append(f"{GREEN}{text}{RESET}" if color else f"[[{text}]]")
        return "".join(parts)


@dataclass(frozen=True)
class PreviewReport:
    examples: list[PreviewExample]
    stats: DataStats
    eval_stats: DataStats | None
    max_seq_length: int

    def to_text(self, *, color: bool = False) -> str:
        """Render the report as plain text (trained tokens in [[ ]], or green with `color`)."""
        lines = []
        for ex in self.examples:
            lines += [f"--- {ex.where}: {ex.n_tokens} tokens, {ex.n_trained} trained",
                      ex.to_text(color=color), ""]
        lines += _stats_lines("train", self.stats, self.max_seq_length)
        if self.eval_stats is not None:
            lines += [""] + _stats_lines("eval", self.eval_stats, self.max_seq_length)
        return "\n".join(lines)


def _stats_lines(label: str, s: DataStats, max_seq_length: int) -> list[str]:
    q = s.length_quantiles()
    lines = [
        f"{label}: {s.source} ({s.format}): {s.examples} examples from {s.rows} rows",
        f"  skipped bad rows: {s.skipped}   truncated to {max_seq_length}: {s.truncated}   "
        f"dropped (nothing left to train): {s.dropped_untrained}",
        f"  tokens: {s.tokens}   trained: {s.trained_tokens} ({100 * s.trained_share:.1f}%)",
        "  length: " + "  ".join(f"{k} {v}" for k, v in q.items()),
    ]
    return lines + [f"  {row}" for row in histogram(s.lengths)]


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS, width: int = HISTOGRAM_WIDTH) -> list[str]:
    """Return an ASCII histogram of token lengths, one line per bin: "  12-  20 | ####### 31"."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))  # ceil division: every length falls in a bin
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - lo) // step)] += 1
    top = max(counts)
    rows = []
    for b, c in enumerate(counts):
        start = lo + b * step
        if start > hi:
            break
        bar = "#" * max(1 if c else 0, round(width * c / top))
        rows.append(f"{start:5d}-{min(hi, start + step - 1):5d} | {bar} {c}")
    return rows


def preview(cfg: DataConfig, tokenizer, n: int = 3, *, seed: int = 0) -> PreviewReport:
    """Tokenize the data as training would, and return `n` rendered examples plus the stats.

    Raises what `build_datasets` raises.
    """
    train_raw, eval_raw = read_sources(cfg, seed)
    examples, stats, wheres = tokenize_rows(train_raw, cfg, tokenizer)
    eval_stats = tokenize_rows(eval_raw, cfg, tokenizer)[1] if eval_raw is not None else None
    shown = [render_example(ex, tokenizer, where) for ex, where in zip(examples[:n], wheres)]
    return PreviewReport(shown, stats, eval_stats, cfg.max_seq_length)


def render_example(example: dict, tokenizer, where: str = "") -> PreviewExample:
    """Cut a tokenized example into runs of trained / untrained tokens and decode each run."""
    ids, labels = example["input_ids"], example["labels"]
    runs, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or (labels[t] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            runs.append((text, labels[start] != IGNORE_INDEX))
            start = t
    n_trained = sum(lab != IGNORE_INDEX for lab in labels)
    return PreviewExample(where, runs, len(ids), n_trained)
