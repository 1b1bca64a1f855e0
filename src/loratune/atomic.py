"""Atomic writes: a directory (or file) appears complete or not at all.

Everything loratune saves (adapters, checkpoints, merged models, configs) goes through here.
A new directory is built in a hidden temp sibling and renamed into place; when the target
directory already exists (e.g. a training output_dir holding metrics), each file is moved in
with `os.replace`, which is atomic per file, and unrelated files are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

from .errors import DiskFullError

TEMP_MARK = ".tmp-"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, size_hint: int | None = None) -> Iterator[str]:
    """Yield a temp directory to fill; on success its files land in `target`, else nothing does.

    `size_hint` (bytes the contents will take, roughly) is checked against the free space first.

    Raises:
        DiskFullError: the disk is (or would be) full; names the folder and the bytes needed.
    """
    target = os.path.abspath(os.fspath(target))
    parent, base = os.path.split(target)
    existing = nearest_existing(parent)
    os.makedirs(parent, exist_ok=True)
    try:
        _check_space(parent, size_hint, target)
        tmp = tempfile.mkdtemp(prefix=f".{base}{TEMP_MARK}", dir=parent)
    except BaseException:
        _remove_made_folders(parent, existing)
        raise
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like mkdir's
    try:
        yield tmp
        _usual_permissions(tmp)
        _fsync_tree(tmp)
        if not os.path.exists(target):
            os.rename(tmp, target)
        else:
            _move_contents(tmp, target)
            os.rmdir(tmp)
        _fsync_dir(parent)
    except BaseException as exc:
        written = _tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made_folders(parent, existing)  # nothing was saved: no empty folders either
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE and not isinstance(exc, DiskFullError):
            raise _disk_full(parent, target, max(size_hint or 0, written), written) from None
        raise


def _remove_made_folders(folder: str, existing: str) -> None:
    """Remove `folder` and its parents up to (not including) `existing`, the part that was there
    before, as long as they are empty."""
    while folder != existing and len(folder) > len(existing):
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = os.path.dirname(folder)


def nearest_existing(path: str | os.PathLike) -> str:
    """The deepest part of `path` (absolute) that exists: itself, or the ancestor a save would create
    folders under. Checking that it is a directory refuses a target that is, or runs through, a file
    before anything is written."""
    probe = os.path.abspath(os.fspath(path))
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return probe


def _check_space(parent: str, needed: int | None, target: str) -> None:
    if not needed:
        return
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if needed > free:
        raise _disk_full(parent, target, needed, None, free=free)


def _disk_full(parent: str, target: str, needed: int, written: int | None, *, free: int | None = None):
    if free is None:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(parent).free
    wrote = f"; {written:,} bytes were written before it ran out, and removed" if written else ""
    has = f", {free:,} bytes are free" if free is not None else ""
    need = f"about {needed:,} bytes" if needed else "more than is free"
    err = DiskFullError(f"no space left in {parent} to save {os.path.basename(target)}: it needs {need}"
                        f"{has}{wrote}; nothing was saved. Free some space (or choose another output_dir) "
                        "and run again")
    err.errno = errno.ENOSPC
    return err


def _tree_bytes(root: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


def is_leftover(name: str, base_pattern: str) -> bool:
    """True for a temp name these functions make for `base_pattern` (a regex), nested ones included.

    atomic_directory(".../checkpoint-2") makes ".checkpoint-2.tmp-XXXX"; a save inside it makes
    "..checkpoint-2.tmp-XXXX.tmp-YYYY" beside it. A process killed mid-write leaves either.
    """
    return re.fullmatch(rf"\.+(?:{base_pattern})(?:{re.escape(TEMP_MARK)}[A-Za-z0-9_]+)+", name) is not None


def remove_leftovers(directory: str, base_pattern: str) -> list[str]:
    """Delete what killed writes left in `directory` for names matching `base_pattern`; return them."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        if is_leftover(name, base_pattern):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            removed.append(name)
    return removed


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temp file next to `target`; it replaces `target` only if the block succeeds."""
    target = os.path.abspath(os.fspath(target))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}{TEMP_MARK}", dir=os.path.dirname(target))
    os.close(fd)
    os.chmod(tmp, file_mode())  # mkstemp makes 0600; the result should look like open()'s
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE and not isinstance(exc, DiskFullError):
            parent = os.path.dirname(target)
            raise _disk_full(parent, target, 0, None) from None
        raise


def _usual_permissions(root: str) -> None:
    """Give every file under `root` the mode open() gives under the umask (`file_mode`).

    safetensors writes its files 0600, so an adapter or merged model saved by one user could not be
    read by a server or llama.cpp running as another, unlike every other file we write.
    """
    mode = file_mode()
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and os.stat(path).st_mode & 0o777 != mode:
                os.chmod(path, mode)


def file_mode() -> int:
    """The permissions open() gives a new file under the process's umask (0644 under 022)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_contents(src: str, dst: str) -> None:
    for entry in sorted(os.listdir(src)):
        s, d = os.path.join(src, entry), os.path.join(dst, entry)
        if os.path.isdir(s) and os.path.isdir(d):
            _move_contents(s, d)
            os.rmdir(s)
        else:
            if os.path.isdir(d):
                shutil.rmtree(d)
            os.replace(s, d)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
