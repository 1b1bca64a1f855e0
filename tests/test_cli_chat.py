"""`loratune chat` driven through stdin: history, /reset, /exit, end of input."""

from __future__ import annotations

import io
import sys

import pytest

from loratune.cli.main import main
from loratune.tools.generation import ChatSession
from test_load_trained import save_tiny_adapter, save_tiny_model_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base = save_tiny_model_dir(root / "base")
    return base, save_tiny_adapter(root / "adapter", base)


def chat(monkeypatch, capsys, stdin: str, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", "--max_new_tokens", "4", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_history_reset_and_exit(dirs, monkeypatch, capsys):
    _, adapter = dirs
    seen = []
    original = ChatSession.reply

    def spy(self, text, on_text=None):
        seen.append([m["role"] for m in self.messages()])
        return original(self, text, on_text)

    monkeypatch.setattr(ChatSession, "reply", spy)
    code, out, err = chat(monkeypatch, capsys, "hello\nmore\n/reset\nagain\n/exit\nnever read\n",
                          "--adapter", adapter)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Chatting with ") and adapter in lines[0]
    assert sum(line.startswith("assistant> ") for line in lines) == 3
    assert "(history cleared)" in lines
    assert seen == [[], ["user", "assistant"], []]  # history grows, then /reset empties it


def test_end_of_input_quits_and_blank_lines_are_skipped(dirs, monkeypatch, capsys):
    base, _ = dirs
    code, out, _ = chat(monkeypatch, capsys, "\n\nhi\n", "--model_name_or_path", base,
                        "--system", "Be brief.")
    assert code == 0
    assert sum(line.startswith("assistant> ") for line in out.splitlines()) == 1


def test_missing_chat_template_is_reported_before_the_loop(dirs, tmp_path, monkeypatch, capsys):
    import shutil

    base, _ = dirs
    plain = tmp_path / "plain"
    shutil.copytree(base, plain)
    (plain / "chat_template.jinja").unlink()
    code, out, err = chat(monkeypatch, capsys, "hi\n", "--model_name_or_path", str(plain))
    assert code == 2 and "chat_template" in err and "Traceback" not in err
    assert out == ""


def test_ctrl_c_leaves_quietly(dirs, monkeypatch, capsys):
    base, _ = dirs

    def interrupt(self, text, on_text=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(ChatSession, "reply", interrupt)
    code, out, err = chat(monkeypatch, capsys, "hi\nmore\n", "--model_name_or_path", base)
    assert code == 0 and "Traceback" not in err
    # "more" unread
    assert [line for line in out.splitlines() if line.startswith("assistant>")] == ["assistant> "]


def test_a_line_that_is_not_utf8_is_reported_and_the_chat_goes_on(dirs, monkeypatch, capsys):
    _, adapter = dirs
    # A strict UTF-8 stdin (as in a non-C locale) would raise UnicodeDecodeError on reading the line.
    stdin = io.TextIOWrapper(io.BytesIO(b"hi\ncaf\xe9\nmore\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    code = main(["chat", "--max_new_tokens", "2", "--adapter", adapter])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert "error: input line 2 is not valid UTF-8 (byte(s) 0xe9 at character 3)" in captured.err
    assert sum(line.startswith("assistant> ") for line in captured.out.splitlines()) == 2  # lines 1 and 3


def test_a_system_prompt_that_is_not_utf8_exits_2(dirs, monkeypatch, capsys):
    base, _ = dirs
    code, out, err = chat(monkeypatch, capsys, "hi\n", "--model_name_or_path", base, "--system", "caf\udce9")
    assert code == 2 and out == "" and "error: --system is not valid UTF-8" in err


def test_a_closed_stdin_exits_2_before_loading_the_model(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets for `loratune chat <&-`
    code = main(["chat", "--model_name_or_path", "/no/such/model"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and "Traceback" not in captured.err
    assert "error: stdin is closed" in captured.err


@pytest.mark.parametrize("verb, default", [("chat", 256), ("generate", 64)])
def test_help_states_the_max_new_tokens_default_in_use(verb, default, capsys):
    from loratune.cli.main import build_parser

    parser = build_parser([verb])
    args = parser.parse_args([verb, "--prompt", "p"] if verb == "generate" else [verb])
    assert args.max_new_tokens == default
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    assert f"(default: {default})" in " ".join(capsys.readouterr().out.split())
