"""Checkpoints: `output_dir/checkpoint-<step>/`, written atomically, the newest K kept.

A checkpoint holds the adapter in PEFT format (so any checkpoint can be loaded or served as is),
`training_state.pt` (trainable weights, optimizer, scheduler, RNG states of every rank, data
position), `trainer_state.json` (the same position, human-readable) and `train_config.yaml`.
A sharded run (fsdp) keeps the trainable weights and the optimizer in `distributed/` instead,
written by every rank with torch.distributed.checkpoint, so it resumes with any number of processes.
It is assembled in a hidden temp directory and renamed into place, so a directory named
`checkpoint-<step>` is always complete; a crash mid-write leaves only a temp directory, which
resume ignores and the next run deletes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from loratune.adapter_files import CONFIG_NAME
from loratune.atomic import TEMP_MARK, atomic_directory, remove_leftovers
from loratune.errors import ConfigError, LoratuneError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "training_state.pt"
INFO_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.yaml"
SHARDED_DIR = "distributed"  # torch.distributed.checkpoint files of a sharded (fsdp) run
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def rng_state() -> dict[str, Any]:
    """Capture the python, numpy and torch (CPU and CUDA) generators of this process."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by `rng_state`."""
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    # random.setstate needs tuples; a weights_only round trip may hand back lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    output_dir: str,
    step: int,
    *,
    write_adapter: Callable[[str], None],
    state: dict[str, Any],
    info: dict[str, Any],
    config_yaml: str,
    save_total_limit: int | None,
) -> str:
    """Write checkpoint-<step>/ atomically, then delete the oldest beyond `save_total_limit`.

    `write_adapter(dir)` saves the adapter in PEFT format into `dir`. Returns the final path.
    """
    final = checkpoint_path(output_dir, step)
    # the adapter's tensors are also in state["trainable"]: twice those, plus the optimizer and the rest
    size = tensor_bytes(state) + tensor_bytes(state.get("trainable", {}))
    # built in a hidden ".checkpoint-<step>.tmp-*" sibling, renamed when complete
    with atomic_directory(final, size_hint=size) as tmp:
        write_files(tmp, write_adapter=write_adapter, state=state, info=info, config_yaml=config_yaml)
    rotate_checkpoints(output_dir, save_total_limit)
    logger.info("saved %s", final)
    return final


def save_sharded_checkpoint(
    output_dir: str,
    step: int,
    *,
    write_shards: Callable[[str], None],
    share: Callable[[str | None], str],
    is_main: bool,
    size_hint: int,
    save_total_limit: int | None,
    **files: Any,
) -> str:
    """`save_checkpoint` for a run whose weights and optimizer are spread over processes; every rank calls it.

    The main rank makes the temp directory and `share` hands its path to every rank; each writes its
    shards with `write_shards(dir / SHARDED_DIR)` (a collective); then the main rank writes the
    `files` (`save_checkpoint`'s write_adapter, state, info, config_yaml) and renames the directory
    into place. Needs a file system every rank sees at the same path.
    """
    final = checkpoint_path(output_dir, step)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_directory(final, size_hint=size_hint)) if is_main else None
        tmp = share(tmp)
        write_shards(os.path.join(tmp, SHARDED_DIR))
        if is_main:
            write_files(tmp, **files)
    if is_main:
        rotate_checkpoints(output_dir, save_total_limit)
        logger.info("saved %s", final)
    return final


def checkpoint_path(output_dir: str, step: int) -> str:
    """Where the checkpoint of `step` goes."""
    return os.path.join(output_dir, f"{PREFIX}{step}")


def write_files(directory: str, *, write_adapter: Callable[[str], None], state: dict[str, Any],
                info: dict[str, Any], config_yaml: str) -> None:
    """Write the adapter, training_state.pt, trainer_state.json and train_config.yaml into `directory`."""
    write_adapter(directory)
    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, INFO_FILE), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as fh:
        fh.write(config_yaml)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Return [(step, path)] of complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        path = os.path.join(output_dir, name)
        complete = all(os.path.isfile(os.path.join(path, f)) for f in (STATE_FILE, INFO_FILE))
        if match and complete:
            found.append((int(match.group(1)), path))
    return sorted(found)


def rotate_checkpoints(output_dir: str, limit: int | None) -> None:
    """Delete the oldest checkpoints so that at most `limit` remain."""
    if limit is None:
        return
    for _, path in list_checkpoints(output_dir)[:-limit]:
        delete_checkpoint(path)
        logger.debug("deleted old checkpoint %s", path)


def delete_checkpoint(path: str) -> None:
    """Delete a checkpoint so that no half-deleted `checkpoint-<step>` can remain: it is renamed to a
    temp name first (which `remove_incomplete` clears if the process dies mid-delete)."""
    parent, name = os.path.split(os.path.abspath(path))
    doomed = os.path.join(parent, f".{name}{TEMP_MARK}deleted")
    shutil.rmtree(doomed, ignore_errors=True)  # what an earlier delete that died left
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path  # e.g. a file system that refuses the rename: delete it where it is
    shutil.rmtree(doomed, ignore_errors=True)


# What a killed run can leave in output_dir: temp copies of checkpoints (nested ones too, from the
# adapter save inside a checkpoint's temp folder), of the files written at the end, and of
# metrics.jsonl (rewritten when a run resumes).
_LEFTOVERS = (rf"{PREFIX}\d+|{re.escape(CONFIG_FILE)}|adapter_model\.safetensors|adapter_config\.json"
              r"|README\.md|metrics\.jsonl")


def remove_incomplete(output_dir: str) -> None:
    """Delete temp folders and files left by a run that died while writing (e.g. SIGKILL)."""
    for name in remove_leftovers(output_dir, _LEFTOVERS):
        logger.info("removed incomplete save %s", name)
    parent, base = os.path.split(os.path.abspath(output_dir))
    for name in remove_leftovers(parent, re.escape(base)):  # the final save's temp sibling
        logger.info("removed incomplete save %s", os.path.join(parent, name))


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def read_info(path: str) -> dict[str, Any]:
    """Read a checkpoint's trainer_state.json (a JSON object with an integer "step").

    Raises:
        LoratuneError: the file is not such JSON; names it and the previous good checkpoint.
    """
    file = os.path.join(path, INFO_FILE)
    try:
        with open(file, encoding="utf-8") as fh:
            info = json.load(fh)
        if not isinstance(info, dict) or not isinstance(info.get("step"), int) or info["step"] < 0:
            raise ValueError('not a JSON object with an integer "step"')
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise LoratuneError(f"cannot read {file}: it is corrupt ({_first_line(exc)}); "
                            f"{_older_hint(path)}") from None
    return info


def remove_stale(output_dir: str) -> None:
    """Delete checkpoints of an earlier run before a fresh (not resumed) run writes its own.

    Left in place they would mix with the new run's: rotation keeps the highest steps, and a later
    `resume_from_checkpoint: true` would pick the old run's newest checkpoint.
    """
    old = list_checkpoints(output_dir)
    if old:
        logger.warning("fresh run in %s: removing %d checkpoint(s) of an earlier run (%s); to continue "
                       "that run instead, pass --resume_from_checkpoint true", output_dir, len(old),
                       ", ".join(os.path.basename(p) for _, p in old))
    for _, path in old:
        delete_checkpoint(path)
    if os.path.exists(os.path.join(output_dir, CONFIG_NAME)):
        logger.warning("fresh run in %s: the adapter there is an earlier run's, and stays until this run "
                       "writes its own at the end (an interrupted run leaves it beside this run's "
                       "train_config.yaml and metrics.jsonl)", output_dir)


def remove_newer(output_dir: str, resume_path: str) -> None:
    """Delete the checkpoints in `output_dir` of later steps than the one a run resumes from.

    They belong to the run it went back from (e.g. one that diverged): left in place, a later
    `resume_from_checkpoint: true` would pick the newest of them, and rotation would keep them over
    the resumed run's own. The resumed run writes its own at those steps.
    """
    step = read_info(resume_path)["step"]
    newer = [(s, path) for s, path in list_checkpoints(output_dir)
             if s > step and os.path.abspath(path) != os.path.abspath(resume_path)]
    if newer:
        names = ", ".join(os.path.basename(p) for _, p in newer)
        logger.warning("resuming from step %d in %s: removing %d later checkpoint(s) of the run it goes back "
                       "from (%s)", step, output_dir, len(newer), names)
    for _, path in newer:
        delete_checkpoint(path)


def resolve_resume(resume: bool | str, output_dir: str) -> str | None:
    """Turn `resume_from_checkpoint` (true / false / a path) into a checkpoint path or None.

    Raises:
        ConfigError: a path that is not a complete checkpoint.
    """
    if resume is False:
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("resume_from_checkpoint: no checkpoint in %s; starting from scratch", output_dir)
            return None
        read_info(found[-1][1])
        return found[-1][1]
    path = os.fspath(resume)
    if not (os.path.isfile(os.path.join(path, STATE_FILE)) and os.path.isfile(os.path.join(path, INFO_FILE))):
        raise ConfigError(
            f"resume_from_checkpoint: {path!r} is not a complete checkpoint "
            f"(needs {STATE_FILE} and {INFO_FILE})"
        )
    read_info(path)  # fail now, not after the model has loaded
    return path


def load_training_state(path: str, *,
                        validate: Callable[[dict], list[str]] | None = None) -> dict[str, Any]:
    """Load `training_state.pt` from a checkpoint directory (tensors and plain containers only).

    `validate(state)` returns what the loaded dict lacks; any problem it names is raised like corruption.

    Raises:
        LoratuneError: the file is truncated, corrupt or not a training state; names the next older
            checkpoint if any.
    """
    file = os.path.join(path, STATE_FILE)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise LoratuneError(f"cannot read {file}: it is truncated or corrupt ({_first_line(exc)}); "
                            f"{_older_hint(path)}") from None
    problems = [f"a {type(state).__name__}, not a dict"] if not isinstance(state, dict) else (
        validate(state) if validate else [])
    if problems:
        raise LoratuneError(f"cannot resume from {file}: it is not a training state loratune can read "
                            f"({'; '.join(problems)}); {_older_hint(path)}")
    return state


def _older_hint(path: str) -> str:
    """Point at the newest complete checkpoint older than `path`, if the same output_dir holds one."""
    match = _NAME.match(os.path.basename(os.path.normpath(path)))
    parent = os.path.dirname(os.path.normpath(path))
    older = [p for step, p in list_checkpoints(parent) if match and step < int(match.group(1))]
    if older:
        return f"resume from the previous one with --resume_from_checkpoint {older[-1]}"
    return "no older checkpoint is left; start a fresh run (without --resume_from_checkpoint)"


def _first_line(exc: Exception) -> str:
    # torch's messages run on for several sentences; the first one says what failed.
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
