"""Kill -9 a real training process mid-run, resume it, and get the uninterrupted run's adapter."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from loratune.train import run
from test_cli_train import make_model_dir, rows_for, train_cli, write_rows
from test_train_loop import adapter, assert_same_adapter, losses, settings

# The child slows each forward of the decoder body, and stalls once the checkpoint we wait for
# exists, so the kill always lands mid-run rather than after the end.
CHILD = """
import os, sys, time
import torch
from torch.nn.modules.module import register_module_forward_pre_hook
stall_after = os.environ["STALL_AFTER"]
def slow(module, args):
    if type(module).__name__ == "LlamaModel":
        time.sleep(5.0 if os.path.exists(stall_after) else 0.05)
register_module_forward_pre_hook(slow)
from loratune.cli.main import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _wait_for(path, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 24))
    kw = {"max_steps": 10, "save_steps": 2, "lora_dropout": 0.1, "gradient_accumulation_steps": 2}
    straight = tmp_path / "straight"
    run(settings(model_dir, data, straight, **kw))

    out = tmp_path / "killed"
    flags = [f"--{k}={v}" for k, v in settings(model_dir, data, out, **kw).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALL_AFTER": str(out / "checkpoint-4")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *flags], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "checkpoint-4", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it was killed"

    assert train_cli([*flags, "--resume_from_checkpoint", "true"]) == 0
    assert_same_adapter(adapter(straight), adapter(out))
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6)
    assert not [d for d in os.listdir(out) if ".tmp-" in d]  # a half-written checkpoint was cleaned up


def test_resuming_on_other_data_says_the_position_points_into_another_plan(tmp_path, caplog):
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 12))
    out = tmp_path / "out"
    run(settings(model_dir, data, out, max_steps=3, save_steps=2))
    for rows, warned in ((12, False), (13, True)):  # the same rows, then one row more
        more = write_rows(tmp_path / f"train{rows}.jsonl", rows_for("messages", rows))
        again = shutil.copytree(out, tmp_path / f"again{rows}")
        caplog.clear()
        with caplog.at_level("WARNING", logger="loratune.train.resume"):
            run(settings(model_dir, more, again, max_steps=3, save_steps=0,
                         resume_from_checkpoint=str(again / "checkpoint-2")))
        assert ("another batch plan" in caplog.text) is warned, caplog.text
