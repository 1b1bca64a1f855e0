"""Checkpoint files: atomic writes, rotation, incomplete ones ignored, RNG round trip."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from loratune.errors import ConfigError
from loratune.train import checkpoint as ckpt


def _write_adapter(path):
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as fh:
        fh.write(b"x")


def _save(out, step, limit=None):
    return ckpt.save_checkpoint(str(out), step, write_adapter=_write_adapter, state={"step": step},
                                info={"step": step}, config_yaml="r: 8\n", save_total_limit=limit)


def test_checkpoint_holds_every_part(tmp_path):
    path = _save(tmp_path, 3)
    assert sorted(os.listdir(path)) == sorted(
        ["adapter_model.safetensors", ckpt.STATE_FILE, ckpt.INFO_FILE, ckpt.CONFIG_FILE])
    assert json.loads(open(os.path.join(path, ckpt.INFO_FILE)).read()) == {"step": 3}
    assert ckpt.load_training_state(path) == {"step": 3}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]  # no temp directory left behind


def test_rotation_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8, 10):
        _save(tmp_path, step, limit=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [8, 10]


def test_failed_write_leaves_no_checkpoint(tmp_path):
    def broken(path):
        _write_adapter(path)
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.save_checkpoint(str(tmp_path), 5, write_adapter=broken, state={}, info={}, config_yaml="",
                             save_total_limit=None)
    assert ckpt.list_checkpoints(str(tmp_path)) == []
    assert not os.path.exists(tmp_path / "checkpoint-5")


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    _save(tmp_path, 2)
    os.makedirs(tmp_path / "checkpoint-4")  # a directory without the state files
    os.makedirs(tmp_path / ".checkpoint-6.tmp-123")  # a write cut short by a kill
    assert ckpt.resolve_resume(True, str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-4"), str(tmp_path))
    ckpt.remove_incomplete(str(tmp_path))
    assert not os.path.exists(tmp_path / ".checkpoint-6.tmp-123")
    assert ckpt.resolve_resume(False, str(tmp_path)) is None


def test_resuming_from_an_older_checkpoint_removes_the_later_ones(tmp_path, caplog):
    """They belong to the run it went back from: a later `resume_from_checkpoint: true` must not pick them."""
    for step in (2, 4, 6, 8):
        _save(tmp_path, step)
    with caplog.at_level("WARNING", logger="loratune"):
        ckpt.remove_newer(str(tmp_path), str(tmp_path / "checkpoint-4"))
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2, 4]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]
    assert "removing 2 later checkpoint(s)" in caplog.text and "checkpoint-6, checkpoint-8" in caplog.text
    assert ckpt.resolve_resume(True, str(tmp_path)) == str(tmp_path / "checkpoint-4")


def test_a_checkpoint_is_deleted_under_a_temp_name_so_a_kill_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """Rotation renames before it deletes: a run killed mid-delete leaves a temp folder the next run
    clears, not a `checkpoint-<step>` missing files that nothing would ever remove."""
    import shutil

    for step in (2, 4):
        _save(tmp_path, step)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # the first file goes, then the process dies
        if not os.path.exists(path):
            return
        os.remove(os.path.join(path, ckpt.STATE_FILE))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.rotate_checkpoints(str(tmp_path), 1)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert sorted(os.listdir(tmp_path)) == [".checkpoint-2.tmp-deleted", "checkpoint-4"]
    ckpt.remove_incomplete(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4"]


def test_resume_true_without_checkpoints_starts_fresh(tmp_path):
    assert ckpt.resolve_resume(True, str(tmp_path / "nothing")) is None


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save({"rng": [state]}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)["rng"][0]
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.set_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
