"""S3 as a remote: conditional PUTs (If-None-Match, If-Match on the ETag) and multipart uploads."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from adapterkit.errors import (
    SyncError,
)
from adapterkit.remotes.base import Progress
from adapterkit.remotes.fsspec.backends import (
    CHUNK,
    MARKER,
    MAX_DOCUMENT,
    FsspecBackend,
    local_chunks,
    object_key,
    parse_ref_bytes,
    ref_bytes,
    ref_key,
)
from adapterkit.remotes.fsspec.locations import Location
from adapterkit.store import (
    Layer,
)

__all__ = ["PART", "S3Backend", "s3_filesystem"]

#: S3 objects above this size go up in parts of this size (S3's minimum part is 5 MiB, its maximum count 10,000).
PART = 16 << 20


class S3Backend(FsspecBackend):
    """S3 through s3fs, with the conditional PUTs S3 has offered since 2024 (If-None-Match, If-Match).

    Conditional requests go to the aiobotocore client directly: s3fs turns a failed precondition
    into a plain OSError, and a compare-and-swap must tell "lost the race" from any other failure.
    """

    def __init__(self, location: Location, fs: Any, lock: AbstractContextManager[Any] | None = None) -> None:
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
                if len(data) > MAX_DOCUMENT:
                    raise SyncError(f"{self}: {key} is over {MAX_DOCUMENT} bytes, too large for what it should hold")
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
        return self._head(MARKER) is not None

    def size(self, kind: str, digest: str) -> int | None:
        head = self._head(object_key(kind, digest))
        return None if head is None else int(head["ContentLength"])

    def read(self, kind: str, digest: str) -> Generator[bytes, None, None]:
        """One GET, streamed (a range request per chunk would pay a round trip per MiB)."""
        from botocore.exceptions import ClientError

        key = object_key(kind, digest)
        with self._io(f"reading {key}"):
            try:
                response = self._sync(self._call, "get_object", Key=self._key(key))
            except ClientError as exc:
                if self._missing(exc):
                    raise SyncError(f"{self}: {kind[:-1]} {digest} is missing from the remote store") from None
                raise
            body = response["Body"]
            try:
                while chunk := self._sync(body.read, CHUNK):
                    yield chunk
            finally:
                with contextlib.suppress(Exception):  # on the loop's thread: asyncio transports are not thread-safe
                    self._sync(body.aclose)

    def upload(self, kind: str, layer: Layer, source: Path, *, replace: bool, progress: Progress | None) -> bool:
        """One conditional PUT, or a multipart upload whose completion carries the condition.

        Driven from the caller's thread (``progress`` never runs on fsspec's event loop), and fed
        by :func:`local_chunks`, so a local blob that turns out damaged aborts the upload before
        S3 publishes anything.
        """
        key = object_key(kind, layer.digest)
        condition = {} if replace else {"IfNoneMatch": "*"}
        if layer.size <= PART:
            created = self._put(key, b"".join(local_chunks(source, layer, None)), **condition)
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
                for chunk in local_chunks(source, layer, None):
                    buffer += chunk
                    if len(buffer) >= PART:
                        send(bytes(buffer[:PART]))
                        del buffer[:PART]
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
        data, etag = self._get_tagged(ref_key(name, tag))
        digest = None if data is None else parse_ref_bytes(data, self, name, tag)
        return digest, etag

    def write_ref(self, name: str, tag: str, digest: str, expected: str | None, token: Any, message: str) -> None:
        condition = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
        if not self._put(ref_key(name, tag), ref_bytes(digest), **condition):
            self.conflict(name, tag, digest, expected)


def s3_filesystem() -> Any:
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
