"""The same command under torchrun: 2 gloo processes follow the single-process trajectory.

Rank r gets micro-batches r, r+2, r+4, ... of the global plan, so 2 processes x 1 micro-batch per
step see exactly the examples that 1 process x 2 accumulated micro-batches sees; with the loss
normalised by the global trained-token count the two runs must agree step by step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from loratune.train import run
from test_cli_train import make_model_dir, rows_for, write_rows
from test_train_loop import adapter, assert_same_adapter, losses, settings


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 32))
    kw = {"max_steps": 4, "lora_dropout": 0.0, "per_device_train_batch_size": 2, "eval_steps": 2,
          "eval_metric": "exact_match", "eval_max_new_tokens": 4}
    single = tmp_path / "single"
    run(settings(model_dir, data, single, gradient_accumulation_steps=2, eval_file=data, **kw))

    out = tmp_path / "ddp"
    # a file, not flags: torchrun's own parser would take --r=4 for its options
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(settings(model_dir, data, out, eval_file=data, save_steps=2, **kw)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "loratune.cli.main", "train", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    assert losses(out) == pytest.approx(losses(single), rel=1e-4)
    assert_same_adapter(adapter(single), adapter(out), atol=1e-5)
    assert done.stdout.count("Adapter:") == 1  # only rank 0 reports
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 4 + 2  # 4 train + 2 eval records, written once
    # each process answers every other eval row; the shares are summed over both
    assert exact_matches(out) == exact_matches(single) and len(exact_matches(out)) == 2


def exact_matches(out) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["eval_exact_match"] for r in map(json.loads, lines) if "eval_exact_match" in r]
