"""Atomic writes: a directory (or file) appears complete or not at all.

Everything loratune saves (adapters, checkpoints, merged models, configs) goes through here.
A new directory is built in a hidden temp sibling and renamed into place; when the target
directory already exists (e.g. a training output_dir holding metrics), each file is moved in
with `os.replace`, which is atomic per file, and unrelated files are left alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temp directory to fill; on success its files land in `target`, else nothing does."""
    target = os.path.abspath(os.fspath(target))
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like mkdir's
    try:
        yield tmp
        _fsync_tree(tmp)
        if not os.path.exists(target):
            os.rename(tmp, target)
        else:
            _move_contents(tmp, target)
            os.rmdir(tmp)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temp file next to `target`; it replaces `target` only if the block succeeds."""
    target = os.path.abspath(os.fspath(target))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like open()'s
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
