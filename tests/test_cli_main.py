"""`loratune VERB`: long options are accepted with dashes or underscores, whichever a user types."""

from __future__ import annotations

import pytest

from loratune.cli.main import build_parser, either_spelling, main
from loratune.cli.train import split_args


def parse(argv):
    parser = build_parser(argv)
    return parser.parse_args(either_spelling(parser, argv))


@pytest.mark.parametrize("spelling", ["-", "_"])
def test_serve_options_take_either_spelling(spelling):
    names = ("load-in-4bit", "max-model-len", "bnb-4bit-quant-type")
    flags = ["--" + f.replace("-", spelling) for f in names]
    args = parse(["serve", "--model", "m", flags[0], flags[1], "64", flags[2], "fp4"])
    assert (args.load_in_4bit, args.max_model_len, args.bnb_4bit_quant_type) == (True, 64, "fp4")


@pytest.mark.parametrize("flag, value", [("--load_in_4bit", True), ("--load-in-4bit", True),
                                         ("--no-load_in_4bit", False), ("--no-load-in-4bit", False)])
def test_boolean_options_keep_their_no_prefix(flag, value):
    args = parse(["generate", "--prompt", "p", "--max-new-tokens", "3", flag])
    assert args.load_in_4bit is value and args.max_new_tokens == 3


def test_values_and_positionals_are_left_alone():
    argv = ["generate", "--prompt=--max_new_tokens", "--max_new_tokens=4", "--", "--top-p"]
    assert either_spelling(build_parser(argv), argv) == [
        "generate", "--prompt=--max_new_tokens", "--max_new_tokens=4", "--", "--top-p"]
    argv = ["generate", "--max-new-tokens=4", "--top-p", "0.5"]
    assert either_spelling(build_parser(argv), argv)[1:] == ["--max_new_tokens=4", "--top_p", "0.5"]


def test_help_shows_one_spelling(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--max-model-len" in out and "--max_model_len" not in out


def test_train_and_preview_keys_take_dashes():
    _, overrides, problems, extra = split_args(
        ["--learning-rate", "1e-3", "--target-modules", "q_proj", "v_proj", "--num-examples", "2"],
        {"--num_examples": ("num_examples", True)})
    assert problems == []
    assert overrides == {"learning_rate": "1e-3", "target_modules": ["q_proj", "v_proj"]}
    assert extra == {"num_examples": "2"}
    _, _, problems, _ = split_args(["--lerning-rate", "1"], {})
    assert problems and "--learning_rate" in problems[0]


def test_python_dash_m_runs_the_same_command(monkeypatch, capsys):
    import runpy

    with pytest.raises(SystemExit) as script:
        main(["inspect", "--help"])
    expected = capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["python -m loratune", "inspect", "--help"])
    with pytest.raises(SystemExit) as module:
        runpy.run_module("loratune", run_name="__main__", alter_sys=True)
    assert module.value.code == script.value.code == 0
    assert capsys.readouterr().out == expected
    monkeypatch.setattr("sys.argv", ["python -m loratune", "no-such-verb"])
    with pytest.raises(SystemExit) as bad:
        runpy.run_module("loratune", run_name="__main__", alter_sys=True)
    assert bad.value.code == 2


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path, capsys, monkeypatch):
    """`loratune inspect out/ | head -1`: printing into the closed pipe raises BrokenPipeError."""
    from loratune.config import LoraConfig
    from test_inspection import write_adapter

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    path = write_adapter(tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]),
                         {"model.layers.0.self_attn.q_proj": 4})
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["inspect", path]) == 141  # 128 + SIGPIPE, as the shell reports a process it ended
    assert "Traceback" not in capsys.readouterr().err


def test_text_an_ascii_terminal_cannot_show_is_escaped_not_a_crash(tmp_path, monkeypatch):
    import io

    from loratune.config import LoraConfig
    from test_inspection import write_adapter

    path = write_adapter(tmp_path / "adaptér", LoraConfig(r=4, target_modules=["q_proj"]),
                         {"model.layers.0.self_attn.q_proj": 4})
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")  # PYTHONIOENCODING=ascii, or a C locale
    monkeypatch.setattr("sys.stdout", stdout)
    assert main(["inspect", path]) == 0
    stdout.flush()
    assert b"Adapter:     " + str(tmp_path).encode() + b"/adapt\\xe9r" in stdout.buffer.getvalue()
