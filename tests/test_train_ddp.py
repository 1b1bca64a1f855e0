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
import torch
import yaml

from loratune.train import run
from test_cli_train import make_model_dir, rows_for, write_rows
from test_train_loop import adapter, assert_same_adapter, losses, settings


@pytest.mark.parametrize("budget", [0, 40], ids=["auto-budget", "tight-budget"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, budget):
    """tight-budget: micro-batches cut into unequal numbers of passes per rank, still one step each."""
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 32))
    kw = {"max_steps": 4, "lora_dropout": 0.0, "per_device_train_batch_size": 2, "eval_steps": 2,
          "eval_metric": "exact_match", "eval_max_new_tokens": 4, "max_tokens_per_batch": budget}
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
    assert "broadcast_buffers" not in done.stderr  # torch's deprecation, once per rank, is not the user's
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 4 + 2  # 4 train + 2 eval records, written once
    # each process answers every other eval row; the shares are summed over both
    assert exact_matches(out) == exact_matches(single) and len(exact_matches(out)) == 2


def exact_matches(out) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["eval_exact_match"] for r in map(json.loads, lines) if "eval_exact_match" in r]


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("variables, named", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1 must be in [0, WORLD_SIZE=2)"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 must be in [0, WORLD_SIZE=2)"),
    ({"RANK": "3"}, "RANK=3 must be in [0, WORLD_SIZE=1)"),   # left over: rank 3 would never save
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"},
     "MASTER_PORT='http' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 must be a TCP port"),
])
def test_bad_launcher_variables_are_named_before_anything_loads(variables, named, tmp_path, monkeypatch):
    from loratune.errors import ConfigError

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    config = {"model_name_or_path": str(tmp_path / "missing"), "train_file": str(tmp_path / "missing.jsonl"),
              "output_dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="launcher environment") as err:
        run(config)
    assert any(p.startswith(named) for p in err.value.problems), err.value.problems


def test_a_master_port_in_use_is_named_in_one_line(tmp_path, monkeypatch):
    """Rank 0 opens the rendezvous on MASTER_PORT; a port another program holds fails there at once,
    and the error names the port instead of a DistNetworkError traceback."""
    import socket

    from loratune.errors import ConfigError
    from loratune.train.distributed import init_distributed

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match="launcher environment") as err:
            init_distributed()
    assert err.value.problems[0].startswith(f"MASTER_PORT={port} is already in use on this machine")
    assert "torchrun --master_port" in str(err.value)


@pytest.mark.parametrize("name, value, needle", [("WORLD_SIZE", "-2", "WORLD_SIZE=-2 must be >= 1"),
                                                 ("RANK", "x", "RANK")])
def test_train_exits_2_naming_a_bad_launcher_variable(tmp_path, monkeypatch, capsys, name, value, needle):
    from loratune.cli.main import main

    for variable in LAUNCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(name, value)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train_file": str(tmp_path / "t.jsonl"), "output_dir": str(tmp_path)}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "launcher environment" in err and "Traceback" not in err, err


@pytest.mark.parametrize("rows", [5, 1], ids=["odd-count", "fewer-than-processes"])
def test_micro_batches_that_do_not_divide_over_the_processes_are_all_trained(tmp_path, rows):
    """5 micro-batches on 2 processes: the rank without a fifth runs a pass weighed zero, so the run
    takes one process's steps with accumulation 2 (3 an epoch, the last of one micro-batch) and
    follows its trajectory; one micro-batch for two processes trains as well."""
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", rows))
    kw = {"num_train_epochs": 2, "lora_dropout": 0.0, "per_device_train_batch_size": 1}
    single = tmp_path / "single"
    run(settings(model_dir, data, single, gradient_accumulation_steps=2, **kw))
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(settings(model_dir, data, tmp_path / "ddp", **kw)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "loratune.cli.main", "train", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(losses(single)) == 2 * -(-rows // 2)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(single), rel=1e-4)
    assert_same_adapter(adapter(single), adapter(tmp_path / "ddp"), atol=1e-5)


FAIL_ON_RANK_1 = '''
import os
if os.environ.get("RANK") == "1":  # this process alone cannot read the data (a file missing on its node)
    import loratune.data
    from loratune.errors import DataError

    def unreadable(*args, **kwargs):
        raise DataError("train.jsonl: cannot be read on this node")

    loratune.data.build_datasets = unreadable
'''


def test_a_process_that_cannot_load_the_data_stops_every_process_with_one_line(tmp_path):
    """Rank 1 fails before training; rank 0 must not wait for it in a collective and die there with a
    transport traceback, but name rank 1 and its error in one line."""
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 8))
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(settings(model_dir, data, tmp_path / "out", max_steps=2)))
    path = os.pathsep.join([str(tmp_path / "hook"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "loratune.cli.main", "train", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: train.jsonl: cannot be read on this node" in done.stderr, done.stderr[-3000:]
    assert ("error: process 1 of 2 failed loading the data and the model, so every process stops: "
            "train.jsonl: cannot be read on this node") in done.stderr, done.stderr[-3000:]
    assert "[rank0]: Traceback" not in done.stderr  # (the traceback there is torchrun's own, on exit 2)
    assert not (tmp_path / "out").exists()  # nothing was written


@pytest.mark.parametrize("error, lost", [
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                  "[127.0.0.1]:28060. This is typically caused by a remote worker crashing."), True),
    (torch.distributed.DistBackendError("NCCL communicator was aborted"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),  # a bug stays a traceback
])
def test_a_collective_that_lost_its_peer_is_one_line(error, lost):
    from loratune.errors import LoratuneError
    from loratune.train.distributed import DistEnv, peer_loss_explained

    with pytest.raises(LoratuneError if lost else RuntimeError) as err:
        with peer_loss_explained(DistEnv(rank=1, world_size=2)):
            raise error
    if lost:
        assert str(err.value).startswith("process 1 of 2 lost contact with the other processes (")
        assert "pair.cc" not in str(err.value) and "\n" not in str(err.value)
    else:
        assert err.value is error
    with pytest.raises(RuntimeError):  # one process has no peers to lose
        with peer_loss_explained(DistEnv()):
            raise RuntimeError("Connection closed by peer (gloo)")


def test_a_killed_peer_stops_the_others_with_one_line(tmp_path):
    """Without torchrun to stop them (a launcher that only sets RANK and WORLD_SIZE), the processes left
    fail in their next collective: one line naming the lost contact, not gloo's traceback."""
    import signal
    import socket
    import time

    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 64))
    out = tmp_path / "out"
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(settings(model_dir, data, out, max_steps=500, save_steps=2,
                                              per_device_train_batch_size=2)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "loratune.cli.main", "train", str(config)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    try:
        while not (out / "checkpoint-2").is_dir():
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        err = procs[0].communicate(timeout=300)[1]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 2, err[-3000:]
    assert "error: process 0 of 2 lost contact with the other processes (" in err, err[-3000:]
    assert "Traceback" not in err
