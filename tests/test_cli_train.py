"""`loratune train` run in-process: output folder contents, every data format, config errors.

The helpers at the top (tiny model directory, data rows, `train_cli`) are imported by the other
trainer test files.
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import yaml

from factories import tiny_model
from loratune.cli.main import main
from loratune.tools.loading import load_tokenizer

QA = [("What is the capital of France?", "Paris."), ("Add 2 and 3.", "5."), ("Opposite of hot?", "Cold."),
      ("Reverse the word cat.", "tac."), ("Capital of Peru?", "Lima."), ("Add 1 and 1.", "2."),
      ("Opposite of big?", "Small."), ("Reverse the word dog.", "god.")]


def make_model_dir(path, **overrides) -> str:
    """A 2-layer random Llama with the preset's byte-level tokenizer, saved as an HF directory
    (`overrides` change its config, e.g. intermediate_size)."""
    model = tiny_model("llama", vocab_size=1024, bos_token_id=1, eos_token_id=3, pad_token_id=0,
                       initializer_range=0.2, **overrides)
    model.save_pretrained(path)
    load_tokenizer("preset:tiny-llama").save_pretrained(path)
    return str(path)


def rows_for(fmt: str, n: int = 16) -> list[dict]:
    """`n` rows of a data format: text, prompt_completion, messages, alpaca or sharegpt."""
    out = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        out.append({
            "text": {"text": f"{q} {a}"},
            "prompt_completion": {"prompt": q, "completion": a},
            "messages": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
            "alpaca": {"instruction": q, "input": "", "output": a},
            "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        }[fmt])
    return out


def write_rows(path, rows: list[dict]) -> str:
    """Write rows as .jsonl, .json, .csv or .parquet (by suffix)."""
    path = str(path)
    if path.endswith(".jsonl"):
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.endswith(".json"):
        with open(path, "w") as fh:
            json.dump(rows, fh)
    elif path.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def base_flags(model_dir: str, train_file: str, out) -> list[str]:
    """Flags for a short, quiet run on the tiny model."""
    return ["--model_name_or_path", model_dir, "--train_file", train_file, "--output_dir", str(out),
            "--r", "4", "--lora_alpha", "8", "--max_seq_length", "64", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2", "--bf16", "false", "--disable_tqdm", "true", "--logging_steps", "1"]


def train_cli(args: list[str]) -> int:
    return main(["train", *args])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def messages_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "train.jsonl", rows_for("messages"))


def test_train_writes_exactly_the_documented_outputs(model_dir, messages_file, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"max_steps": 4, "save_steps": 2, "save_total_limit": 1,
                                      "eval_steps": 2}))
    rc = train_cli([str(config), *base_flags(model_dir, messages_file, out), "--eval_file", messages_file])
    assert rc == 0
    assert sorted(os.listdir(out)) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", "checkpoint-2", "loss.png",
        "metrics.jsonl", "train_config.yaml",
    ])
    assert sorted(os.listdir(out / "checkpoint-2")) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", "train_config.yaml",
        "trainer_state.json", "training_state.pt",
    ])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert set(train[0]) >= {"step", "loss", "learning_rate", "tokens_per_s", "epoch", "grad_norm"}
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["perplexity"] > 1 and len(r["samples"]) == 2 for r in evals)
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["max_steps"] == 4 and saved["r"] == 4 and saved["train_file"] == messages_file
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert type(adapter_config["lora_alpha"]) is int  # 8, not 8.0: as PEFT writes a whole alpha
    printed = capsys.readouterr().out
    for where in (str(out), "metrics.jsonl", "loss.png", "Before:", "After:"):
        assert where in printed


@pytest.mark.parametrize(
    "fmt, suffix",
    [("text", ".jsonl"), ("prompt_completion", ".csv"), ("messages", ".json"), ("alpaca", ".parquet"),
     ("sharegpt", ".jsonl")],
)
def test_each_data_format_trains_through_the_cli(fmt, suffix, model_dir, tmp_path, capsys):
    data = write_rows(tmp_path / f"train{suffix}", rows_for(fmt))
    out = tmp_path / "run"
    rc = train_cli([*base_flags(model_dir, data, out), "--max_steps", "2", "--save_steps", "0",
                    "--max_seq_length", "128"])
    assert rc == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["loss"] > 0 for r in records)
    assert (out / "adapter_model.safetensors").exists()


def test_unknown_flag_and_key_name_a_close_match(model_dir, messages_file, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("lora_alpah: 16\n")
    rc = train_cli([str(config), *base_flags(model_dir, messages_file, tmp_path / "o"), "--lerning_rate",
                    "1e-3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown flag --lerning_rate; did you mean --learning_rate?" in err
    assert "unknown key 'lora_alpah'; did you mean 'lora_alpha'?" in err
    assert "Valid keys:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_values_are_reported_together(model_dir, messages_file, tmp_path, capsys):
    rc = train_cli([*base_flags(model_dir, messages_file, tmp_path / "o"), "--r", "four",
                    "--packing", "maybe", "--warmup_ratio", "2", "--lr_scheduler_type", "exp"])
    err = capsys.readouterr().err
    assert rc == 2 and "4 problems" in err and "Traceback" not in err
    for needle in ("r: expected an integer, got 'four'", "packing: expected a boolean",
                   "warmup_ratio must be in [0, 1]",
                   "lr_scheduler_type: expected one of"):
        assert needle in err


def test_a_bad_flag_value_is_blamed_on_the_flag_and_a_bad_key_on_the_file(tmp_path, capsys):
    config = tmp_path / "base.yaml"
    config.write_text("train_file: t.jsonl\nlora_alpha: -1\n")
    assert train_cli([str(config), "--r", "-4", "--lora_alpha", "8"]) == 2
    assert capsys.readouterr().err == "error: --r must be > 0, got -4\n"
    assert train_cli([str(config), "--r", "-4"]) == 2
    err = capsys.readouterr().err
    assert "  - --r must be > 0, got -4" in err
    assert f"  - {config}: lora_alpha must be a finite number > 0, got -1.0" in err


@pytest.mark.parametrize("flag", ["--no-packing", "--no_packing"])
def test_no_prefix_turns_a_boolean_key_off(flag):
    from loratune.cli.train import load_config_from_args, split_args

    config, overrides, problems, _ = split_args(["--train_file", "t.jsonl", flag, "--no-bf16"], {})
    assert problems == [] and overrides == {"train_file": "t.jsonl", "packing": False, "bf16": False}
    args = type("Args", (), {"config": config, "overrides": overrides, "flag_problems": problems})
    cfg = load_config_from_args(args)
    assert cfg.data.packing is False and cfg.model.bf16 is False
    _, _, problems, _ = split_args([f"{flag}=true", "--no-r", "4"], {})
    assert problems[0] == f"{flag} takes no value (it sets packing to false), got 'true'"
    assert problems[1].startswith("unknown flag --no_r")


def test_missing_config_file_and_missing_data(tmp_path, capsys):
    assert train_cli([str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert train_cli(["--output_dir", str(tmp_path / "o")]) == 2
    assert "no training data" in capsys.readouterr().err


def test_unreadable_config_paths_are_named(tmp_path, capsys):
    assert train_cli([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"config path is a directory, not a YAML file: {tmp_path}" in err and "Traceback" not in err
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("output_dir: café\n".encode("latin-1"))
    assert train_cli([str(latin)]) == 2
    err = capsys.readouterr().err
    assert f"{latin}: " in err and "not a UTF-8 text file (byte 0xe9" in err and "Traceback" not in err


def test_output_dir_that_is_a_file_fails_before_anything_loads(model_dir, messages_file, tmp_path,
                                                               monkeypatch, capsys):
    import loratune.tools.loading
    import loratune.train.api as api

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded the tokenizer or model before checking output_dir")

    monkeypatch.setattr(loratune.tools.loading, "load_tokenizer", must_not_load)
    monkeypatch.setattr(api, "build_model", must_not_load)
    file = tmp_path / "taken"
    file.write_text("not a directory")
    assert train_cli(base_flags(model_dir, messages_file, file)) == 2
    assert f"output_dir {str(file)!r} is an existing file" in capsys.readouterr().err
    assert train_cli(base_flags(model_dir, messages_file, file / "sub")) == 2
    assert f"is inside {str(file)!r}, which is a file" in capsys.readouterr().err


def test_malformed_row_stops_before_training_naming_file_and_line(model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    rows = [json.dumps(r) for r in rows_for("prompt_completion", 4)]
    rows[2] = '{"prompt": "unterminated'
    data.write_text("\n".join(rows) + "\n")
    rc = train_cli(base_flags(model_dir, str(data), tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl" in err and "line 3" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written before the data is known good


def test_help_lists_every_key_with_its_meaning(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for key in ("--learning_rate", "--lora_dropout", "--packing", "--resume_from_checkpoint", "--report_to"):
        assert key in text
    assert "dropout on the LoRA branch input" in text


def test_tensorboard_list_flags_bf16_and_checkpointing(model_dir, messages_file, tmp_path):
    out = tmp_path / "run"
    rc = train_cli([*base_flags(model_dir, messages_file, out), "--max_steps", "2", "--save_steps", "0",
                    "--report_to", "tensorboard", "--target_modules", "q_proj", "v_proj", "--bf16", "true",
                    "--gradient_checkpointing"])
    assert rc == 0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "runs"))
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == ["q_proj", "v_proj"]
    assert yaml.safe_load((out / "train_config.yaml").read_text())["gradient_checkpointing"] is True
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)


def test_a_single_module_name_is_a_list_of_one(model_dir, messages_file, tmp_path):
    from loratune.train.build import target_modules_for_peft

    assert target_modules_for_peft("q_proj") == ["q_proj"]
    assert target_modules_for_peft("all-linear") == "all-linear"
    assert target_modules_for_peft(r".*self_attn\.(q|v)_proj") == r".*self_attn\.(q|v)_proj"
    out = tmp_path / "run"
    rc = train_cli([*base_flags(model_dir, messages_file, out), "--max_steps", "1", "--save_steps", "0",
                    "--target_modules", "q_proj"])
    assert rc == 0
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--use_dora", "--use_rslora"])
def test_adapter_and_quantization_keys_reach_the_model(flag, model_dir, messages_file, tmp_path):
    out = tmp_path / "run"
    assert train_cli([*base_flags(model_dir, messages_file, out), "--max_steps", "2", "--save_steps", "0",
                      flag]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    if flag != "--load_in_4bit":
        assert config[flag.lstrip("-")] is True
    assert yaml.safe_load((out / "train_config.yaml").read_text())[flag.lstrip("-")] is True


def test_token_ids_past_the_vocabulary_stop_before_training(model_dir, tmp_path, capsys):
    data = tmp_path / "ids.jsonl"
    rows = ([1, 2, 3], [1, 2, 10**6], [4, 5])
    data.write_text("\n".join(json.dumps({"input_ids": ids}) for ids in rows) + "\n")
    rc = train_cli(base_flags(model_dir, str(data), tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 2 and "ids.jsonl line 2: token id 1000000 is outside the model's vocabulary" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_trls_flag_names_map_to_ours():
    from loratune.cli.train import split_args

    args = ["c.yaml", "--max_length", "256", "--dataset-text-field", "b"]
    config, overrides, problems, _ = split_args(args, {})
    assert (config, overrides, problems) == ("c.yaml", {"max_seq_length": "256", "text_column": "b"}, [])


def test_a_flag_overrides_the_yaml_under_either_name(tmp_path):
    """YAML `max_length` (TRL's name) and `--max_seq_length` are one setting: the flag wins."""
    import argparse

    from loratune.cli.train import load_config_from_args

    config = tmp_path / "c.yaml"
    config.write_text("max_length: 64\ntrain_file: t.jsonl\n")
    args = argparse.Namespace(config=str(config), overrides={"max_seq_length": "32"}, flag_problems=[])
    assert load_config_from_args(args).data.max_seq_length == 32
