"""Atomic writes: a directory or file appears complete or not at all, and a failed adapter save
leaves neither a partial adapter nor temp litter behind."""

from __future__ import annotations

import os

import pytest

from factories import tiny_model
from loratune import LoraConfig, adapter_io, get_peft_model
from loratune.atomic import atomic_directory, atomic_file


class Boom(Exception):
    pass


def test_new_directory_appears_complete(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        assert not target.exists()  # nothing visible until the block succeeds
        (open(os.path.join(tmp, "a.txt"), "w")).write("a")
        os.makedirs(os.path.join(tmp, "sub"))
        (open(os.path.join(tmp, "sub", "b.txt"), "w")).write("b")
    assert (target / "a.txt").read_text() == "a" and (target / "sub" / "b.txt").read_text() == "b"
    assert os.listdir(tmp_path) == ["out"]


def test_failure_leaves_no_directory_and_no_temp(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(Boom), atomic_directory(target) as tmp:
        (open(os.path.join(tmp, "half.bin"), "w")).write("x")
        raise Boom
    assert os.listdir(tmp_path) == []


def test_existing_directory_keeps_unrelated_files_and_survives_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "metrics.jsonl").write_text("keep")
    (target / "weights").write_text("old")
    with pytest.raises(Boom), atomic_directory(target) as tmp:
        (open(os.path.join(tmp, "weights"), "w")).write("half-written")
        raise Boom
    assert (target / "weights").read_text() == "old"
    with atomic_directory(target) as tmp:
        (open(os.path.join(tmp, "weights"), "w")).write("new")
    assert (target / "weights").read_text() == "new" and (target / "metrics.jsonl").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_file(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(Boom), atomic_file(target) as fh:
        fh.write("partial")
        raise Boom
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]
    with atomic_file(target) as fh:
        fh.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["f.json"]


@pytest.mark.parametrize("fail_in", ["config", "card"])
def test_failed_adapter_save_leaves_no_partial_dir(tmp_path, monkeypatch, fail_in):
    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    if fail_in == "config":  # after the weights were written
        monkeypatch.setattr(LoraConfig, "save_json", lambda self, path: (_ for _ in ()).throw(Boom()))
    else:
        monkeypatch.setattr(adapter_io, "model_card", lambda *a: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        model.save_pretrained(str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == []


def test_failed_resave_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    monkeypatch.setattr(LoraConfig, "save_json", lambda self, path: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        model.save_pretrained(str(out))
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["adapter"]


def test_saved_paths_get_ordinary_permissions(tmp_path):
    import stat

    from loratune.atomic import atomic_directory, atomic_file

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as d:
            with open(os.path.join(d, "a.txt"), "w") as fh:
                fh.write("x")
        with atomic_file(tmp_path / "b.txt") as fh:
            fh.write("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) == 0o644


def test_nearest_existing_stops_at_the_deepest_part_that_exists(tmp_path):
    from loratune.atomic import nearest_existing

    (tmp_path / "file.txt").write_text("x")
    assert nearest_existing(tmp_path / "a" / "b") == str(tmp_path)
    assert nearest_existing(tmp_path / "file.txt" / "a" / "b") == str(tmp_path / "file.txt")
    assert nearest_existing(tmp_path) == str(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # a broken link still blocks the path
    assert nearest_existing(tmp_path / "dangling" / "x") == str(tmp_path / "dangling")


def test_a_failed_save_into_new_folders_leaves_none_of_them(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            open(os.path.join(tmp, "f"), "w").close()
            raise RuntimeError("refused")
    assert os.listdir(tmp_path) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_text("x")
    with pytest.raises(RuntimeError):
        with atomic_directory(target):
            raise RuntimeError("refused")
    assert sorted(os.listdir(tmp_path / "a")) == ["keep"]  # a folder that was there stays


def test_weights_files_are_readable_like_every_other_file(tmp_path):
    """safetensors writes its files 0600: an adapter, a merged model or a GGUF saved by one user
    must be readable by a server running as another, like the JSON beside them."""
    import stat

    from factories import tiny_model
    from loratune import LoraConfig, get_peft_model
    from loratune.tools.gguf import atomic_gguf_path

    old = os.umask(0o022)
    try:
        model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
        model.save_pretrained(str(tmp_path / "adapter"))
        with atomic_gguf_path(tmp_path / "m.gguf") as path:
            with open(path, "wb") as fh:
                fh.write(b"GGUF")
    finally:
        os.umask(old)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "adapter" / name).st_mode) == 0o644, name
    assert stat.S_IMODE(os.stat(tmp_path / "m.gguf").st_mode) == 0o644
