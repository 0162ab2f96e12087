"""Immutable, read-only files named by the sha256 of their bytes.

Write protocol (git's and OCI's, plus fsync): stream into ``tmp/`` while hashing, fsync,
``chmod 0444``, then ``link()`` into ``<dir>/<2 hex>/<62 hex>``. An existing file of that name
*is* that content, so ``EEXIST`` means "already stored" and nothing is overwritten; the existing
file's mtime is refreshed so a concurrent gc within its grace period keeps it.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from adapterkit.errors import IntegrityError, ReferenceNotFoundError
from adapterkit.store.fsutil import fsync_dir, open_temp, remove_quietly, write_all

__all__ = ["ObjectDir", "Stored", "hash_file"]

_CHUNK = 1 << 20
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Stored:
    digest: str
    size: int
    #: False when the store already held these bytes (nothing new was written).
    created: bool


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return "sha256:" + hasher.hexdigest(), size


class _Writer(threading.Thread):
    """Writes chunks in a second thread so that hashing and copying overlap (both release the GIL)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            if self.error is None:
                try:
                    write_all(self.fd, chunk)
                except BaseException as exc:  # reported to the caller after join()
                    self.error = exc


class ObjectDir:
    """One content-addressed directory (``blobs/sha256`` or ``manifests/sha256``)."""

    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.root = root
        self.tmp_dir = tmp_dir

    def path(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return self.root / hexdigest[:2] / hexdigest[2:]

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def __iter__(self) -> Iterator[tuple[str, Path]]:
        """Every stored object as (digest, path), including any whose name is not a digest."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir():
                yield "", sub
                continue
            for entry in sorted(sub.iterdir()):
                yield f"sha256:{sub.name}{entry.name}", entry

    def put(self, chunks: Iterable[bytes], progress: Progress | None = None) -> Stored:
        """Store the concatenation of ``chunks``."""
        hasher = hashlib.sha256()
        size = 0
        with open_temp(self.tmp_dir, "blob") as (fd, tmp):
            writer = _Writer(fd)
            writer.start()
            try:
                for chunk in chunks:
                    writer.chunks.put(chunk)
                    hasher.update(chunk)
                    size += len(chunk)
                    if progress:
                        progress(len(chunk))
            finally:
                writer.chunks.put(None)
                writer.join()
            if writer.error is not None:
                raise writer.error
            os.fsync(fd)
            os.close(fd)
            digest = "sha256:" + hasher.hexdigest()
            created = self._publish(tmp, digest, size)
        return Stored(digest, size, created)

    def put_bytes(self, data: bytes) -> Stored:
        return self.put([data])

    def _publish(self, tmp: Path, digest: str, size: int) -> bool:
        final = self.path(digest)
        if self._reuse(final, size):
            remove_quietly(tmp)
            return False
        os.chmod(tmp, 0o444)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(tmp, final)
        except FileExistsError:
            remove_quietly(tmp)
            if self._reuse(final, size):
                return False
            raise
        except OSError:  # filesystems without hard links
            os.replace(tmp, final)
        else:
            os.unlink(tmp)
        fsync_dir(final.parent)
        return True

    def _reuse(self, final: Path, size: int) -> bool:
        """True when ``final`` already holds these bytes; a wrong-sized one is moved aside first."""
        try:
            existing = final.stat().st_size
        except FileNotFoundError:
            return False
        if existing != size:
            self.quarantine(final)
            return False
        os.utime(final)  # freshen: a gc that runs now keeps it for its grace period
        return True

    def quarantine(self, path: Path) -> Path:
        """Move a damaged object under ``corrupt/`` rather than deleting what may be the only copy."""
        corrupt = self.root.parent.parent / "corrupt"
        corrupt.mkdir(parents=True, exist_ok=True)
        target = corrupt / f"{self.root.parent.name}-{path.parent.name}{path.name}-{os.getpid()}-{os.urandom(4).hex()}"
        os.replace(path, target)
        return target

    def read(self, digest: str, size: int | None = None, *, what: str = "object") -> bytes:
        """The bytes of ``digest``, checked against their size and hash before they are used."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ReferenceNotFoundError(
                f"{what} {digest} is missing from the store (run `adapterkit verify`)"
            ) from None
        if size is not None and len(data) != size:
            raise IntegrityError(f"{what} {digest} is {len(data)} bytes, expected {size} (run `adapterkit verify`)")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"{what} {digest} does not match its digest (run `adapterkit verify`)")
        return data
