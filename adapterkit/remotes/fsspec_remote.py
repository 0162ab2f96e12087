"""The built-in remote: an adapterkit store on a file system, local, S3 or in memory.

``file:///srv/ak`` (or a bare path), ``s3://bucket/prefix`` and ``memory://name`` all hold a store
with the local store's layout (docs/store-format.md): ``store.json``, ``blobs/sha256/<2>/<62>``,
``manifests/sha256/<2>/<62>``, ``refs/<name>/_tags/<tag>``. A directory pushed to is therefore a
store that ``adapterkit --store`` opens as it is, and a copy of a store (``rsync``, ``aws s3 sync``)
is a remote.

Push sends only the objects the remote lacks, blobs before the manifest, each re-hashed on the way
out so a damaged local blob never reaches the remote; then it moves the remote ref by
compare-and-swap against the value it read before uploading (another push that moved the ref
meanwhile wins, and this one gets :class:`RemoteConflictError`). Pull fetches the manifest by
digest and checks it, streams each missing blob into the local store while hashing it (a blob that
does not hash to its name raises before it is published, so nothing damaged ever gets a name), and
writes the local ref last, all under the local store's gc lock. A pull that fails half-way leaves at
most complete, unreferenced objects, which a re-run reuses and ``gc`` otherwise collects.

What each backend guarantees::

    backend  objects (blobs, manifests)              remote ref
    file     the store's own writer: temp, fsync,    flock + compare + rename, with a reflog,
             link; under the remote's gc lock        under the remote store's gc lock
    s3       PUT If-None-Match: *                    new ref: PUT If-None-Match: *;
                                                     existing ref: PUT If-Match: <its ETag>
    memory   one in-process lock (memory:// lives    the same lock
             in one process, so this is exact)

Only the file backend keeps a reflog on the remote (S3 has no append). An S3 ref that another push
rewrote with the same digest still counts as a win for both. Other fsspec file systems would get
the memory backend's code without its lock: check-then-write, no compare-and-swap.

URL rules (names contain ``/``, so the store root is found by looking for ``store.json``):

* pull ``SOURCE``: ``ROOT/NAME[:TAG]``, ``ROOT/NAME@sha256:<hex>`` or ``ROOT/sha256:<hex>`` (with a
  local tag). ROOT is the nearest ancestor of the last path segment that holds ``store.json``.
* push ``DEST``: a store root (``store.json`` there) receives the adapter under the pushed ref's
  name and tag. ``DEST/NAME:TAG`` (the last segment has a ``:``) renames it, inside the nearest
  ancestor that is a store; such a store must already exist. Any other DEST that is not a store
  becomes a new one, provided it is empty and not inside another store (nested stores would make
  names ambiguous).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from adapterkit.errors import (
    AdapterkitError,
    IntegrityError,
    InvalidReferenceError,
    RefConflictError,
    ReferenceNotFoundError,
    RemoteConflictError,
    StoreError,
    SyncError,
    UnknownRemoteError,
)
from adapterkit.peft_io import WEIGHTS_NAME
from adapterkit.remotes.base import Progress, TransferResult
from adapterkit.safetensors_io import TensorScan, scanned
from adapterkit.store import Ref, Store, parse_ref, parse_tag_ref
from adapterkit.store.documents import Layer, canonical_json, parse_manifest, parse_metadata
from adapterkit.store.names import DIGEST_RE
from adapterkit.store.store import STORE_FORMAT_VERSION

__all__ = ["SCHEMES", "FsspecRemote", "open_fsspec_remote"]

#: URL schemes this remote serves (a bare path is ``file``).
SCHEMES = ("file", "s3", "memory")
_CHUNK = 1 << 20
#: S3 objects above this size go up in parts of this size (S3's minimum part is 5 MiB, its maximum count 10,000).
_PART = 16 << 20
#: Manifests, refs and ``store.json`` are small; a remote serving more is refused rather than read.
_MAX_DOCUMENT = 4 << 20
_MARKER = "store.json"
_STORE_FORMAT = "adapterkit-store"
#: Guards check-then-write on ``memory://``, which is visible to one process only.
_MEMORY_LOCK = threading.RLock()


def open_fsspec_remote(url: str) -> FsspecRemote:
    """The factory registered for ``file``, ``s3`` and ``memory`` URLs."""
    return FsspecRemote(url)


# -- URLs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Location:
    """A directory on one backend: the scheme and the path segments (for s3, the bucket first)."""

    scheme: str
    parts: tuple[str, ...]
    #: Given as a bare path: shown back as a path, not a file:// URL.
    bare: bool = False

    def __str__(self) -> str:
        path = "/".join(self.parts)
        if self.scheme == "file":
            return f"/{path}" if self.bare else f"file:///{path}"
        return f"{self.scheme}://{path}"

    @property
    def top(self) -> int:
        """How many segments the shortest possible root has (an s3 root needs its bucket)."""
        return 1 if self.scheme == "s3" else 0

    def up(self, depth: int) -> _Location:
        return replace(self, parts=self.parts[:depth])

    def join(self, rest: str) -> _Location:
        return replace(self, parts=self.parts + _split(rest, f"{self}/{rest}"))


def _split(path: str, url: str) -> tuple[str, ...]:
    parts = tuple(part for part in path.split("/") if part)
    if any(part in (".", "..") for part in parts):
        raise SyncError(f"{url}: '.' and '..' are not allowed in a remote URL")
    return parts


def parse_location(url: str) -> _Location:
    """``file:///p``, ``s3://bucket/p``, ``memory://p`` or a bare path, as a :class:`_Location`."""
    scheme, sep, rest = url.partition("://")
    if not sep or len(scheme) < 2:  # a bare path ("C:\\..." has a one-letter "scheme")
        return _Location("file", _split(os.path.abspath(os.path.expanduser(url)), url), bare=True)
    scheme = scheme.lower()
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise SyncError(f"{url}: a file:// URL names a local path (file:///srv/ak), not a host ({host!r})")
        return _Location("file", _split(unquote(path), url))
    if scheme not in SCHEMES:
        raise UnknownRemoteError(f"{url}: the built-in remote serves {', '.join(f'{s}://' for s in SCHEMES)}")
    location = _Location(scheme, _split(rest, url))
    if scheme == "s3" and not location.parts:
        raise SyncError(f"{url}: name a bucket (s3://bucket[/prefix])")
    return location


def _object_key(kind: str, digest: str) -> str:
    hexdigest = digest.removeprefix("sha256:")
    return f"{kind}/sha256/{hexdigest[:2]}/{hexdigest[2:]}"


def _ref_key(name: str, tag: str) -> str:
    return f"refs/{name}/_tags/{tag}"


def _ref_bytes(digest: str) -> bytes:
    return f"{digest}\n".encode()


def _parse_ref_bytes(data: bytes, root: _Backend, name: str, tag: str) -> str:
    """The digest the ref file of ``name:tag`` in the remote store ``root`` holds."""
    text = data.decode("ascii", "replace").strip()
    if not DIGEST_RE.fullmatch(text):
        raise SyncError(
            f"{root}/{name}:{tag}: corrupt ref ({root}/{_ref_key(name, tag)} does not hold a sha256 digest); "
            "delete that file and push the adapter again, or write the right sha256:<64 hex digits> into it"
        )
    return text


def _check_marker(data: bytes, where: Any) -> None:
    try:
        doc = json.loads(data)
        ok = doc.get("format") == _STORE_FORMAT
        version = doc.get("version")
    except (ValueError, AttributeError, RecursionError):
        ok, version = False, None
    if not ok:
        raise SyncError(f"{where}: {_MARKER} is not an adapterkit store marker")
    if version != STORE_FORMAT_VERSION:
        raise SyncError(
            f"{where}: store format version {version}; this adapterkit reads version {STORE_FORMAT_VERSION}"
        )


# -- streaming with verification --------------------------------------------------------------------


def _local_chunks(path: Path, layer: Layer, progress: Progress | None) -> Iterator[bytes]:
    """The bytes of a local object, re-hashed: raises before the last chunk is consumed if they are wrong.

    Raising from inside the iterator (rather than after it) matters: the writer consuming it
    (``ObjectDir.put``, a multipart upload) then fails before publishing anything.
    """
    hasher = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                size += len(chunk)
                if size > layer.size:
                    break
                hasher.update(chunk)
                if progress:
                    progress(len(chunk))
                yield chunk
    except FileNotFoundError:
        raise ReferenceNotFoundError(
            f"object {layer.digest} is missing from the local store (run `adapterkit verify`)"
        ) from None
    except OSError as exc:
        raise StoreError(f"cannot read local object {layer.digest} ({exc.strerror or exc})") from None
    if size != layer.size or "sha256:" + hasher.hexdigest() != layer.digest:
        raise IntegrityError(
            f"local object {layer.digest} is corrupt; nothing was pushed for it (run `adapterkit verify`)"
        )


def _remote_chunks(
    chunks: Generator[bytes, None, None], layer: Layer, where: str, progress: Progress | None
) -> Iterator[bytes]:
    """Chunks from the remote, checked against ``layer``: the last ``next()`` raises if they do not match."""
    hasher = hashlib.sha256()
    size = 0
    with contextlib.closing(chunks):  # stop the download (close the connection) when the check fails
        for chunk in chunks:
            size += len(chunk)
            if size > layer.size:
                raise SyncError(
                    f"{where}: {layer.digest} sent more than the {layer.size} bytes its manifest gives; "
                    "the remote copy is damaged, nothing was stored for it"
                )
            hasher.update(chunk)
            if progress:
                progress(len(chunk))
            yield chunk
    got = "sha256:" + hasher.hexdigest()
    if size != layer.size or got != layer.digest:
        raise SyncError(
            f"{where}: {layer.digest} arrived as {size} bytes hashing to {got}; the remote copy is corrupt "
            "(or was changed in transit), nothing was stored for it"
        )


# -- backends ---------------------------------------------------------------------------------------


class _Backend(ABC):
    """One directory on one file system, seen as (possibly) a store root."""

    def __init__(self, location: _Location) -> None:
        self.location = location

    def __str__(self) -> str:
        return str(self.location)

    @abstractmethod
    def at(self, location: _Location) -> _Backend:
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
            if len(data) > _MAX_DOCUMENT:
                raise SyncError(f"{self}: {digest} is over {_MAX_DOCUMENT} bytes, too large for a manifest")
        return bytes(data)

    def conflict(self, name: str, tag: str, digest: str, expected: str | None) -> None:
        """Raise for a lost compare-and-swap, unless the winner wrote the same digest."""
        now, _ = self.read_ref(name, tag)
        if now != digest:
            raise RemoteConflictError(
                f"{self}/{name}:{tag} moved to {now or 'nothing'} while this push ran "
                f"(it held {expected or 'nothing'}); another push won, pull it or push again"
            )


class _LocalBackend(_Backend):
    """A directory on this machine, written through the store's own crash-safe writer."""

    def __init__(self, location: _Location) -> None:
        super().__init__(location)
        self.path = Path("/" + "/".join(location.parts))
        self.store = Store(self.path)

    def at(self, location: _Location) -> _Backend:
        return _LocalBackend(location)

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
            return (self.path / _MARKER).is_file()
        except OSError:
            return False

    def open(self, *, create: bool) -> None:
        with self._errors():
            if not self.store.initialised() and not create:
                raise SyncError(f"{self} is not an adapterkit store (no {_MARKER})")

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
                while chunk := fh.read(_CHUNK):
                    yield chunk
        except FileNotFoundError:
            raise SyncError(f"{self}: {kind[:-1]} {digest} is missing from the remote store") from None
        except OSError as exc:
            raise SyncError(f"{self}: cannot read {digest} ({exc.strerror or exc})") from None

    def upload(self, kind: str, layer: Layer, source: Path, *, replace: bool, progress: Progress | None) -> bool:
        # ObjectDir.put moves a wrong-sized object aside itself, so ``replace`` needs nothing here.
        # Store errors come from reading the local object and keep their meaning; OSErrors are the remote's.
        try:
            return self._dir(kind).put(_local_chunks(source, layer, progress)).created
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


class _FsspecBackend(_Backend):
    """Any fsspec file system. Without conditional writes, objects are check-then-write (harmless:
    every writer of a name writes the same bytes) and so is the ref, under ``lock``; that is only a
    real compare-and-swap where ``lock`` covers every writer, as it does for ``memory://``."""

    def __init__(self, location: _Location, fs: Any, lock: AbstractContextManager[Any] | None = None) -> None:
        super().__init__(location)
        self.fs = fs
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.root = "/".join(location.parts) if location.scheme == "s3" else "/" + "/".join(location.parts)
        self.errors: tuple[type[BaseException], ...] = (OSError, ValueError)

    def at(self, location: _Location) -> _Backend:
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
        with self._io(f"looking for {_MARKER}"):
            return bool(self.fs.isfile(self._path(_MARKER)))

    def open(self, *, create: bool) -> None:
        marker = self._get(_MARKER)
        if marker is None:
            if not create:
                raise SyncError(f"{self} is not an adapterkit store (no {_MARKER})")
            if self._is_empty():
                document = {"format": _STORE_FORMAT, "version": STORE_FORMAT_VERSION}
                self._create(_MARKER, canonical_json(document) + b"\n")  # a concurrent first push may win: fine
            marker = self._get(_MARKER)  # also catches a store created since the first look
            if marker is None:
                raise SyncError(f"{self}: exists, is not empty and is not an adapterkit store (no {_MARKER})")
        _check_marker(marker, self)

    def size(self, kind: str, digest: str) -> int | None:
        with self._io(f"looking up {digest}"):
            try:
                info = self.fs.info(self._path(_object_key(kind, digest)))
            except FileNotFoundError:
                return None
        return int(info["size"]) if info.get("type", "file") == "file" else None

    def read(self, kind: str, digest: str) -> Generator[bytes, None, None]:
        key = _object_key(kind, digest)
        with self._io(f"reading {key}"):
            try:
                handle = self.fs.open(self._path(key), "rb")
            except FileNotFoundError:
                raise SyncError(f"{self}: {kind[:-1]} {digest} is missing from the remote store") from None
            with handle:
                while chunk := handle.read(_CHUNK):
                    yield chunk

    def upload(self, kind: str, layer: Layer, source: Path, *, replace: bool, progress: Progress | None) -> bool:
        data = b"".join(_local_chunks(source, layer, progress))
        return self._create(_object_key(kind, layer.digest), data, replace=replace)

    def read_ref(self, name: str, tag: str) -> tuple[str | None, Any]:
        data = self._get(_ref_key(name, tag))
        digest = None if data is None else _parse_ref_bytes(data, self, name, tag)
        return digest, digest

    def write_ref(self, name: str, tag: str, digest: str, expected: str | None, token: Any, message: str) -> None:
        with self.lock:
            now, _ = self.read_ref(name, tag)
            if now != expected:
                self.conflict(name, tag, digest, expected)
                return
            with self._io(f"writing ref {name}:{tag}"):
                self.fs.pipe_file(self._path(_ref_key(name, tag)), _ref_bytes(digest))


class _S3Backend(_FsspecBackend):
    """S3 through s3fs, with the conditional PUTs S3 has offered since 2024 (If-None-Match, If-Match).

    Conditional requests go to the aiobotocore client directly: s3fs turns a failed precondition
    into a plain OSError, and a compare-and-swap must tell "lost the race" from any other failure.
    """

    def __init__(self, location: _Location, fs: Any, lock: AbstractContextManager[Any] | None = None) -> None:
        super().__init__(location, fs, lock)
        import aiohttp
        from botocore.exceptions import BotoCoreError, ClientError

        self.errors = (OSError, ValueError, TimeoutError, BotoCoreError, ClientError, aiohttp.ClientError)
        self.bucket = location.parts[0]
        self.prefix = "/".join(location.parts[1:])

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _sync(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import fsspec.asyn

        return fsspec.asyn.sync(self.fs.loop, func, *args, **kwargs)

    async def _client(self) -> Any:
        await self.fs.set_session()
        return await self.fs.get_s3(self.bucket)

    async def _call(self, method: str, **kwargs: Any) -> Any:
        client = await self._client()
        return await getattr(client, method)(Bucket=self.bucket, **kwargs)

    async def _get_small(self, key: str) -> tuple[bytes, str]:
        response = await self._call("get_object", Key=key)
        body = response["Body"]
        data = bytearray()
        try:
            while chunk := await body.read(1 << 16):
                data += chunk
                if len(data) > _MAX_DOCUMENT:
                    raise SyncError(f"{self}: {key} is over {_MAX_DOCUMENT} bytes, too large for what it should hold")
        finally:
            body.close()
        return bytes(data), response["ETag"]

    @staticmethod
    def _code(exc: BaseException) -> tuple[str, int]:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", "")), int(
            response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        )

    def _missing(self, exc: BaseException) -> bool:
        code, status = self._code(exc)
        return code != "NoSuchBucket" and (code in ("NoSuchKey", "404", "NotFound") or status == 404)

    def _precondition(self, exc: BaseException) -> bool:
        code, status = self._code(exc)
        return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)

    def _get(self, key: str) -> bytes | None:
        data, _ = self._get_tagged(key)
        return data

    def _get_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        from botocore.exceptions import ClientError

        with self._io(f"reading {key}"):
            try:
                return self._sync(self._get_small, self._key(key))
            except ClientError as exc:
                if self._missing(exc):
                    return None, None
                raise

    def _put(self, key: str, data: bytes, **condition: str) -> bool:
        """PUT with a condition; False when the condition failed."""
        from botocore.exceptions import ClientError

        with self._io(f"writing {key}"):
            try:
                self._sync(self._call, "put_object", Key=self._key(key), Body=data, **condition)
            except ClientError as exc:
                if self._precondition(exc):
                    return False
                raise
        return True

    def _create(self, key: str, data: bytes, *, replace: bool = False) -> bool:
        return self._put(key, data) if replace else self._put(key, data, IfNoneMatch="*")

    def _is_empty(self) -> bool:
        prefix = f"{self.prefix}/" if self.prefix else ""
        with self._io("listing"):
            listing = self._sync(self._call, "list_objects_v2", Prefix=prefix, MaxKeys=1)
        return not listing.get("KeyCount", len(listing.get("Contents", [])))

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        with self._io(f"looking up {key}"):
            try:
                return self._sync(self._call, "head_object", Key=self._key(key))
            except ClientError as exc:
                if self._missing(exc):
                    return None
                raise

    def is_store(self) -> bool:
        return self._head(_MARKER) is not None

    def size(self, kind: str, digest: str) -> int | None:
        head = self._head(_object_key(kind, digest))
        return None if head is None else int(head["ContentLength"])

    def read(self, kind: str, digest: str) -> Generator[bytes, None, None]:
        """One GET, streamed (a range request per chunk would pay a round trip per MiB)."""
        from botocore.exceptions import ClientError

        key = _object_key(kind, digest)
        with self._io(f"reading {key}"):
            try:
                response = self._sync(self._call, "get_object", Key=self._key(key))
            except ClientError as exc:
                if self._missing(exc):
                    raise SyncError(f"{self}: {kind[:-1]} {digest} is missing from the remote store") from None
                raise
            body = response["Body"]
            try:
                while chunk := self._sync(body.read, _CHUNK):
                    yield chunk
            finally:
                with contextlib.suppress(Exception):  # on the loop's thread: asyncio transports are not thread-safe
                    self._sync(body.aclose)

    def upload(self, kind: str, layer: Layer, source: Path, *, replace: bool, progress: Progress | None) -> bool:
        """One conditional PUT, or a multipart upload whose completion carries the condition.

        Driven from the caller's thread (``progress`` never runs on fsspec's event loop), and fed
        by :func:`_local_chunks`, so a local blob that turns out damaged aborts the upload before
        S3 publishes anything.
        """
        key = _object_key(kind, layer.digest)
        condition = {} if replace else {"IfNoneMatch": "*"}
        if layer.size <= _PART:
            created = self._put(key, b"".join(_local_chunks(source, layer, None)), **condition)
            if created and progress:
                progress(layer.size)
            return created
        return self._multipart(key, layer, source, condition, progress)

    def _multipart(
        self, key: str, layer: Layer, source: Path, condition: dict[str, str], progress: Progress | None
    ) -> bool:
        from botocore.exceptions import ClientError

        with self._io(f"uploading {key}"):
            upload = self._sync(self._call, "create_multipart_upload", Key=self._key(key))["UploadId"]
            parts: list[dict[str, Any]] = []

            def send(data: bytes) -> None:
                number = len(parts) + 1
                sent = self._sync(
                    self._call, "upload_part", Key=self._key(key), UploadId=upload, PartNumber=number, Body=data
                )
                parts.append({"PartNumber": number, "ETag": sent["ETag"]})
                if progress:
                    progress(len(data))

            try:
                buffer = bytearray()
                for chunk in _local_chunks(source, layer, None):
                    buffer += chunk
                    if len(buffer) >= _PART:
                        send(bytes(buffer[:_PART]))
                        del buffer[:_PART]
                if buffer:
                    send(bytes(buffer))
                try:
                    self._sync(
                        self._call,
                        "complete_multipart_upload",
                        Key=self._key(key),
                        UploadId=upload,
                        MultipartUpload={"Parts": parts},
                        **condition,
                    )
                except ClientError as exc:
                    if not self._precondition(exc):
                        raise
                    self._abort(key, upload)  # S3 keeps (and bills) the parts of an upload never finished
                    return False
            except BaseException:
                self._abort(key, upload)
                raise
        return True

    def _abort(self, key: str, upload: str) -> None:
        with contextlib.suppress(Exception):
            self._sync(self._call, "abort_multipart_upload", Key=self._key(key), UploadId=upload)

    def read_ref(self, name: str, tag: str) -> tuple[str | None, Any]:
        data, etag = self._get_tagged(_ref_key(name, tag))
        digest = None if data is None else _parse_ref_bytes(data, self, name, tag)
        return digest, etag

    def write_ref(self, name: str, tag: str, digest: str, expected: str | None, token: Any, message: str) -> None:
        condition = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
        if not self._put(_ref_key(name, tag), _ref_bytes(digest), **condition):
            self.conflict(name, tag, digest, expected)


def _s3_filesystem() -> Any:
    """A fresh s3fs file system configured from the environment, as boto3 is.

    Credentials, region and endpoint come from the usual AWS variables and files
    (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` included; botocore reads them). A fresh
    instance, not fsspec's cached one, so a changed environment is seen; no listing cache, so
    another writer's objects are never hidden.
    """
    try:
        import s3fs
    except ImportError:
        raise SyncError("s3:// remotes need s3fs: pip install 'adapterkit[s3]'") from None
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


# -- the remote -------------------------------------------------------------------------------------


class FsspecRemote:
    """A store reached through ``file://`` (or a bare path), ``s3://`` or ``memory://``."""

    def __init__(self, url: str, *, filesystem: Any = None) -> None:
        """``filesystem``: an fsspec file system to use instead of the scheme's default (tests, custom S3 options)."""
        self.url = url
        self.location = parse_location(url)
        self._fs = filesystem

    def __repr__(self) -> str:
        return f"FsspecRemote({self.url!r})"

    def _backend(self, location: _Location) -> _Backend:
        if location.scheme == "file":
            return _LocalBackend(location)
        if self._fs is None:
            if location.scheme == "s3":
                self._fs = _s3_filesystem()
            else:
                import fsspec

                self._fs = fsspec.filesystem("memory")
        if location.scheme == "s3":
            return _S3Backend(location, self._fs)
        return _FsspecBackend(location, self._fs, _MEMORY_LOCK if location.scheme == "memory" else None)

    def _nearest_store(self, location: _Location, below: int) -> _Backend | None:
        """The nearest ancestor of ``location`` with fewer than ``below`` segments that is a store."""
        probe = self._backend(location)
        for depth in range(below - 1, location.top - 1, -1):
            candidate = probe.at(location.up(depth))
            if candidate.is_store():
                return candidate
        return None

    # -- push ---------------------------------------------------------------------------------------

    def _push_target(self, name: str, tag: str) -> tuple[_Backend, str, str, bool]:
        """(remote root, name, tag, whether the root may be created); see the URL rules above."""
        location = self.location
        here = self._backend(location)
        if here.is_store():
            return here, name, tag, False
        depth = len(location.parts)
        last = location.parts[-1] if location.parts else ""
        if "@" in last:
            raise InvalidReferenceError(f"{self.url}: push to a store root or ROOT/NAME:TAG, not to a digest")
        if ":" in last:
            root = self._nearest_store(location, depth)
            if root is None:
                raise SyncError(
                    f"{self.url}: DEST/NAME:TAG publishes into an existing store, and no {_MARKER} was found above it; "
                    "push to the new store's root first (the adapter keeps its own name there)"
                )
            target = parse_tag_ref("/".join(location.parts[len(root.location.parts) :]))
            assert target.name is not None and target.tag is not None
            return root, target.name, target.tag, False
        outer = self._nearest_store(location, depth)
        if outer is not None:
            raise SyncError(
                f"{self.url} is inside the adapterkit store {outer}; push to {outer} or to {outer}/NAME:TAG"
            )
        return here, name, tag, True

    def push(
        self, store: Store, digest: str, name: str, tag: str, *, progress: Progress | None = None
    ) -> TransferResult:
        """Publish ``digest`` as ``name:tag`` (or as the URL's own ``NAME:TAG``); only missing objects are sent."""
        parse_tag_ref(f"{name}:{tag}")
        config, layers = store.manifest(digest)
        manifest = store.manifests.read(digest, what=f"manifest {digest}")
        objects: dict[str, tuple[str, Layer, Path]] = {}
        for layer in (config, *layers):
            objects.setdefault(layer.digest, ("blobs", layer, store.blobs.path(layer.digest)))
        objects[digest] = ("manifests", Layer("manifest", digest, len(manifest)), store.manifests.path(digest))

        root, name, tag, create = self._push_target(name, tag)
        sent = skipped = 0
        with root.writing():
            root.open(create=create)
            before, token = root.read_ref(name, tag)
            for kind, layer, source in objects.values():  # blobs first, the manifest last
                there = root.size(kind, layer.digest)
                if there == layer.size:
                    skipped += layer.size
                elif root.upload(kind, layer, source, replace=there is not None, progress=progress):
                    sent += layer.size
                elif root.size(kind, layer.digest) == layer.size:  # another push published it meanwhile
                    skipped += layer.size
                else:
                    raise SyncError(f"{root}: another push is uploading {layer.digest} right now; push again")
            if before != digest:
                root.write_ref(name, tag, digest, before, token, f"push {digest} from {store.root}")
        return TransferResult(digest=digest, ref=f"{root}/{name}:{tag}", transferred_bytes=sent, skipped_bytes=skipped)

    # -- pull ---------------------------------------------------------------------------------------

    def _source(self, source: str | None) -> _Location:
        """Where ``source`` points: the whole URL (as sync passes it), or a ref relative to this remote's URL."""
        if not source or source == self.url:
            return self.location
        if "://" in source or source.startswith(("/", "~")):
            location = parse_location(source)
            if location.scheme != self.location.scheme:
                raise SyncError(f"{source}: not a {self.location.scheme} URL (this remote is {self.url})")
            return location
        return self.location.join(source)

    def _locate(self, location: _Location) -> tuple[_Backend, Ref]:
        """The store root above ``location`` and the reference the rest of the path spells."""
        if len(location.parts) <= location.top:
            raise SyncError(f"{location}: name an adapter: ROOT/NAME[:TAG] or ROOT/NAME@sha256:<hex>")
        root = self._nearest_store(location, len(location.parts))
        if root is None:
            if self._backend(location).is_store():
                raise SyncError(f"{location} is a store; name an adapter in it: {location}/NAME[:TAG]")
            raise SyncError(f"no adapterkit store at or above {location} (no {_MARKER} found)")
        rest = "/".join(location.parts[len(root.location.parts) :])
        ref = parse_ref(rest)
        if ref.prefix is not None:
            raise InvalidReferenceError(
                f"{location}: a digest prefix cannot be pulled; give NAME[:TAG] or NAME@sha256:<64 hex digits>"
            )
        return root, ref

    def pull(
        self, store: Store, source: str | None = None, tag: str | None = None, *, progress: Progress | None = None
    ) -> TransferResult:
        """Fetch the adapter ``source`` names (``ROOT/NAME[:TAG]``, ``ROOT/NAME@sha256:...``) into ``store``.

        The local ref is ``tag`` (``NAME[:TAG]``); by default the remote's name and tag, and for a
        pinned ``NAME@sha256:<hex>`` the tag ``sha256-<first 12 hex digits>`` (a pin has no tag of
        its own, and an untagged adapter would be left to gc).
        """
        location = self._source(source)
        target = parse_tag_ref(tag) if tag is not None else None
        root, ref = self._locate(location)
        root.open(create=False)
        where = f"{root}/{ref}"
        if ref.digest is not None:
            digest = ref.digest
            if root.size("manifests", digest) is None:
                raise ReferenceNotFoundError(f"no adapter {ref} on {root}")
            if target is None and ref.name is None:
                raise InvalidReferenceError(f"{location}: pulling a bare digest needs a local --tag NAME[:TAG]")
            target = target or parse_tag_ref(f"{ref.name}:sha256-{digest[7:19]}")
        else:
            assert ref.name is not None and ref.tag is not None
            found, _ = root.read_ref(ref.name, ref.tag)
            if found is None:
                raise ReferenceNotFoundError(f"no adapter {ref.name}:{ref.tag} on {root}")
            digest = found
            target = target or parse_tag_ref(f"{ref.name}:{ref.tag}")
        assert target.name is not None and target.tag is not None

        manifest = root.read_document("manifests", digest)
        got = "sha256:" + hashlib.sha256(manifest).hexdigest()
        if got != digest:
            raise SyncError(f"{where}: the manifest of {digest} hashes to {got}; the remote copy is corrupt")
        try:
            config, layers = parse_manifest(manifest, f"manifest {digest} from {root}")
        except IntegrityError as exc:
            raise SyncError(str(exc)) from None

        received = skipped = 0
        with store.writing():
            for layer in _unique((config, *layers)):
                if _have(store, layer):
                    skipped += layer.size
                    continue
                chunks = _remote_chunks(root.read("blobs", layer.digest), layer, where, progress)
                if layer.title == WEIGHTS_NAME:
                    # A NaN never enters the store; deferred so that a damaged download is reported as such.
                    chunks = scanned(chunks, TensorScan(f"{where}: {WEIGHTS_NAME}", defer=True))
                store.blobs.put(chunks)
                received += layer.size
            try:
                parse_metadata(store.blobs.read(config.digest, config.size), f"metadata of {digest} from {root}")
            except IntegrityError as exc:
                raise SyncError(str(exc)) from None
            if store.manifests.put_bytes(manifest).created:
                received += len(manifest)
            else:
                skipped += len(manifest)
            store.refs.update(target.name, target.tag, digest, message=f"pull {where}")
        return TransferResult(
            digest=digest, ref=f"{target.name}:{target.tag}", transferred_bytes=received, skipped_bytes=skipped
        )


def _unique(layers: Iterable[Layer]) -> list[Layer]:
    seen: dict[str, Layer] = {}
    for layer in layers:
        seen.setdefault(layer.digest, layer)
    return list(seen.values())


def _have(store: Store, layer: Layer) -> bool:
    """The local store holds this blob at the right size (a wrong-sized one is replaced by the download)."""
    try:
        return store.blobs.path(layer.digest).stat().st_size == layer.size
    except FileNotFoundError:
        return False
