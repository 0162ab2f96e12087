"""Where a remote store's objects and refs live: a local directory, or any fsspec file system.

Each backend reads objects and refs and writes them with the strongest condition it has: the
local store's own crash-safe writer, or check-then-write under one lock for ``memory://``.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from adapterkit.errors import (
    AdapterkitError,
    IntegrityError,
    RefConflictError,
    ReferenceNotFoundError,
    RemoteConflictError,
    StoreError,
    SyncError,
)
from adapterkit.files.hashing import verified_chunks
from adapterkit.remotes.base import Progress
from adapterkit.remotes.fsspec.locations import Location
from adapterkit.store import (
    STORE_FORMAT_VERSION,
    AdapterStore,
    Layer,
    is_digest,
    marker_version,
    store_marker,
)

__all__ = ["CHUNK", "MARKER", "MEMORY_LOCK", "Backend", "FsspecBackend", "LocalBackend", "counted", "local_chunks"]

CHUNK = 1 << 20
#: Manifests, refs and ``store.json`` are small; a remote serving more is refused rather than read.
MAX_DOCUMENT = 4 << 20
MARKER = "store.json"
#: Guards check-then-write on ``memory://``, which is visible to one process only.
MEMORY_LOCK = threading.RLock()


def object_key(kind: str, digest: str) -> str:
    hexdigest = digest.removeprefix("sha256:")
    return f"{kind}/sha256/{hexdigest[:2]}/{hexdigest[2:]}"


def ref_key(name: str, tag: str) -> str:
    return f"refs/{name}/_tags/{tag}"


def ref_bytes(digest: str) -> bytes:
    return f"{digest}\n".encode()


def parse_ref_bytes(data: bytes, root: Backend, name: str, tag: str) -> str:
    """The digest the ref file of ``name:tag`` in the remote store ``root`` holds."""
    text = data.decode("ascii", "replace").strip()
    if not is_digest(text):
        raise SyncError(
            f"{root}/{name}:{tag}: corrupt ref ({root}/{ref_key(name, tag)} does not hold a sha256 digest); "
            "delete that file and push the adapter again, or write the right sha256:<64 hex digits> into it"
        )
    return text


def check_marker(data: bytes, where: Any) -> None:
    version = marker_version(data)
    if version is None:
        raise SyncError(f"{where}: {MARKER} is not an adapterkit store marker")
    if version != STORE_FORMAT_VERSION:
        raise SyncError(
            f"{where}: store format version {version}; this adapterkit reads version {STORE_FORMAT_VERSION}"
        )


# -- streaming with verification --------------------------------------------------------------------


def local_chunks(path: Path, layer: Layer, progress: Progress | None) -> Iterator[bytes]:
    """The bytes of a local object, re-hashed: raises before the last chunk is consumed if they are wrong.

    Raising from inside the iterator (rather than after it) matters: the writer consuming it
    (a remote's object writer, a multipart upload) then fails before publishing anything.
    """

    def corrupt(_size: int, _got: str) -> Exception:
        return IntegrityError(
            f"local object {layer.digest} is corrupt; nothing was pushed for it (run `adapterkit verify`)"
        )

    def read() -> Iterator[bytes]:
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
        except FileNotFoundError:
            raise ReferenceNotFoundError(
                f"object {layer.digest} is missing from the local store (run `adapterkit verify`)"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot read local object {layer.digest} ({exc.strerror or exc})") from None

    return verified_chunks(read(), layer.digest, layer.size, corrupt, progress)


def counted(chunks: Iterable[bytes], progress: Progress | None) -> Iterator[bytes]:
    for chunk in chunks:
        if progress:
            progress(len(chunk))
        yield chunk


# -- backends ---------------------------------------------------------------------------------------


class Backend(ABC):
    """One directory on one file system, seen as (possibly) a store root."""

    def __init__(self, location: Location) -> None:
        self.location = location

    def __str__(self) -> str:
        return str(self.location)

    @abstractmethod
    def at(self, location: Location) -> Backend:
        """The same file system at another directory."""

    @abstractmethod
    def is_store(self) -> bool:
        """Whether ``store.json`` is there (a cheap probe: one stat or HEAD)."""

    @abstractmethod
    def open(self, *, create: bool) -> None:
        """Check the store's format; with ``create``, make a store here first if there is none."""

    def writing(self) -> AbstractContextManager[None]:
        """Held around a push (the file backend takes the remote store's gc lock)."""
        return contextlib.nullcontext()

    @abstractmethod
    def size(self, kind: str, digest: str) -> int | None:
        """Size of the object, None when it is absent."""

    @abstractmethod
    def read(self, kind: str, digest: str) -> Generator[bytes, None, None]:
        """The object's bytes in chunks; raises SyncError (also when the object is absent: the store is damaged)."""

    @abstractmethod
    def upload(self, kind: str, layer: Layer, source: Path, *, replace: bool, progress: Progress | None) -> bool:
        """Publish the local object ``source`` unless the remote has it; False when it was there already.

        ``replace``: the remote holds a damaged object under this name, which may be overwritten
        (only bytes that hash to the name are ever written, so an overwrite cannot lose data).
        """

    @abstractmethod
    def read_ref(self, name: str, tag: str) -> tuple[str | None, Any]:
        """(digest or None, a token for :meth:`write_ref`'s compare-and-swap)."""

    @abstractmethod
    def write_ref(self, name: str, tag: str, digest: str, expected: str | None, token: Any, message: str) -> None:
        """Point the ref at ``digest`` if it still holds what :meth:`read_ref` returned; else RemoteConflictError."""

    def read_document(self, kind: str, digest: str) -> bytes:
        data = bytearray()
        for chunk in self.read(kind, digest):
            data += chunk
            if len(data) > MAX_DOCUMENT:
                raise SyncError(f"{self}: {digest} is over {MAX_DOCUMENT} bytes, too large for a manifest")
        return bytes(data)

    def conflict(self, name: str, tag: str, digest: str, expected: str | None) -> None:
        """Raise for a lost compare-and-swap, unless the winner wrote the same digest."""
        now, _ = self.read_ref(name, tag)
        if now != digest:
            raise RemoteConflictError(
                f"{self}/{name}:{tag} moved to {now or 'nothing'} while this push ran "
                f"(it held {expected or 'nothing'}); another push won, pull it or push again"
            )


class LocalBackend(Backend):
    """A directory on this machine, written through the store's own crash-safe writer."""

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        self.path = Path("/" + "/".join(location.parts))
        self.store = AdapterStore(self.path)

    def at(self, location: Location) -> Backend:
        return LocalBackend(location)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except RefConflictError:
            raise
        except StoreError as exc:
            raise SyncError(f"remote {self}: {exc}") from None
        except OSError as exc:
            raise SyncError(f"remote {self}: {exc.strerror or exc}") from None

    def is_store(self) -> bool:
        try:
            return (self.path / MARKER).is_file()
        except OSError:
            return False

    def open(self, *, create: bool) -> None:
        with self._errors():
            if not self.store.initialised() and not create:
                raise SyncError(f"{self} is not an adapterkit store (no {MARKER})")

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            with self._errors():  # only entering: errors from the push itself keep their own meaning
                stack.enter_context(self.store.writing())
            yield

    def _dir(self, kind: str) -> Any:
        return self.store.blobs if kind == "blobs" else self.store.manifests

    def size(self, kind: str, digest: str) -> int | None:
        try:
            return self._dir(kind).path(digest).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SyncError(f"remote {self}: cannot stat {digest} ({exc.strerror or exc})") from None

    def read(self, kind: str, digest: str) -> Generator[bytes, None, None]:
        path = self._dir(kind).path(digest)
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
        except FileNotFoundError:
            raise SyncError(f"{self}: {kind[:-1]} {digest} is missing from the remote store") from None
        except OSError as exc:
            raise SyncError(f"{self}: cannot read {digest} ({exc.strerror or exc})") from None

    def upload(self, kind: str, layer: Layer, source: Path, *, replace: bool, progress: Progress | None) -> bool:
        # ObjectDir.put moves a wrong-sized object aside itself, so ``replace`` needs nothing here.
        # Store errors come from reading the local object and keep their meaning; OSErrors are the remote's.
        try:
            return self._dir(kind).put(local_chunks(source, layer, progress)).created
        except OSError as exc:
            raise SyncError(f"remote {self}: cannot write {layer.digest} ({exc.strerror or exc})") from None

    def read_ref(self, name: str, tag: str) -> tuple[str | None, Any]:
        with self._errors():
            digest = self.store.refs.read(name, tag)
        return digest, digest

    def write_ref(self, name: str, tag: str, digest: str, expected: str | None, token: Any, message: str) -> None:
        try:
            with self._errors():
                self.store.refs.update(name, tag, digest, expected=expected, message=message)
        except RefConflictError:
            self.conflict(name, tag, digest, expected)


class FsspecBackend(Backend):
    """Any fsspec file system. Without conditional writes, objects are check-then-write (harmless:
    every writer of a name writes the same bytes) and so is the ref, under ``lock``; that is only a
    real compare-and-swap where ``lock`` covers every writer, as it does for ``memory://``."""

    def __init__(self, location: Location, fs: Any, lock: AbstractContextManager[Any] | None = None) -> None:
        super().__init__(location)
        self.fs = fs
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.root = "/".join(location.parts) if location.scheme == "s3" else "/" + "/".join(location.parts)
        self.errors: tuple[type[BaseException], ...] = (OSError, ValueError)

    def at(self, location: Location) -> Backend:
        return type(self)(location, self.fs, self.lock)

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        try:
            yield
        except AdapterkitError:
            raise
        except self.errors as exc:
            raise SyncError(f"{self}: {what} failed ({type(exc).__name__}: {exc})") from None

    def _get(self, key: str) -> bytes | None:
        with self._io(f"reading {key}"):
            try:
                return self.fs.cat_file(self._path(key))
            except FileNotFoundError:
                return None

    def _create(self, key: str, data: bytes, *, replace: bool = False) -> bool:
        with self.lock, self._io(f"writing {key}"):
            path = self._path(key)
            if not replace and self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True

    def _is_empty(self) -> bool:
        with self._io("listing"):
            try:
                return not self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return True

    def is_store(self) -> bool:
        with self._io(f"looking for {MARKER}"):
            return bool(self.fs.isfile(self._path(MARKER)))

    def open(self, *, create: bool) -> None:
        marker = self._get(MARKER)
        if marker is None:
            if not create:
                raise SyncError(f"{self} is not an adapterkit store (no {MARKER})")
            if self._is_empty():
                self._create(MARKER, store_marker())  # a concurrent first push may win: fine
            marker = self._get(MARKER)  # also catches a store created since the first look
            if marker is None:
                raise SyncError(f"{self}: exists, is not empty and is not an adapterkit store (no {MARKER})")
        check_marker(marker, self)

    def size(self, kind: str, digest: str) -> int | None:
        with self._io(f"looking up {digest}"):
            try:
                info = self.fs.info(self._path(object_key(kind, digest)))
            except FileNotFoundError:
                return None
        return int(info["size"]) if info.get("type", "file") == "file" else None

    def read(self, kind: str, digest: str) -> Generator[bytes, None, None]:
        key = object_key(kind, digest)
        with self._io(f"reading {key}"):
            try:
                handle = self.fs.open(self._path(key), "rb")
            except FileNotFoundError:
                raise SyncError(f"{self}: {kind[:-1]} {digest} is missing from the remote store") from None
            with handle:
                while chunk := handle.read(CHUNK):
                    yield chunk

    def upload(self, kind: str, layer: Layer, source: Path, *, replace: bool, progress: Progress | None) -> bool:
        data = b"".join(local_chunks(source, layer, progress))
        return self._create(object_key(kind, layer.digest), data, replace=replace)

    def read_ref(self, name: str, tag: str) -> tuple[str | None, Any]:
        data = self._get(ref_key(name, tag))
        digest = None if data is None else parse_ref_bytes(data, self, name, tag)
        return digest, digest

    def write_ref(self, name: str, tag: str, digest: str, expected: str | None, token: Any, message: str) -> None:
        with self.lock:
            now, _ = self.read_ref(name, tag)
            if now != expected:
                self.conflict(name, tag, digest, expected)
                return
            with self._io(f"writing ref {name}:{tag}"):
                self.fs.pipe_file(self._path(ref_key(name, tag)), ref_bytes(digest))
