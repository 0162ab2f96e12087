"""Crash-safe file primitives: temp file, fsync, publish by link or rename, fsync the directory.

A reader must only ever see either nothing or the complete object, whenever the writer dies,
so nothing is written in place: every object starts in the store's ``tmp/`` (same filesystem)
and appears under its final name in one atomic step.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["fsync_dir", "open_temp", "remove_quietly", "replace_atomic", "temp_name"]


def temp_name(tmp_dir: Path, suffix: str) -> Path:
    """A fresh temp path; the pid in the name lets gc and verify tell whose it was."""
    return tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.{suffix}"


def fsync_dir(path: Path) -> None:
    """Make a rename or link in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, 0o644)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def open_temp(tmp_dir: Path, suffix: str) -> Iterator[tuple[int, Path]]:
    """An exclusive new temp file; removed again if the block raises."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = temp_name(tmp_dir, suffix)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        yield fd, path
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        remove_quietly(path)
        raise


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def replace_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    with open_temp(tmp_dir, "write") as (fd, tmp):
        write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    fsync_dir(path.parent)
