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
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from adapterkit.errors import IntegrityError, ReferenceNotFoundError, StoreError
from adapterkit.files.fsutil import ensure_dir, fsync_dir, open_temp, remove_quietly, write_all

__all__ = ["ObjectDir", "Stored", "hash_file"]

_CHUNK = 1 << 20
_FANOUT_RE = re.compile(r"[0-9a-f]{2}")
_REST_RE = re.compile(r"[0-9a-f]{62}")
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
        """Every entry as (digest, path); the digest is ``""`` for anything not shaped like an object.

        Such strays (a file or directory someone put here) are reported by verify and left
        alone by gc, which only deletes what the store itself could have written.
        """
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if not (_FANOUT_RE.fullmatch(sub.name) and sub.is_dir() and not sub.is_symlink()):
                yield "", sub
                continue
            for entry in sorted(sub.iterdir()):
                if _REST_RE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                    yield f"sha256:{sub.name}{entry.name}", entry
                else:
                    yield "", entry

    def put(self, chunks: Iterable[bytes], progress: Progress | None = None) -> Stored:
        """Store the concatenation of ``chunks``."""
        hasher = hashlib.sha256()
        size = 0
        with open_temp(self.tmp_dir, "blob") as temp:
            writer = _Writer(temp.fd)
            writer.start()
            try:
                for chunk in chunks:
                    if writer.error is not None:
                        break  # e.g. the disk is full: stop reading the source, report below
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
            temp.sync_and_close()
            digest = "sha256:" + hasher.hexdigest()
            created = self._publish(temp.path, digest, size)
        return Stored(digest, size, created)

    def put_bytes(self, data: bytes) -> Stored:
        return self.put([data])

    def _publish(self, tmp: Path, digest: str, size: int) -> bool:
        """Give ``tmp`` its final name; False when the store already held the object.

        ``link`` never replaces an existing name, so a concurrent writer of the same object
        either wins (we see EEXIST and reuse its file) or loses to us; nobody overwrites.
        """
        final = self.path(digest)
        os.chmod(tmp, 0o444)
        ensure_dir(final.parent)
        for _ in range(3):
            if self._reuse(final, size):
                remove_quietly(tmp)
                return False
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue  # published (or damaged and moved aside) by someone else meanwhile: look again
            except OSError:  # filesystems without hard links: rename (a racing writer holds the same bytes)
                os.replace(tmp, final)
            else:
                remove_quietly(tmp)
            fsync_dir(final.parent)
            return True
        raise StoreError(
            f"cannot publish {digest}: another program keeps replacing {final}; stop anything else that writes "
            "into this store, run `adapterkit verify`, then retry"
        )

    def _reuse(self, final: Path, size: int) -> bool:
        """True when ``final`` already holds these bytes; a wrong-sized one is moved aside first."""
        try:
            existing = final.stat().st_size
        except FileNotFoundError:
            return False
        if existing != size:
            self.quarantine(final)
            return False
        try:
            os.utime(final)  # freshen: a gc that runs later keeps it for its grace period
        except FileNotFoundError:
            return False  # moved aside meanwhile (verify found it corrupt): publish ours
        except PermissionError:
            pass  # another user's file in a shared store; the lock still keeps gc away while we write
        return True

    def quarantine(self, path: Path) -> Path | None:
        """Move a damaged object under ``corrupt/`` rather than deleting what may be the only copy.

        Returns where it went, or None when another process moved it first (two verifies, or
        verify and a writer that found it the wrong size): it is out of the way either way.
        """
        corrupt = self.root.parent.parent / "corrupt"
        corrupt.mkdir(parents=True, exist_ok=True)
        target = corrupt / f"{self.root.parent.name}-{path.parent.name}{path.name}-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        return target

    def read(self, digest: str, size: int | None = None, *, what: str = "object", writable: bool = False) -> bytes:
        """The bytes of ``digest``, checked against their size and hash before they are used.

        ``writable`` returns them in a ``bytearray``, read in place, which tensors can then share
        without a copy (loading an adapter then holds its weights once, not twice).
        """
        path = self.path(digest)
        try:
            data = _read_into_bytearray(path) if writable else path.read_bytes()
        except FileNotFoundError:
            raise ReferenceNotFoundError(
                f"{what} (object {digest}) is missing from the store (run `adapterkit verify`)"
            ) from None
        except OSError as exc:
            raise StoreError(f"{what} (object {digest}): cannot read {path} ({exc.strerror or exc})") from None
        if size is not None and len(data) != size:
            raise IntegrityError(
                f"{what} (object {digest}) is {len(data)} bytes, expected {size} (run `adapterkit verify`)"
            )
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"{what} (object {digest}) does not match its digest (run `adapterkit verify`)")
        return data


def _read_into_bytearray(path: Path) -> bytearray:
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            got = fh.readinto(view[done:])
            if not got:
                break
            done += got
        view.release()
    return buffer if done == size else buffer[:done]
