"""`loratune generate` in-process: base vs adapter, greedy vs seeded sampling, clean errors."""

from __future__ import annotations

import pytest

from loratune.cli.main import main
from test_load_trained import save_tiny_adapter, save_tiny_model_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base = save_tiny_model_dir(root / "base")
    return base, save_tiny_adapter(root / "adapter", base, scale=0.5)


def generate(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_base_and_adapter_greedy(dirs, capsys):
    base, adapter = dirs
    code, base_text, err = generate(capsys, "--model_name_or_path", base, "--prompt", "Hello",
                                    "--max_new_tokens", "8")
    assert code == 0 and f"# {base}" in err
    code, again, _ = generate(capsys, "--model_name_or_path", base, "--prompt", "Hello",
                              "--max_new_tokens", "8")
    assert again == base_text  # greedy is deterministic
    # the base model defaults to the adapter's base_model_name_or_path
    code, adapted, err = generate(capsys, "--adapter", adapter, "--prompt", "Hello", "--max_new_tokens", "8")
    assert code == 0 and f"+ adapter {adapter}" in err
    assert adapted != base_text


def test_sampling_with_seed_and_chat(dirs, capsys):
    base, _ = dirs
    args = ["--model_name_or_path", base, "--prompt", "Hi", "--max_new_tokens", "8", "--temperature", "1.2",
            "--top_p", "0.9", "--seed", "7"]
    code, first, _ = generate(capsys, *args)
    assert code == 0
    assert generate(capsys, *args)[1] == first
    code, _, _ = generate(capsys, "--model_name_or_path", base, "--prompt", "Hi", "--chat",
                          "--max_new_tokens", "4")
    assert code == 0


def test_preset_model(capsys):
    code, text, err = generate(capsys, "--model_name_or_path", "preset:tiny-llama", "--prompt", "Hi",
                               "--max_new_tokens", "3")
    assert code == 0 and "preset:tiny-llama" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--adapter", "/no/such/adapter", "--prompt", "x"],
     "/no/such/adapter: adapter directory does not exist"),
    (["--model_name_or_path", "/no/such/model", "--prompt", "x"],
     "'/no/such/model' is not a local directory"),
    (["--prompt", "x"], "pass --model_name_or_path, --adapter, or both"),
    (["--adapter", "some-org/some-adapter", "--prompt", "x"],
     "some-org/some-adapter: no adapter_config.json"),
    (["--model_name_or_path", "M", "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["--model_name_or_path", "preset:tiny-llama", "--prompt", "x", "--device", "banana"],
     "--device 'banana'"),
    (["--model_name_or_path", "M", "--prompt", "x", "--temperature", "1", "--seed", "-1"],
     "--seed must be an integer"),
    (["--model_name_or_path", "M", "--prompt", "x", "--temperature", "1", "--seed",
      "99999999999999999999999"],
     "--seed must be an integer from 0 to 18446744073709551615"),
    (["--model_name_or_path", "M", "--prompt", "x", "--temperature", "nan"],
     "--temperature must be >= 0 and finite"),
    (["--model_name_or_path", "M", "--prompt", "x", "--temperature", "inf"],
     "--temperature must be >= 0 and finite"),
    (["--model_name_or_path", "M", "--prompt", "x", "--top_p", "nan"], "--top_p must be in (0, 1]"),
    (["--model_name_or_path", "M", "--prompt", "caf\udce9"], "--prompt is not valid UTF-8 (byte(s) 0xe9"),
    # torch parses these, but the loaders cannot run on them (meta has no data, mps is not built in)
    (["--model_name_or_path", "M", "--prompt", "x", "--device", "meta"], "--device 'meta' is not supported"),
    (["--model_name_or_path", "M", "--prompt", "x", "--device", "mps"], "--device 'mps' is not supported"),
])
def test_bad_input_exits_2_without_traceback(capsys, args, message):
    code, out, err = generate(capsys, *args)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_corrupt_adapter_names_the_file(dirs, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    code, _, err = generate(capsys, "--adapter", str(bad), "--prompt", "x")
    assert code == 2 and "adapter_config.json: invalid JSON" in err


def test_truncated_base_weights_name_the_file(dirs, tmp_path, capsys):
    import shutil

    base, _ = dirs
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    with open(broken / "model.safetensors", "r+b") as fh:
        fh.truncate(5000)
    code, out, err = generate(capsys, "--model_name_or_path", str(broken), "--prompt", "x")
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"cannot read the weights in {broken / 'model.safetensors'}" in err


def test_bad_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "x", "--max_new_tokens", "many"])
    assert exc.value.code == 2
    assert "--max_new_tokens" in capsys.readouterr().err


def test_qlora_adapter_generates_on_a_quantized_base(dirs, tmp_path, capsys):
    base, _ = dirs
    qlora = save_tiny_adapter(tmp_path / "q", base, train_config="load_in_8bit: true\n")
    code, text, err = generate(capsys, "--adapter", qlora, "--prompt", "Hello", "--max_new_tokens", "4")
    assert code == 0 and "(8-bit int8) + adapter" in err
    code, _, err = generate(capsys, "--adapter", qlora, "--no-load_in_8bit", "--prompt", "Hello",
                            "--max_new_tokens", "4")
    assert code == 0 and "int8" not in err


def test_ctrl_c_while_generating_exits_130_without_a_traceback(dirs, capsys, monkeypatch):
    from loratune.tools import generation

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "generate_text", interrupt)
    code, out, err = generate(capsys, "--model_name_or_path", dirs[0], "--prompt", "Hello")
    assert code == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err


def test_ctrl_c_while_the_verb_is_imported_exits_130(capsys, monkeypatch):
    """The verb's module (and torch, transformers) is imported while the parser is built."""
    import loratune.cli.main as cli_main

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "build_parser", interrupted)
    assert cli_main.main(["generate", "--prompt", "x"]) == 130
    assert "Traceback" not in capsys.readouterr().err
