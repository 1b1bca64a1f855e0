"""The training loop: token-normalised accumulation, only LoRA trains, NaN stop, Ctrl-C and resume."""

from __future__ import annotations

import json
import logging
import os
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

import loratune.train.loop as loop
from loratune.errors import TrainingDivergedError
from loratune.tools.loading import load_base_model
from loratune.train import run
from test_cli_train import make_model_dir, rows_for, train_cli, write_rows
from test_evaluation import CHAT_ROWS, save_answering_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "train.jsonl", rows_for("messages", 24))


def settings(model_dir, data_file, out, **extra):
    return {"model_name_or_path": model_dir, "train_file": data_file, "output_dir": str(out), "r": 4,
            "lora_alpha": 8, "max_seq_length": 64, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
            "bf16": False, "disable_tqdm": True, "logging_steps": 1, "save_steps": 0, **extra}


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict, atol: float = 1e-6):
    assert a.keys() == b.keys()
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a), "nothing trained: vacuous"
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def losses(out) -> list[float]:
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_accumulation_is_normalised_by_trained_tokens(model_dir, data_file, tmp_path):
    """bs 4 x 1 micro-batch == bs 2 x 2 micro-batches: same examples per step, same update."""
    common = {"packing": False, "lora_dropout": 0.0, "max_steps": 4}
    big = run(settings(model_dir, data_file, tmp_path / "big", per_device_train_batch_size=4, **common))
    acc = run(settings(model_dir, data_file, tmp_path / "acc", per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, **common))
    assert big.step == acc.step == 4
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "acc"), rel=1e-5)
    assert_same_adapter(adapter(tmp_path / "big"), adapter(tmp_path / "acc"), atol=1e-5)
    b = adapter(tmp_path / "big")
    assert any(k.endswith("lora_B.weight") and b[k].abs().max() > 0 for k in b)  # it trained at all


def test_the_token_budget_changes_memory_not_the_steps_or_the_update(model_dir, data_file, tmp_path):
    """A packed micro-batch over max_tokens_per_batch runs as several passes inside its own step, so the
    steps are those of an unpacked run (TRL's count: ceil(rows / batch)) and so is the update."""
    common = {"lora_dropout": 0.0, "num_train_epochs": 1}
    tight = run(settings(model_dir, data_file, tmp_path / "tight", max_tokens_per_batch=40, **common))
    whole = run(settings(model_dir, data_file, tmp_path / "whole", max_tokens_per_batch=4096, **common))
    padded = run(settings(model_dir, data_file, tmp_path / "padded", packing=False, **common))
    assert tight.step == whole.step == padded.step == 24 // 4
    assert losses(tmp_path / "tight") == pytest.approx(losses(tmp_path / "whole"), rel=1e-4)
    assert_same_adapter(adapter(tmp_path / "tight"), adapter(tmp_path / "whole"), atol=1e-5)
    assert losses(tmp_path / "tight") == pytest.approx(losses(tmp_path / "padded"), rel=1e-3)


def test_only_lora_parameters_change_and_the_loss_falls(model_dir, data_file, tmp_path, monkeypatch):
    models = []
    real_fit = loop.fit

    def keep_model(model, *args, **kwargs):
        models.append(model)
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(loop, "fit", keep_model)
    threads = torch.get_num_threads()
    result = run(settings(model_dir, data_file, tmp_path / "o", max_steps=12, packing=True,
                          num_threads=1 if threads != 1 else 2))
    assert torch.get_num_threads() == threads  # a Python caller gets its thread count back
    assert result.final_loss < result.first_loss
    trained = models[0].get_base_model()
    fresh = load_base_model(model_dir, dtype="float32")
    fresh_params = dict(fresh.named_parameters())
    n_compared = 0
    for name, p in trained.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32
            continue
        base_name = name.replace(".base_layer", "")
        torch.testing.assert_close(p, fresh_params[base_name], atol=0, rtol=0)
        n_compared += 1
    assert n_compared == len(fresh_params)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(model_dir, data_file, tmp_path, monkeypatch,
                                                           capsys):
    real = loop.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        loss, n = real(model, batch)
        calls["n"] += 1
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)

    monkeypatch.setattr(loop, "token_loss_sum", poisoned)
    out = tmp_path / "o"
    flags = [f"--{k}={v}" for k, v in settings(model_dir, data_file, out, max_steps=8, save_steps=2).items()]
    rc = train_cli(flags)
    err = capsys.readouterr().err
    assert rc == 1
    assert "loss became nan at step 5" in err and "checkpoint-4" in err and "Traceback" not in err
    kept = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert kept == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a diverged run
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 5 and last["diverged"] is True

    with pytest.raises(TrainingDivergedError):
        calls["n"] = 0
        run(settings(model_dir, data_file, tmp_path / "again", max_steps=8))


def test_weights_that_become_non_finite_are_never_saved(model_dir, data_file, tmp_path, monkeypatch, capsys):
    """A step can keep loss and gradients finite and still leave inf weights (a huge learning rate):
    the checkpoint due at that step is not written, and the last good one is named."""
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def overflowing(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    out = tmp_path / "o"
    flags = [f"--{k}={v}" for k, v in settings(model_dir, data_file, out, max_steps=8, save_steps=2).items()]
    rc = train_cli(flags)
    err = capsys.readouterr().err
    assert rc == 1 and "the LoRA weights became NaN or inf at step 4" in err and "checkpoint-2" in err
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(model_dir, data_file, tmp_path,
                                                                             monkeypatch, capsys):
    """lora_dropout > 0 and packing on: the RNG state and data position must both come back."""
    kw = {"max_steps": 7, "lora_dropout": 0.1, "save_steps": 3, "gradient_accumulation_steps": 2}
    straight = tmp_path / "straight"
    run(settings(model_dir, data_file, straight, **kw))

    real = loop.token_loss_sum
    calls = {"n": 0}

    def press_ctrl_c(model, batch):
        calls["n"] += 1
        if calls["n"] == 9:  # in the middle of step 5 (2 micro-batches per step)
            signal.raise_signal(signal.SIGINT)
        return real(model, batch)

    monkeypatch.setattr(loop, "token_loss_sum", press_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)  # ignored when the tests run in the background
    out = tmp_path / "interrupted"
    flags = [f"--{k}={v}" for k, v in settings(model_dir, data_file, out, **kw).items()]
    assert train_cli(flags) == 130
    printed = capsys.readouterr().out
    assert "Interrupted at step 5/7" in printed and "checkpoint-5" in printed
    kept = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert kept == ["checkpoint-3", "checkpoint-5"]
    assert not (out / "adapter_model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # restored

    monkeypatch.setattr(loop, "token_loss_sum", real)
    assert train_cli([*flags, "--resume"]) == 0
    assert_same_adapter(adapter(straight), adapter(out))
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6)


def test_only_the_announcing_process_logs_a_ctrl_c(caplog):
    """Under torchrun every process gets the signal; only the main one says so."""
    for announce in (True, False):
        caplog.clear()
        flag = loop._InterruptFlag(announce=announce)
        with caplog.at_level(logging.WARNING, logger="loratune.train.loop"), flag.installed():
            signal.raise_signal(signal.SIGINT)
        assert flag.requested
        assert ("Ctrl-C: finishing this step" in caplog.text) is announce


def test_checkpoint_rotation_during_a_run(model_dir, data_file, tmp_path):
    out = tmp_path / "o"
    run(settings(model_dir, data_file, out, max_steps=5, save_steps=1, save_total_limit=2))
    assert sorted(d for d in os.listdir(out) if "checkpoint" in d) == ["checkpoint-3", "checkpoint-4"]


def test_a_fresh_run_replaces_an_earlier_runs_checkpoints(model_dir, data_file, tmp_path, caplog):
    out = tmp_path / "o"
    run(settings(model_dir, data_file, out, max_steps=5, save_steps=4))
    assert sorted(d for d in os.listdir(out) if "checkpoint" in d) == ["checkpoint-4"]
    with caplog.at_level(logging.WARNING, logger="loratune.train.checkpoint"):
        run(settings(model_dir, data_file, out, max_steps=3, save_steps=2))
    assert "the adapter there is an earlier run's" in caplog.text  # until this run writes its own
    assert sorted(d for d in os.listdir(out) if "checkpoint" in d) == ["checkpoint-2"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]


def _by_step(out) -> dict[int, float]:
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_resume_logs_the_same_loss_means_as_an_uninterrupted_run(model_dir, data_file, tmp_path, capsys):
    """logging_steps 2, checkpoint at step 3: step 4's line is the mean of steps 3 and 4 either way."""
    kw = {"max_steps": 8, "logging_steps": 2, "save_steps": 3, "save_total_limit": None, "lora_dropout": 0.0}
    straight = tmp_path / "straight"
    run(settings(model_dir, data_file, straight, **kw))
    out = tmp_path / "resumed"
    flags = [f"--{k}={v}" for k, v in settings(model_dir, data_file, out, **kw).items()]
    capsys.readouterr()
    assert train_cli([*flags, "--resume_from_checkpoint", str(straight / "checkpoint-3")]) == 0
    assert "Trained steps 4-8 (resumed from checkpoint-3)" in capsys.readouterr().out
    expected = {step: loss for step, loss in _by_step(straight).items() if step > 3}
    assert list(expected) == [4, 6, 8]
    assert _by_step(out) == pytest.approx(expected, rel=1e-6)


def test_a_checkpoint_without_a_logging_window_still_resumes(model_dir, data_file, tmp_path):
    out = tmp_path / "o"
    run(settings(model_dir, data_file, out, max_steps=4, save_steps=3, logging_steps=2))
    state_file = out / "checkpoint-3" / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["log_window"]  # as written by loratune before the window was stored
    torch.save(state, state_file)
    result = run(settings(model_dir, data_file, out, max_steps=4, save_steps=3, logging_steps=2,
                          resume_from_checkpoint=True))
    assert result.step == 4 and result.start_step == 3
    # With no stored window the first line after resuming averages step 4 alone: the loss an
    # uninterrupted run logs for step 4 with logging_steps=1, not the mean of steps 3 and 4.
    single = _by_step(run_and_return(model_dir, data_file, tmp_path / "single", max_steps=4, logging_steps=1))
    assert _by_step(out)[4] == pytest.approx(single[4], rel=1e-6)
    assert single[4] != pytest.approx((single[3] + single[4]) / 2, rel=1e-6)


def run_and_return(model_dir, data_file, out, **kw):
    run(settings(model_dir, data_file, out, **kw))
    return out


def test_resume_into_a_different_shape_or_from_a_corrupt_checkpoint_is_a_clear_error(model_dir, data_file,
                                                                                     tmp_path, capsys):
    out = tmp_path / "o"
    run(settings(model_dir, data_file, out, max_steps=5, save_steps=2))
    flags = [f"--{k}={v}" for k, v in settings(model_dir, data_file, out, max_steps=5, save_steps=2).items()]
    capsys.readouterr()

    assert train_cli([*flags, "--r", "8", "--resume_from_checkpoint", "true"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "checkpoint-4" in err
    assert re.search(r"lora_A\.default\.weight is \(4, (\d+)\) in the checkpoint but \(8, \1\) in this model",
                     err)

    newest = out / "checkpoint-4" / "training_state.pt"
    os.truncate(newest, 1000)
    assert train_cli([*flags, "--resume_from_checkpoint", "true"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"cannot read {newest}: it is truncated or corrupt" in err
    assert f"--resume_from_checkpoint {out / 'checkpoint-2'}" in err


def test_exact_match_is_logged_at_every_eval_and_drawn_in_the_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    base_dir, _ = save_answering_model(tmp_path)  # answers "yes" to every prompt (2 of 3 rows right)
    data = write_rows(tmp_path / "chat.jsonl", CHAT_ROWS * 4)
    evals = write_rows(tmp_path / "eval.jsonl", CHAT_ROWS)
    figures = []
    real_savefig = Figure.savefig

    def keep_figure(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_figure)
    # a learning rate too small to change an answer, so the expected share is known
    result = run(settings(base_dir, data, tmp_path / "o", eval_file=evals, eval_metric="exact_match",
                          eval_steps=2, max_steps=4, learning_rate=1e-9, per_device_train_batch_size=2))
    records = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    scored = [(r["step"], r["eval_exact_match"]) for r in records if "eval_loss" in r]
    assert scored == [(2, 2 / 3), (4, 2 / 3)]
    assert result.eval_exact_match == 2 / 3
    loss_axis, match_axis = figures[-1].axes  # loss.png: exact match on a second axis
    assert match_axis.get_ylabel().startswith("exact match")
    assert [list(line.get_xydata().tolist()) for line in match_axis.get_lines()] == [[[2, 2 / 3], [4, 2 / 3]]]
    assert [line.get_label() for line in loss_axis.get_lines()] == ["train loss", "eval loss"]
    assert os.path.getsize(tmp_path / "o" / "loss.png") > 0


def test_exact_match_without_answers_in_the_eval_rows_names_the_file(model_dir, data_file, tmp_path):
    from loratune.errors import ConfigError

    text = write_rows(tmp_path / "text.jsonl", rows_for("text", 4))
    with pytest.raises(ConfigError, match=r"text.jsonl: its rows are 'text' \(columns \['text'\]\)"):
        run(settings(model_dir, data_file, tmp_path / "o", eval_file=text, eval_metric="exact_match",
                     max_steps=1))
    assert not os.path.exists(tmp_path / "o")  # refused before anything was written


def test_each_process_answers_its_share_of_the_eval_rows_and_the_counts_are_summed(tmp_path, monkeypatch):
    from loratune.data import DataConfig
    from loratune.tools.evaluation import load_answer_rows
    from loratune.tools.load_trained import load_model
    from loratune.train.config import build_config
    from loratune.train.distributed import DistEnv

    base_dir, adapter_dir = save_answering_model(tmp_path)
    loaded = load_model(adapter=adapter_dir, dtype="float32")
    with loaded.model.disable_adapter():  # the base answers "yes": rows 0 and 2 are right, row 1 is not
        evals = write_rows(tmp_path / "eval.jsonl", CHAT_ROWS)
        rows = load_answer_rows(evals, loaded.tokenizer, DataConfig())
        cfg = build_config({"train_file": evals, "eval_file": evals, "eval_metric": "exact_match"})
        sent = []
        monkeypatch.setattr(loop, "all_reduce_sum", lambda values, env: sent.append(values) or [4, 6])
        shares = [loop.evaluate_exact_match(loaded.model, loaded.tokenizer, rows, cfg, DistEnv(rank, 2))
                  for rank in (0, 1)]
    assert sent == [[2, 2], [0, 1]]  # (right, rows) per process: rows 0, 2 and row 1
    assert shares == [4 / 6, 4 / 6]  # what the reduced counts say, on every process


def test_a_relative_base_path_is_recorded_absolute(model_dir, data_file, tmp_path, monkeypatch):
    """So that merge, export and serve find the base from any working directory."""
    monkeypatch.chdir(os.path.dirname(str(model_dir)))
    run(settings(os.path.basename(str(model_dir)), data_file, tmp_path / "out", max_steps=1))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(str(model_dir))
