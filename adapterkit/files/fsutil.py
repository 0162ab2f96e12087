"""Crash-safe file primitives: temp file, fsync, publish by link or rename, fsync the directory.

A reader must only ever see either nothing or the complete object, whenever the writer dies,
so nothing is written in place: every object starts in the store's ``tmp/`` (same filesystem)
and appears under its final name in one atomic step.

Every byte the store writes goes through :func:`write_all` (and so through this module's
``os.write``), which gives tests a single place to inject a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "TempFile",
    "ensure_dir",
    "fsync_dir",
    "fsync_file",
    "open_temp",
    "remove_quietly",
    "replace_atomic",
    "temp_name",
    "write_all",
]


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


def fsync_file(path: Path) -> None:
    """Make a file's written bytes durable (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create ``path`` and any missing parents, fsyncing each new directory's parent.

    A link published into a directory that itself never reached the disk would vanish with it
    after a power cut, so each directory created on the way is made durable in its parent.
    """
    if path.is_dir():
        return
    missing = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent writer made it first
            os.mkdir(directory)
        fsync_dir(directory.parent)


def remove_quietly(path: Path) -> None:
    """Unlink ``path`` if it exists.

    No ``chmod`` first: POSIX needs only the directory's write permission to unlink a
    read-only file, and a temp file may share its inode with a published object (hard link),
    whose mode must stay read-only.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class TempFile:
    """An exclusive new file in ``tmp/``; :meth:`close` is idempotent so cleanup never closes a reused fd."""

    def __init__(self, tmp_dir: Path, suffix: str) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.path = temp_name(tmp_dir, suffix)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.closed = False

    def write(self, data: bytes | memoryview) -> None:
        write_all(self.fd, data)

    def sync_and_close(self) -> None:
        """fsync, then close: the bytes are on disk before the file gets a name anyone reads."""
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


@contextlib.contextmanager
def open_temp(tmp_dir: Path, suffix: str) -> Iterator[TempFile]:
    """An exclusive new temp file; closed and removed again if the block raises."""
    temp = TempFile(tmp_dir, suffix)
    try:
        yield temp
    except BaseException:
        with contextlib.suppress(OSError):
            temp.close()
        remove_quietly(temp.path)
        raise


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written (a write to a regular file may be short)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def replace_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    with open_temp(tmp_dir, "write") as temp:
        temp.write(data)
        temp.sync_and_close()
        ensure_dir(path.parent)
        os.replace(temp.path, path)
    fsync_dir(path.parent)
