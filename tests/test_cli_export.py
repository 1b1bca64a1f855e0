"""`loratune export` in-process: where the files go, and output paths that must be refused."""

from __future__ import annotations

import os

import pytest

from loratune.cli.main import main
from test_load_trained import save_tiny_adapter, save_tiny_model_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-export")
    base = save_tiny_model_dir(root / "base")
    return base, save_tiny_adapter(root / "adapter", base, scale=0.3)


def test_default_output_dir_is_beside_the_adapter_also_for_dot(dirs, tmp_path, capsys, monkeypatch):
    import shutil

    _, adapter = dirs
    run = tmp_path / "run"
    shutil.copytree(adapter, run)
    monkeypatch.chdir(run)
    assert main(["export", ".", "--format", "gguf"]) == 0
    assert f"Wrote {tmp_path / 'run-gguf'}: " in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "run-gguf")) == ["Modelfile", "adapter.gguf", "base.gguf"]
    assert sorted(os.listdir(run)) == sorted(os.listdir(adapter))  # nothing written into the adapter


def test_an_empty_output_dir_exits_2_instead_of_the_default(dirs, tmp_path, capsys, monkeypatch):
    _, adapter = dirs
    monkeypatch.chdir(tmp_path)
    assert main(["export", adapter, "--format", "gguf", "-o", ""]) == 2
    captured = capsys.readouterr()
    assert "error: --output_dir is empty" in captured.err and captured.out == ""
    assert os.listdir(tmp_path) == [] and not os.path.exists(adapter + "-gguf")


def test_an_output_dir_below_a_file_exits_2_naming_the_file(dirs, tmp_path, capsys):
    _, adapter = dirs
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", adapter, "--format", "gguf", "-o", str(tmp_path / "notes.txt" / "a" / "b")]) == 2
    captured = capsys.readouterr()
    assert f"'{tmp_path / 'notes.txt'}' is a file, not a directory" in captured.err
    assert "Traceback" not in captured.err and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["empty", "adapter"])
def test_a_base_gguf_that_is_not_a_model_exits_2_naming_it(dirs, tmp_path, capsys, kind):
    """An empty .gguf, or a GGUF adapter given as the base, is named instead of a reader's traceback."""
    _, adapter = dirs
    base = tmp_path / "base.gguf"
    if kind == "empty":
        base.write_bytes(b"")
    else:
        assert main(["export", adapter, "--format", "gguf", "-o", str(tmp_path / "first")]) == 0
        os.replace(tmp_path / "first" / "adapter.gguf", base)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["export", adapter, "--format", "gguf", "--base", str(base), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(base) in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_non_empty_output_dir_exits_2_and_says_what_it_protects(dirs, tmp_path, capsys):
    _, adapter = dirs
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", adapter, "--format", "gguf", "-o", f"{tmp_path}/"]) == 2
    err = capsys.readouterr().err
    assert f"--output_dir '{tmp_path}/' already exists and is not empty" in err
    assert "merged model" not in err  # export writes an adapter, not a merged model
    assert os.listdir(tmp_path) == ["notes.txt"]
