"""Refs (``name:tag`` -> digest) with compare-and-swap updates and a reflog.

A ref is one small file, ``refs/<name>/_tags/<tag>``, holding ``sha256:<hex>``. (``_tags`` cannot
be a name component, so ``a:b`` and ``a/b:c`` never collide.) Updates take the ref's lock, compare
the current value with the expected one, and replace the file atomically; each change is
appended to ``logs/<same path>`` so gc can keep recently unreferenced adapters alive and a
user can see what a tag pointed at before.

The reflog line is written (and fsynced) *before* the ref file changes, as git does: a process
killed in between leaves a log entry for a change that did not happen, which is harmless (it only
keeps an object alive one grace period longer), instead of a ref change with no log entry, which
would let gc drop the adapter the ref pointed at before without its grace period.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from adapterkit.errors import RefConflictError, ReferenceNotFoundError, StoreError
from adapterkit.files.fsutil import fsync_dir, replace_atomic, write_all
from adapterkit.store.locks import file_lock
from adapterkit.store.names import DIGEST_RE, NAME_RE, TAG_RE

__all__ = ["ANY", "RefStore", "ReflogEntry"]

TAGS_DIR = "_tags"


class _Any:
    def __repr__(self) -> str:
        return "ANY"


#: ``expected`` value that accepts whatever the ref holds now.
ANY = _Any()


@dataclass(frozen=True)
class ReflogEntry:
    old: str | None
    new: str | None
    time: float
    message: str


class RefStore:
    def __init__(self, root: Path, tmp_dir: Path, lock_timeout: float = 60.0) -> None:
        self.refs = root / "refs"
        self.logs = root / "logs"
        self.locks = root / "locks"
        self.tmp_dir = tmp_dir
        self.lock_timeout = lock_timeout

    def _rel(self, name: str, tag: str) -> Path:
        return Path(name) / TAGS_DIR / tag

    def path(self, name: str, tag: str) -> Path:
        return self.refs / self._rel(name, tag)

    def read(self, name: str, tag: str) -> str | None:
        """The digest ``name:tag`` points at, None when there is no such ref."""
        path = self.path(name, tag)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory where the file should be, no permission, ...
            raise StoreError(f"ref {name}:{tag} is unreadable ({path}: {exc.strerror or exc})") from None
        text = raw.decode("ascii", "replace").strip()
        if not DIGEST_RE.fullmatch(text):
            raise StoreError(f"ref {name}:{tag} is corrupt ({path} does not hold a sha256 digest)")
        return text

    def _lock(self, name: str, tag: str) -> AbstractContextManager[None]:
        digest_lock = sha256(f"{name}:{tag}".encode()).hexdigest()[:32]
        return file_lock(self.locks / "refs" / f"{digest_lock}.lock", timeout=self.lock_timeout, what=f"{name}:{tag}")

    def update(self, name: str, tag: str, new: str | None, *, expected: object = ANY, message: str = "") -> str | None:
        """Point ``name:tag`` at ``new`` (None deletes it) if it still holds ``expected``; returns the old value."""
        with self._lock(name, tag):
            try:
                old = self.read(name, tag)
            except StoreError:
                old = None  # a corrupt ref may be overwritten, never silently read
                if expected is not ANY:
                    raise
            if expected is not ANY and old != expected:
                raise RefConflictError(f"ref {name}:{tag} moved to {old} while this command ran (expected {expected})")
            if old != new:
                self._write(name, tag, old, new, message)
        return old

    def delete(self, name: str, tag: str, *, message: str = "") -> str:
        """Remove ``name:tag`` whatever it points at (read and removed under its lock); returns that digest."""
        with self._lock(name, tag):
            old = self.read(name, tag)
            if old is None:
                raise ReferenceNotFoundError(f"no ref {name}:{tag}")
            self._write(name, tag, old, None, message)
        return old

    def _write(self, name: str, tag: str, old: str | None, new: str | None, message: str) -> None:
        """Log, then change the ref file (the caller holds the ref's lock)."""
        self._log(name, tag, old, new, message)
        path = self.path(name, tag)
        if new is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fsync_dir(path.parent)
        else:
            replace_atomic(path, f"{new}\n".encode(), self.tmp_dir)

    def _log(self, name: str, tag: str, old: str | None, new: str | None, message: str) -> None:
        log = self.logs / self._rel(name, tag)
        log.parent.mkdir(parents=True, exist_ok=True)
        clean = "".join(ch if ch.isprintable() else " " for ch in message)  # one entry, one line
        line = f"{old or '-'} {new or '-'} {time.time():.6f} {clean}\n".encode()
        fd = os.open(log, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                line = b"\n" + line  # a writer died (or hit a full disk) mid-line: don't glue onto its torn line
            write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def reflog(self, name: str, tag: str) -> list[ReflogEntry]:
        return list(_parse_log(self.logs / self._rel(name, tag)))

    def __iter__(self) -> Iterator[tuple[str, str, Path]]:
        """Every ref file as (name, tag, path), in name and tag order."""
        yield from _walk(self.refs)

    def all_logs(self) -> Iterator[tuple[str, str, list[ReflogEntry]]]:
        for name, tag, path in _walk(self.logs):
            yield name, tag, list(_parse_log(path))


def _walk(top: Path) -> Iterator[tuple[str, str, Path]]:
    if not top.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        here = Path(dirpath)
        if here.name != TAGS_DIR:
            continue
        name = here.parent.relative_to(top).as_posix()
        for tag in sorted(filenames):
            if NAME_RE.fullmatch(name) and TAG_RE.fullmatch(tag):
                yield name, tag, here / tag


def _parse_log(path: Path) -> Iterator[ReflogEntry]:
    try:
        text = path.read_text("utf-8", errors="replace")
    except FileNotFoundError:
        return
    for line in text.split("\n"):
        parts = line.split(" ", 3)
        if len(parts) < 3:
            continue  # a torn last line from a killed writer
        old, new, stamp = parts[:3]
        try:
            when = float(stamp)
        except ValueError:
            continue
        yield ReflogEntry(
            old=old if DIGEST_RE.fullmatch(old) else None,
            new=new if DIGEST_RE.fullmatch(new) else None,
            time=when,
            message=parts[3] if len(parts) > 3 else "",
        )
