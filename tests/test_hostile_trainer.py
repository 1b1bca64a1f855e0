"""Hostile input and faults against the trainer: YAML shapes, data files, killed and full-disk saves,
corrupt checkpoints, ranks that cannot fit. Each case asserts the exit code (or error type) and the
message.

YAML cases run `loratune train FILE` in-process: they fail before anything loads.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
import yaml

from factories import tiny_model
from loratune import LoraConfig
from loratune.atomic import atomic_directory, atomic_file, is_leftover
from loratune.cli.main import main
from loratune.data import DataConfig, build_datasets
from loratune.errors import ConfigError, DataError, DiskFullError, InsufficientMemoryError, LoratuneError
from loratune.tools.yaml_reader import MAX_YAML_BYTES
from loratune.train import checkpoint as ckpt
from loratune.train import resume
from loratune.train.api import out_of_memory_explained
from loratune.train.build import check_adapter_memory
from loratune.train.config import read_yaml

EXIT_USAGE = 2


def laughs(key: str, levels: int = 9, width: int = 9) -> str:
    """A billion-laughs document whose expansion lands under `key` (9**9 = 387 million leaves)."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    lines.append(f"{key}: *a{levels}")
    return "\n".join(lines) + "\n"


YAML_CASES = {
    "bomb_target_modules": (laughs("target_modules"), "expands to over"),
    "bomb_learning_rate": (laughs("learning_rate"), "expands to over"),
    "bomb_dataset_name": (laughs("dataset_name"), "expands to over"),
    "bomb_mapping": ("a: &a {x: 1, y: 1}\n" + "".join(
        f"b{i}: &b{i} {{" + ", ".join(f"k{j}: *{'a' if i == 0 else f'b{i - 1}'}" for j in range(9)) + "}\n"
        for i in range(8)) + "r: *b7\n", "expands to over"),
    "bomb_long_string": ('s: &s "' + "x" * 50_000 + '"\nl: &l [' + ", ".join(["*s"] * 30) + "]\n"
                         + "target_modules: [" + ", ".join(["*l"] * 30) + "]\n", "expands to over"),
    "recursive_alias": ("a: &a [*a]\n", "deeper than"),
    "deep_flow_lists": ("r: " + "[" * 5000 + "]" * 5000 + "\n", "deeper than"),
    "deep_block_maps": ("".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n",
                        "deeper than"),
    "too_big": ("# " + "x" * (MAX_YAML_BYTES + 10) + "\nr: 8\n", "characters; at most"),
    "python_object_tag": ("r: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    "python_name_tag": ("r: !!python/name:os.system\n", "invalid YAML"),
    "unknown_tag": ("r: !custom 8\n", "invalid YAML"),
    "tab_indent": ("model_name_or_path: x\n\tr: 8\n", "invalid YAML"),
    "unclosed_flow": ("target_modules: [q_proj, v_proj\n", "invalid YAML"),
    "unclosed_quote": ('dataset_name: "abc\n', "invalid YAML"),
    "two_documents": ("r: 8\n---\nr: 9\n", "invalid YAML"),
    "undefined_alias": ("r: *nothing\n", "invalid YAML"),
    "top_level_list": ("- r\n- 8\n", "expected a mapping"),
    "top_level_scalar": ("just text\n", "expected a mapping"),
    "duplicate_key": ("r: 8\nr: 16\n", "set twice"),
    "nul_character": ("r: 8\nlora_alpha: 1\x006\n", "invalid YAML (line 2): the character U+0000"),
}


@pytest.mark.parametrize("name", sorted(YAML_CASES))
def test_hostile_yaml_fails_with_exit_2_and_a_message(name, tmp_path, capsys):
    text, needle = YAML_CASES[name]
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["train", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert needle in err and str(path) in err
    assert "Traceback" not in err
    assert len(err) < 5000  # the message never echoes the expansion


ENCODINGS = {
    "latin1": "r: 8\nmodel_name_or_path: caf\xe9\n".encode("latin-1"),
    "utf16_bom": "r: 8\n".encode("utf-16"),
    "lone_continuation": b"r: 8\nx: \x80\x80\n",
    "truncated_utf8": b"r: 8\nx: \xe2\x82\n",
    "overlong_encoding": b"r: \xc0\xaf\n",
    "cp1252_quotes": b"dataset_name: \x93abc\x94\n",
}


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_yaml_in_another_encoding_is_named(name, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_bytes(ENCODINGS[name])
    assert main(["train", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "not a UTF-8 text file" in err or "invalid YAML" in err, err
    assert str(path) in err


def test_yaml_anchors_within_bounds_still_work(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("t: &t [q_proj, v_proj]\ntarget_modules: *t\nr: 8\n")
    assert read_yaml(path)["target_modules"] == ["q_proj", "v_proj"]


def test_a_bounded_reader_reads_train_config_yaml_beside_an_adapter(tmp_path):
    from loratune.tools.load_trained import read_train_config

    (tmp_path / "train_config.yaml").write_text(laughs("load_in_4bit"))
    with pytest.raises(ConfigError, match="expands to over"):
        read_train_config(str(tmp_path))


def test_a_control_character_in_train_config_yaml_beside_an_adapter_names_its_line(tmp_path):
    from loratune.tools.load_trained import read_train_config

    (tmp_path / "train_config.yaml").write_text("r: 8\nload_in_4bit: tr\x07ue\n")
    with pytest.raises(ConfigError, match=r"line 2\): the character U\+0007"):
        read_train_config(str(tmp_path))


# ----- saves killed mid-write ---------------------------------------------------------------------

LEFTOVERS = [".checkpoint-2.tmp-abc123", "..checkpoint-2.tmp-abc123.tmp-def456",
             "...checkpoint-10.tmp-a.tmp-b.tmp-c", ".train_config.yaml.tmp-x1y2z3", ".metrics.jsonl.tmp-r2d2",
             ".adapter_model.safetensors.tmp-q9", ".adapter_config.json.tmp-zz"]
KEPT = ["checkpoint-2", "notes.txt", ".checkpoint-2", "checkpoint-2.tmp-abc", ".checkpoint-x.tmp-1",
        ".mydata.tmp-1"]


@pytest.mark.parametrize("name", LEFTOVERS)
def test_leftovers_of_a_killed_save_are_removed_on_the_next_run(name, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if "checkpoint" in name else (out / name).write_text("partial")
    for keep in KEPT:
        (out / keep).mkdir()
    ckpt.remove_incomplete(str(out))
    assert sorted(os.listdir(out)) == sorted(KEPT)


def test_the_final_saves_temp_sibling_is_removed_and_others_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / ".run.tmp-k3j4").mkdir()
    (tmp_path / ".other.tmp-k3j4").mkdir()
    ckpt.remove_incomplete(str(out))
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-k3j4", "run"]


def test_a_nested_temp_name_is_what_a_checkpoint_save_makes(tmp_path, monkeypatch):
    seen = []

    def write_adapter(tmp):  # what model.save_pretrained does: its own atomic directory inside
        with atomic_directory(tmp) as inner:
            seen.append(os.path.basename(inner))
            raise KeyboardInterrupt  # the process dies here

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(str(tmp_path), 2, write_adapter=write_adapter, state={}, info={"step": 2},
                             config_yaml="", save_total_limit=None)
    assert seen and seen[0].startswith("..checkpoint-2.tmp-") and is_leftover(seen[0], r"checkpoint-\d+")


# ----- a full disk -------------------------------------------------------------------------------


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_during_a_checkpoint_names_the_folder_and_bytes(code, tmp_path, monkeypatch):
    def torch_save(obj, path):
        with open(path, "wb") as fh:
            fh.write(b"x" * 1000)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ckpt.torch, "save", torch_save)
    state = {"trainable": {"w": torch.zeros(256)}, "optimizer": {"m": torch.zeros(256)}}
    with pytest.raises(DiskFullError) as err:
        ckpt.save_checkpoint(str(tmp_path), 3, write_adapter=lambda d: None, state=state, info={"step": 3},
                             config_yaml="", save_total_limit=None)
    message = str(err.value)
    assert str(tmp_path) in message and "checkpoint-3" in message
    assert f"{256 * 4 * 3:,} bytes" in message and "1,000 bytes were written" in message
    assert os.listdir(tmp_path) == []  # nothing partial


def test_a_save_bigger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil as _shutil

    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr(_shutil, "disk_usage", lambda _: usage._replace(free=100))
    with pytest.raises(DiskFullError, match="needs about 5,000 bytes, 100 bytes are free"):
        with atomic_directory(tmp_path / "adapter", size_hint=5000):
            raise AssertionError("must not start writing")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_in_a_single_file_save_is_named(tmp_path):
    with pytest.raises(DiskFullError, match=f"no space left in {tmp_path} to save train_config.yaml"):
        with atomic_file(tmp_path / "train_config.yaml") as fh:
            fh.write("r: 8\n")
            _no_space()
    assert os.listdir(tmp_path) == []


def test_a_full_disk_in_the_final_adapter_save_leaves_nothing(tmp_path, monkeypatch):
    from loratune import adapter_io, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"]))
    monkeypatch.setattr(adapter_io, "save_file", _no_space)
    with pytest.raises(DiskFullError, match="no space left in .* to save out: it needs about"):
        model.save_pretrained(str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


# ----- corrupt checkpoints -----------------------------------------------------------------------

INFO_CASES = {
    "not_json": b"{step: 2",
    "empty": b"",
    "list": b"[2]",
    "string_step": b'{"step": "2"}',
    "no_step": b'{"epoch": 0}',
    "negative_step": b'{"step": -1}',
    "float_step": b'{"step": 2.5}',
    "invalid_utf8": b'{"step": 2, "x": "\xff"}',
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "nan": b'{"step": NaN}',
}


def _two_checkpoints(out, broken: bytes) -> str:
    for step in (1, 2):
        path = out / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / ckpt.STATE_FILE).write_bytes(b"")
        (path / ckpt.INFO_FILE).write_text(f'{{"step": {step}}}')
    (out / "checkpoint-2" / ckpt.INFO_FILE).write_bytes(broken)
    return str(out / "checkpoint-2")


@pytest.mark.parametrize("name", sorted(INFO_CASES))
def test_a_corrupt_trainer_state_names_the_file_and_the_previous_checkpoint(name, tmp_path):
    path = _two_checkpoints(tmp_path, INFO_CASES[name])
    with pytest.raises(LoratuneError) as err:
        ckpt.resolve_resume(True, str(tmp_path))
    message = str(err.value)
    assert os.path.join(path, ckpt.INFO_FILE) in message
    assert f"--resume_from_checkpoint {tmp_path / 'checkpoint-1'}" in message


def test_resuming_from_a_corrupt_trainer_state_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    path = _two_checkpoints(out, b"not json")
    assert main(["train", "--model_name_or_path", "preset:tiny-llama", "--train_file", "x.jsonl",
                 "--output_dir", str(out), "--resume_from_checkpoint", path]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "trainer_state.json: it is corrupt" in err and "checkpoint-1" in err


# ----- ranks that cannot fit ---------------------------------------------------------------------


def _little_memory(monkeypatch, free: int) -> None:
    from loratune import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": free)


@pytest.mark.parametrize("r", [100_000, 10**6, 2**31])
def test_a_huge_rank_is_refused_before_allocating_with_the_figure(r, monkeypatch):
    _little_memory(monkeypatch, 1 << 28)
    base = tiny_model()
    config = LoraConfig(r=r, target_modules=["q_proj", "v_proj"])
    with pytest.raises(InsufficientMemoryError) as err:
        check_adapter_memory(base, config, "cpu")
    fans = sum(m.in_features + m.out_features for n, m in base.named_modules()
               if n.endswith(("q_proj", "v_proj")))
    needed = r * fans * 16  # A and B: r * (in + out) each layer; 16 bytes: weights, grads, 2 AdamW moments
    assert f"{needed:,} bytes" in str(err.value) and f"r={r}" in str(err.value)
    assert "256.0 MiB is available" in str(err.value)


def test_the_library_refuses_an_adapter_that_cannot_fit_before_injecting(monkeypatch):
    from loratune import get_peft_model

    _little_memory(monkeypatch, 1 << 20)
    base = tiny_model()
    before = {n for n, _ in base.named_modules()}
    with pytest.raises(InsufficientMemoryError, match="lower r"):
        get_peft_model(base, LoraConfig(r=100_000, target_modules=["q_proj"]))
    assert {n for n, _ in base.named_modules()} == before


def test_train_cli_refuses_r_100000_with_exit_2(tmp_path, monkeypatch, capsys):
    from test_cli_train import base_flags, make_model_dir, rows_for, write_rows

    _little_memory(monkeypatch, 1 << 28)
    model_dir = make_model_dir(tmp_path / "m")
    data = write_rows(tmp_path / "train.jsonl", rows_for("text", 4))
    flags = base_flags(model_dir, data, tmp_path / "out") + ["--r", "100000", "--max_steps", "1"]
    assert main(["train", *flags]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "training r=100000" in err and "bytes), but only 256.0 MiB is available" in err


OOMS = {
    "memory_error": MemoryError(),
    "cpu_allocator": RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough "
                                  "memory: you tried to allocate 1099511627776 bytes."),
    "cuda": RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    "mmap": RuntimeError("unable to mmap 4096 bytes: Cannot allocate memory (can't allocate memory)"),
}


@pytest.mark.parametrize("name", sorted(OOMS))
def test_out_of_memory_during_training_is_explained(name):
    from loratune.train.config import build_config

    cfg = build_config({"model_name_or_path": "x", "train_file": "x.jsonl", "r": 64})
    with pytest.raises(InsufficientMemoryError, match="training ran out of memory .*with r=64.*gradient_"):
        with out_of_memory_explained(cfg):
            raise OOMS[name]


def test_other_runtime_errors_are_not_called_out_of_memory():
    from loratune.train.config import build_config

    cfg = build_config({"model_name_or_path": "x", "train_file": "x.jsonl"})
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with out_of_memory_explained(cfg):
            raise RuntimeError("shape mismatch")


def test_safe_dump_of_a_config_is_what_the_bounded_reader_reads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"r": 8, "target_modules": ["q_proj"] * 100}))
    assert read_yaml(path)["target_modules"] == ["q_proj"] * 100


# ----- hostile data files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from loratune.tools.loading import load_tokenizer

    return load_tokenizer("preset:tiny-llama")


def _build(tok, path, **kw):
    return build_datasets(DataConfig(train_file=str(path), **kw), tok)


GOOD_ROW = {"prompt": "Capital of Peru?", "completion": "Lima."}


@pytest.mark.parametrize("name, text, where", [
    ("deep.jsonl", json.dumps(GOOD_ROW) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n", "deep.jsonl line 2"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json"),
])
def test_json_nested_too_deeply_is_a_bad_row_not_a_crash(name, text, where, tok, tmp_path):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=f"{where}: invalid JSON \\(nested too deeply"):
        _build(tok, tmp_path / name)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_unicode_line_separators_inside_jsonl_strings_are_text(separator, tok, tmp_path):
    rows = [{"prompt": f"one{separator}two", "completion": "three"}, GOOD_ROW]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert _build(tok, path).stats.examples == 2


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_a_bad_jsonl_line_is_named_by_its_line_whatever_the_line_endings(newline, tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(newline.join([json.dumps(GOOD_ROW), "", "[1, 2]", json.dumps(GOOD_ROW)]).encode())
    with pytest.raises(DataError, match="train.jsonl line 3: expected a JSON object, got list"):
        _build(tok, path)


@pytest.mark.parametrize("row, field", [
    ({"text": "caf\ud800e"}, "field 'text'"),
    ({"prompt": "hi", "completion": "\udfff"}, "field 'completion'"),
    ({"instruction": "hi", "input": "x\ud83d", "output": "y"}, "field 'input'"),
    ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "y"}]},
     "messages\\[0\\].content"),
])
def test_a_lone_surrogate_escape_is_a_bad_row_named_by_line_and_field(row, field, tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n" + json.dumps(row) + "\n")  # json.dumps writes the escape "\\ud800"
    with pytest.raises(DataError, match=f"train.jsonl line 2: {field} holds a lone surrogate"):
        _build(tok, path)


def test_invalid_utf8_in_a_csv_names_its_line(tok, tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"prompt,completion\nhi,there\nhi,caf\xe9\n")
    with pytest.raises(DataError, match="train.csv line 3: not valid UTF-8"):
        _build(tok, path)


def test_a_csv_field_longer_than_the_csv_modules_default_limit_is_read(tok, tmp_path):
    import csv

    limit = csv.field_size_limit()
    good = "".join(f"q{i},a{i}\n" for i in range(10))
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\n" + good + "q," + "x y " * 50_000 + "\n" + good)
    bundle = _build(tok, path)
    assert "train.csv line 12" in bundle.wheres and bundle.wheres[-1] == "train.csv line 22"
    assert csv.field_size_limit() == limit  # the process-wide setting is put back


def test_skip_bad_rows_keeps_every_csv_row_after_an_unreadable_one(tok, tmp_path, caplog, monkeypatch):
    import csv

    monkeypatch.setattr(csv, "field_size_limit", lambda *new: 131_072)  # keep the module's default limit
    good = "".join(f"q{i},a{i}\n" for i in range(10))
    path = tmp_path / "train.csv"
    path.write_text('prompt,completion\n"two\nlines",a\n' + good + "q," + "x" * 200_000 + "\n" + good)
    bundle = _build(tok, path, skip_bad_rows=True)
    assert (bundle.stats.examples, bundle.stats.skipped) == (21, 1)
    assert bundle.wheres[-1] == "train.csv line 24"
    assert "train.csv line 14: unreadable CSV (field larger than field limit" in caplog.text


@pytest.mark.parametrize("row", [{"input_ids": [5]}, {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}])
def test_rows_with_nothing_to_train_are_not_blamed_on_max_seq_length(row, tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        _build(tok, path)
    assert "had no token to train on, e.g. train.jsonl line 1" in str(err.value)
    assert "max_seq_length" not in str(err.value)


# ----- hostile output_dir ------------------------------------------------------------------------


def test_an_output_dir_that_cannot_be_written_exits_2_before_anything_loads(tmp_path, monkeypatch, capsys):
    import tempfile

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    out = tmp_path / "new" / "out"
    assert main(["train", "--model_name_or_path", "/nonexistent", "--train_file", "x.jsonl",
                 "--output_dir", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"output_dir '{out}' cannot be written: '{tmp_path}'" in err and "Read-only file system" in err


# ----- training states that load but are not whole -----------------------------------------------


def _state(**changes):
    state = {"scheduler": {"last_epoch": 2}, "rng": [{}],
             "position": {"step": 2, "epoch": 0, "batch_index": 2}, "world_size": 1,
             "micro_batches_per_step": 1, "trainable": {}, "optimizer": {},
             "log_window": {"losses": [], "tokens": 0, "elapsed_s": 0.0}}
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


STATES = {
    "list": ([1, 2], "a list, not a dict"),
    "no_scheduler": (_state(scheduler=None), "no 'scheduler'"),
    "no_rng": (_state(rng=None), "no 'rng'"),
    "no_position": (_state(position=None), "no 'position'"),
    "no_world_size": (_state(world_size=None), "no 'world_size'"),
    "no_optimizer": (_state(optimizer=None), "'trainable' weights without an 'optimizer' state"),
    "no_trainable": (_state(trainable=None), "an 'optimizer' state without 'trainable' weights"),
    "position_extra_key": (_state(position={"step": 1, "epoch": 0, "batch_index": 0, "x": 1}),
                           "'position' is not a mapping of batch_index, epoch, step"),
    "position_float": (_state(position={"step": 1.5, "epoch": 0, "batch_index": 0}),
                       "'position' needs integer"),
    "log_window_extra_key": (_state(log_window={"x": 1}), "'log_window' is not a mapping"),
    "scheduler_list": (_state(scheduler=[1]), "'scheduler' is not a mapping"),
    "rng_empty": (_state(rng=[]), "'rng' a non-empty list"),
}


@pytest.mark.parametrize("name", sorted(STATES))
def test_a_training_state_that_is_not_whole_names_the_file_and_the_previous_checkpoint(name, tmp_path):
    state, needle = STATES[name]
    path = _two_checkpoints(tmp_path, b'{"step": 2}')
    torch.save(state, os.path.join(path, ckpt.STATE_FILE))
    with pytest.raises(LoratuneError) as err:
        ckpt.load_training_state(path, validate=resume.state_problems)
    message = str(err.value)
    assert os.path.join(path, ckpt.STATE_FILE) in message and needle in message
    assert f"--resume_from_checkpoint {tmp_path / 'checkpoint-1'}" in message


# ----- resuming a real run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints_run(tmp_path_factory):
    """A 3-step run of the tiny model with checkpoint-1 and checkpoint-2, and the flags that made it."""
    from test_cli_train import base_flags, make_model_dir, rows_for, write_rows

    root = tmp_path_factory.mktemp("resume")
    data = write_rows(root / "train.jsonl", rows_for("text", 8))
    out = root / "run"
    flags = [*base_flags(make_model_dir(root / "m"), data, out), "--max_steps", "3", "--save_steps", "1",
             "--save_total_limit", "5", "--lr_scheduler_type", "constant", "--warmup_ratio", "0"]
    assert main(["train", *flags]) == 0
    return out, flags


def _resume_copy(run, tmp_path):
    import shutil

    out, flags = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy, [f if f != str(out) else str(copy) for f in flags]


def test_resuming_with_a_lower_learning_rate_uses_it(two_checkpoints_run, tmp_path, caplog):
    out, flags = _resume_copy(two_checkpoints_run, tmp_path)
    assert main(["train", *flags, "--learning_rate", "1e-4", "--weight_decay", "0.1",
                 "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [(r["step"], r["learning_rate"]) for r in records if "loss" in r]
    assert rates == [(1, 1e-2), (2, 1e-2), (3, 1e-4)]
    assert ("resuming with learning_rate 0.0001 and weight_decay 0.1 (the checkpoint was trained with 0.01 "
            "and 0)") in caplog.text


def test_an_optimizer_state_that_does_not_fit_exits_2_naming_the_checkpoint(two_checkpoints_run, tmp_path,
                                                                             capsys):
    out, flags = _resume_copy(two_checkpoints_run, tmp_path)
    path = out / "checkpoint-2" / ckpt.STATE_FILE
    state = torch.load(path, weights_only=True)
    state["optimizer"]["param_groups"] *= 2
    torch.save(state, path)
    assert main(["train", *flags, "--resume_from_checkpoint", "true"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'checkpoint-2'}: its optimizer state does not fit" in err
    assert "Traceback" not in err


def test_lines_of_metrics_jsonl_that_are_not_records_do_not_stop_a_resume(two_checkpoints_run, tmp_path):
    out, flags = _resume_copy(two_checkpoints_run, tmp_path)
    with open(out / "metrics.jsonl", "ab") as fh:
        fh.write(b'3\n{"step": "2"}\n\xff\xfe\n' + b"[" * 100_000 + b"\n")
    assert main(["train", *flags, "--resume_from_checkpoint", "true"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
