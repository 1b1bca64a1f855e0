"""`loratune eval` in-process: the base vs adapter table, --json, exact match, clean errors."""

from __future__ import annotations

import json

import pytest

from loratune.cli.main import main
from loratune.tools.evaluation import ANSWER_MARGIN
from test_evaluation import CHAT_ROWS, save_answering_model
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


@pytest.mark.parametrize("metric", ["loss", "exact_match"])
def test_an_empty_eval_file_argument_is_named_not_taken_for_the_current_directory(setup, capsys, metric):
    _, adapter, _ = setup
    assert main(["eval", "--adapter", adapter, "--eval_file", "", "--metric", metric]) == 2
    captured = capsys.readouterr()
    assert "error: --eval_file is empty" in captured.err and "directory" not in captured.err
    assert captured.out == ""


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


@pytest.fixture(scope="module")
def answering(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-exact-match")
    base, adapter = save_answering_model(root)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    return base, adapter, str(data)


def test_exact_match_json_holds_accuracy_per_model_and_every_row(answering, capsys):
    base, adapter, data = answering
    assert main(["eval", "--adapter", adapter, "--eval_file", data, "--metric", "exact_match", "--json",
                 "--batch_size", "2", "--max_new_tokens", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "exact_match" and result["n"] == 3 and result["max_new_tokens"] == 5
    assert (result["model"], result["adapter_dir"], result["eval_file"]) == (base, adapter, data)
    assert result["base"] == {"accuracy": 2 / 3, "correct": 2, "n": 3}
    assert result["adapter"] == {"accuracy": 1 / 3, "correct": 1, "n": 3}
    assert [r["expected"] for r in result["rows"]] == ["yes", "no", "yes"]
    assert [r["base_answer"] for r in result["rows"]] == ["yes"] * 3
    assert [r["adapter_answer"] for r in result["rows"]] == ["no"] * 3
    assert [r["base_correct"] for r in result["rows"]] == [True, False, True]
    assert [r["adapter_correct"] for r in result["rows"]] == [False, True, False]
    assert result["rows"][0]["where"] == "chat.jsonl line 1"
    assert result["rows"][0]["prompt"].endswith("Is it raining?<|im_end|>\n<|im_start|>assistant\n")
    assert [r["question"] for r in result["rows"]] == ["Is it raining?", "Sure?", "Is it late?"]
    assert main(["eval", "--model_name_or_path", base, "--eval_file", data, "--metric", "exact_match",
                 "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["adapter"] is None and plain["base"]["correct"] == 2
    assert "adapter_answer" not in plain["rows"][0]
    assert plain["max_new_tokens"] == ANSWER_MARGIN + 2  # "yes" is two tokens, "y" "es"


def test_exact_match_table_shows_before_after_and_the_answers(answering, capsys):
    base, adapter, data = answering
    assert main(["eval", "--adapter", adapter, "--eval_file", data, "--metric", "exact_match"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{base} + adapter {adapter} on {data}: 3 rows, greedy answers of up to 18 tokens"
    assert out[1] == "exact match: base 66.7% (2/3) -> adapter 33.3% (1/3)"
    assert out[2].split() == ["question", "base", "adapter", "expected"]
    assert [line.split()[-5:] for line in out[3:]] == [["=", "yes", "x", "no", "yes"],
                                                       ["x", "yes", "=", "no", "no"],
                                                       ["=", "yes", "x", "no", "yes"]]
    assert [line[:26] for line in out[3:]] == ["Is it raining?            ", "Sure?                     ",
                                               "Is it late?               "]


def test_exact_match_bad_inputs_exit_2_naming_the_problem(answering, tmp_path, capsys):
    base, adapter, _ = answering
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a\\n", "completion": "b"}\n{"prompt": "c\\n"}\n')
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "plain"}\n')
    for path, message in ((missing, "missing.jsonl line 2: missing field 'completion'"),
                          (text, "text.jsonl: its rows are 'text' (columns ['text'])")):
        assert main(["eval", "--adapter", adapter, "--eval_file", str(path), "--metric", "exact_match"]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err and captured.out == ""
    assert main(["eval", "--adapter", adapter, "--eval_file", str(missing), "--metric", "exact_match",
                 "--max_new_tokens", "0", "--batch_size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max_new_tokens must be >= 1, got 0" in err and "--batch_size must be >= 1, got 0" in err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--adapter", adapter, "--eval_file", str(missing), "--metric", "bleu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --metric: invalid choice: 'bleu'" in err and "exact_match" in err  # quoting varies


def test_the_help_states_the_library_answer_margin():
    from loratune.cli import eval as cli_eval
    from loratune.tools import evaluation

    assert cli_eval.ANSWER_MARGIN == evaluation.ANSWER_MARGIN


def test_exact_match_table_shows_the_part_of_each_question_that_differs():
    from loratune.cli.eval import format_answers
    from loratune.tools.evaluation import AnswerRecord, ExactMatchResult

    shared = "Extract the order's name, city, item and quantity, one 'key: value' line each."
    records = [AnswerRecord("t.jsonl:1", "p", f"{shared}\n\nOrder for Ada (Leeds): 2 tins.", "name: Ada", "x",
                            False),
               AnswerRecord("t.jsonl:2", "p", "One paragraph only", "y", "y", True)]
    table = format_answers(ExactMatchResult(0.5, 1, 2, records), None, 5).splitlines()
    assert table[1].startswith("Order for Ada (Leeds)...") and table[2].startswith("One paragraph only")
