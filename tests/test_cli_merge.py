"""`loratune merge` in-process: exact output folder, PASS line, plain transformers load, QLoRA."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from loratune.cli.main import main
from loratune.tools.export import logits_of, probe_batch
from loratune.tools.load_trained import load_model
from test_export import MERGED_FILES
from test_load_trained import save_tiny_adapter, save_tiny_model_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-merge")
    base = save_tiny_model_dir(root / "base")
    qlora = save_tiny_adapter(root / "qlora", base, scale=0.3,
                              train_config="load_in_4bit: true\nbf16: true\n")
    return base, save_tiny_adapter(root / "adapter", base, scale=0.3), qlora


def test_merge_float32_passes_and_loads_in_plain_transformers(dirs, tmp_path, capsys):
    base, adapter, _ = dirs
    out = str(tmp_path / "merged")
    assert main(["merge", "--adapter", adapter, "--output_dir", out, "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Merging {base} + adapter {adapter} -> {out} (float32)"
    assert lines[1].startswith("Logit check, merged vs the adapter model (float32): max abs diff ")
    assert lines[1].endswith(": PASS")
    assert sorted(os.listdir(out)) == MERGED_FILES
    assert lines[2] == f"Wrote {out}: {', '.join(MERGED_FILES)}"
    loaded = load_model(adapter=adapter, dtype="float32")
    probe = probe_batch(loaded.tokenizer, 1024)
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits_of(merged, probe), logits_of(loaded.model, probe), atol=1e-3, rtol=0)


def test_qlora_adapter_is_dequantized_and_written_in_bf16(dirs, tmp_path, capsys):
    _, _, qlora = dirs
    out = str(tmp_path / "merged")
    assert main(["merge", "--adapter", qlora, "--output_dir", out, "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert "writing bfloat16, not float32" in captured.err
    lines = captured.out.splitlines()
    assert "(4-bit nf4)" in lines[0] and lines[0].endswith("(bfloat16)")
    assert "vs the adapter model on its 4-bit nf4 base (float32)" in lines[1] and lines[1].endswith("PASS")
    assert lines[2].startswith("Written bfloat16 model vs the adapter model on its 4-bit nf4 base: "
                               "max abs diff ")
    assert sorted(os.listdir(out)) == MERGED_FILES
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    assert not any(getattr(m, "is_quantized", False) for m in merged.modules())


def test_failed_check_exits_1_and_writes_nothing(dirs, tmp_path, capsys, monkeypatch):
    from loratune.tools import export

    _, adapter, _ = dirs
    monkeypatch.setattr(export, "merge_into_base", lambda loaded: loaded.model.unload())  # drops the adapter
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", adapter, "--output_dir", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].endswith(": FAIL")
    assert "was not written" in captured.err
    assert not out.exists()


@pytest.mark.parametrize("tolerance", ["nan", "inf", "-inf", "-1"])
def test_non_finite_or_negative_tolerance_exits_2_and_writes_nothing(dirs, tmp_path, capsys, tolerance):
    _, adapter, _ = dirs
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", adapter, "--output_dir", str(out), f"--tolerance={tolerance}"]) == 2
    captured = capsys.readouterr()
    assert "error: --tolerance must be a finite number >= 0" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == "" and not out.exists()


def test_bad_inputs_exit_2(dirs, tmp_path, capsys):
    _, adapter, _ = dirs
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["merge", "--adapter", adapter, "--output_dir", str(full)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert os.listdir(full) == ["keep.txt"]
    assert main(["merge", "--adapter", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "nope: adapter directory does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["merge", "--adapter", adapter, "--output_dir", str(tmp_path / "o"), "--dtype", "auto"])
    assert exc.value.code == 2 and "--dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", "--output_dir", str(tmp_path / "o")])
    assert "--adapter" in capsys.readouterr().err


def test_an_empty_output_dir_exits_2_and_leaves_the_current_directory_alone(dirs, tmp_path, capsys,
                                                                             monkeypatch):
    _, adapter, _ = dirs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("mine")
    assert main(["merge", "--adapter", adapter, "--output_dir", ""]) == 2
    captured = capsys.readouterr()
    assert "error: --output_dir is empty" in captured.err and captured.out == ""
    assert os.listdir(tmp_path) == ["config.json"] and (tmp_path / "config.json").read_text() == "mine"


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_an_output_dir_below_a_file_exits_2_naming_the_file(dirs, tmp_path, capsys, fmt):
    _, adapter, _ = dirs
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "merged"
    assert main(["merge", "--adapter", adapter, "--output_dir", str(out), "--format", fmt]) == 2
    captured = capsys.readouterr()
    assert f"'{tmp_path / 'notes.txt'}' is a file, not a directory" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_device_torch_knows_but_cannot_load_on_exits_2(dirs, tmp_path, capsys):
    _, adapter, _ = dirs
    assert main(["merge", "--adapter", adapter, "--output_dir", str(tmp_path / "o"), "--device", "meta"]) == 2
    assert "error: --device 'meta' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_trained_adapter_end_to_end(dirs, tmp_path, capsys):
    """`loratune train` output -> eval (adapter beats base on its training data) -> merge PASS -> generate."""
    import json

    base, _, _ = dirs
    rows = [{"prompt": f"Q{i}: say yes.", "completion": " yes yes yes"} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "run")
    try:
        assert main(["train", "--model_name_or_path", base, "--train_file", str(data), "--output_dir", out,
                     "--max_steps", "12", "--learning_rate", "5e-3", "--per_device_train_batch_size", "4",
                     "--max_seq_length", "64", "--save_steps", "0", "--bf16", "false"]) == 0
    finally:
        torch.set_flush_denormal(False)  # train() flushes denormals process-wide; later tests need them
    capsys.readouterr()
    assert main(["eval", "--adapter", out, "--eval_file", str(data), "--json", "--dtype", "float32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"]["loss"] < result["base"]["loss"]
    merged = str(tmp_path / "merged")
    assert main(["merge", "--adapter", out, "--output_dir", merged]) == 0
    assert ": PASS" in capsys.readouterr().out
    assert main(["generate", "--model_name_or_path", merged, "--prompt", "Q1: say yes.",
                 "--max_new_tokens", "3"]) == 0


@pytest.mark.parity
def test_adapter_saved_by_peft_inspects_and_merges(dirs, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    base, _, _ = dirs
    model = AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], init_lora_weights=False,
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert "Targets:     o_proj, q_proj (4 modules)" in out and "vLLM:   ACCEPTED" in out
    merged = str(tmp_path / "merged")
    assert main(["merge", "--adapter", str(tmp_path / "peft"), "--output_dir", merged,
                 "--dtype", "float32"]) == 0
    assert ": PASS" in capsys.readouterr().out
    probe = probe_batch(load_model(base).tokenizer, 1024)
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=probe).logits
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(merged), probe), expected,
                               atol=1e-3, rtol=0)
