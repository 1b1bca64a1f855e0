"""`loratune eval` in-process: the base vs adapter table, --json, clean errors."""

from __future__ import annotations

import json

import pytest

from loratune.cli.main import main
from test_load_trained import save_tiny_adapter, save_tiny_model_dir

ROWS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-eval")
    base = save_tiny_model_dir(root / "base")
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return base, save_tiny_adapter(root / "adapter", base, scale=0.3), str(data)


def test_table_shows_base_adapter_and_delta(setup, capsys):
    base, adapter, data = setup
    assert main(["eval", "--adapter", adapter, "--eval_file", data, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{base} + adapter {adapter} on {data}: 2 examples (messages)")
    assert out[1].split() == ["model", "loss", "perplexity"]
    rows = {line.split()[0]: line.split()[1:] for line in out[3:]}
    assert set(rows) == {"base", "adapter", "delta"}
    base_loss, adapter_loss = float(rows["base"][0]), float(rows["adapter"][0])
    assert base_loss != adapter_loss
    assert float(rows["delta"][0]) == pytest.approx(adapter_loss - base_loss, abs=2e-4)


def test_json_output_and_base_only(setup, capsys):
    base, adapter, data = setup
    assert main(["eval", "--adapter", adapter, "--eval_file", data, "--dtype", "float32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"]["tokens"] == result["base"]["tokens"] > 0
    assert result["format"] == "messages" and result["model"] == base
    assert main(["eval", "--model_name_or_path", base, "--eval_file", data, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "adapter" in plain and plain["adapter"] is None and "loss" in plain["base"]


def test_bad_inputs_exit_2(setup, tmp_path, capsys):
    base, adapter, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n')
    assert main(["eval", "--model_name_or_path", base, "--eval_file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 1" in err and "Traceback" not in err
    assert main(["eval", "--adapter", adapter, "--eval_file", str(tmp_path / "none.csv")]) == 2
    assert "none.csv' does not exist" in capsys.readouterr().err
    assert main(["eval", "--adapter", adapter, "--eval_file", str(bad), "--batch_size", "0"]) == 2
    assert "--batch_size must be >= 1" in capsys.readouterr().err


def test_token_ids_outside_the_vocabulary_name_the_file_and_line(setup, tmp_path, capsys):
    base, adapter, _ = setup
    oov = tmp_path / "oov.jsonl"
    oov.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2, 99999]}\n')
    for model in (["--adapter", adapter], ["--model_name_or_path", base]):
        assert main(["eval", *model, "--eval_file", str(oov)]) == 2
        captured = capsys.readouterr()
        assert "oov.jsonl line 2: token id 99999 is outside the model's vocabulary of 1024" in captured.err
        assert "Traceback" not in captured.err and captured.out == ""


def test_skip_bad_rows_skips_and_counts_them(setup, tmp_path, capsys):
    base, _, data = setup
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(open(data).read() + '{"messages": "not a list"}\n')
    assert main(["eval", "--model_name_or_path", base, "--eval_file", str(mixed)]) == 2
    assert "skip_bad_rows" in capsys.readouterr().err  # the hint names an option eval has
    assert main(["eval", "--model_name_or_path", base, "--eval_file", str(mixed), "--skip_bad_rows"]) == 0
    assert ": 2 examples (messages)" in capsys.readouterr().out.splitlines()[0]
    assert main(["eval", "--model_name_or_path", base, "--eval_file", str(mixed), "--skip_bad_rows",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 1


def test_nan_adapter_weights_exit_2_instead_of_printing_nan(setup, tmp_path, capsys):
    import os

    import torch
    from safetensors.torch import load_file, save_file

    base, _, data = setup
    path = save_tiny_adapter(tmp_path / "nan", base)
    weights = os.path.join(path, "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights)
    assert main(["eval", "--adapter", path, "--eval_file", data]) == 2
    captured = capsys.readouterr()
    assert "hold NaN or Inf values" in captured.err and captured.out == ""
