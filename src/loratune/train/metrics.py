"""What a run records: `metrics.jsonl`, optional TensorBoard, and `loss.png` at the end.

`metrics.jsonl` holds one JSON object per line: training records (step, loss, learning_rate,
tokens_per_s, epoch, grad_norm; the last one also peak_rss_mib, one number per rank) every
`logging_steps`, and eval records (step, eval_loss, perplexity, eval_exact_match with eval_metric:
exact_match, samples). A resumed run appends to
the same file, first dropping records past the checkpoint it resumes from, so the file always
reads as one run. `loss.png` draws eval_exact_match, when there is one, on a second axis.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from loratune.atomic import atomic_file
from loratune.errors import ConfigError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Append-only metrics sink for the main process (other ranks get `enabled=False`)."""

    def __init__(self, output_dir: str, *, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.records = _read_records(self.path, up_to=resume_step) if resume_step is not None else []
        # rewrite, dropping records past the checkpoint; atomic, so a kill here keeps the old file
        with atomic_file(self.path, encoding="utf-8") as fh:
            for rec in self.records:
                fh.write(json.dumps(rec) + "\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(f"report_to: tensorboard needs the tensorboard package "
                                  f"(pip install 'loratune[tensorboard]'): {exc}") from None
            self._tb = SummaryWriter(log_dir=os.path.join(output_dir, "runs"))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (and mirror its numbers to TensorBoard)."""
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = "eval" if "eval_loss" in record else "train"
            for key, value in record.items():
                if key != "step" and _finite(value):
                    self._tb.add_scalar(f"{prefix}/{key.removeprefix('eval_')}", value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _read_records(path: str, *, up_to: int) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # a line cut short by a kill, or not ours
                continue
            step = rec.get("step", 0) if isinstance(rec, dict) else None
            if isinstance(step, int) and step <= up_to:
                out.append(rec)
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_losses(records: list[dict[str, Any]], path: str) -> str | None:
    """Draw train and eval loss against step into `path` (PNG), and eval exact match on a second axis
    when the run measured it; return the path or None if there is nothing to draw."""
    train = [(r["step"], r["loss"]) for r in records if _finite(r.get("loss"))]
    evals = [(r["step"], r["eval_loss"]) for r in records if _finite(r.get("eval_loss"))]
    matches = [(r["step"], r["eval_exact_match"]) for r in records if _finite(r.get("eval_exact_match"))]
    if not train and not evals and not matches:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    lines = []
    if train:
        lines += ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        lines += ax.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if matches:  # a share in [0, 1], not nats: its own axis on the right
        right = ax.twinx()
        lines += right.plot(*zip(*matches), label="eval exact match", color="tab:green", marker="s")
        right.set_ylabel("exact match (share of eval rows)")
        right.set_ylim(-0.02, 1.02)
    ax.legend(lines, [line.get_label() for line in lines])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
