"""`loratune data preview` in-process: trained tokens marked, stats printed, errors as exit 2."""

from __future__ import annotations

import json

import pytest

from loratune.cli.main import main
from test_cli_train import rows_for, write_rows


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    data = write_rows(root / "train.jsonl", rows_for("prompt_completion", 6))
    path = root / "c.yaml"
    path.write_text(f"train_file: {data}\nmax_seq_length: 64\n")
    return str(path)


def test_preview_marks_trained_tokens_and_prints_stats(config, capsys):
    assert main(["data", "preview", config, "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("train.jsonl line") == 2  # exactly n examples, each named by file and line
    assert "[[" in out and "Paris." in out  # the completion is marked as trained
    assert "truncated" in out and "trained" in out


def test_preview_takes_the_train_flags(config, capsys, tmp_path):
    other = write_rows(tmp_path / "other.jsonl", rows_for("text", 3))
    assert main(["data", "preview", config, "--train_file", other, "-n", "1"]) == 0
    assert "other.jsonl" in capsys.readouterr().out


def test_preview_reports_config_and_data_errors(config, capsys, tmp_path):
    assert main(["data", "preview", config, "--max_seq_lenght", "32"]) == 2
    err = capsys.readouterr().err
    assert "did you mean --max_seq_length" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completion": ""}) + "\n")
    assert main(["data", "preview", config, "--train_file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 1" in err


@pytest.mark.parametrize("n", ["-1", "0"])
def test_preview_needs_at_least_one_example(config, capsys, n):
    assert main(["data", "preview", config, "-n", n]) == 2
    captured = capsys.readouterr()
    assert f"error: -n must be >= 1 (examples to show), got {n}" in captured.err and captured.out == ""


def test_preview_n_without_a_value_is_an_error_not_the_default(config, capsys):
    assert main(["data", "preview", config, "-n"]) == 2
    captured = capsys.readouterr()
    assert "error: -n expects an integer, got ''" in captured.err and captured.out == ""
