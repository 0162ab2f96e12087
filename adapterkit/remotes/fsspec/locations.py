"""Remote URLs: ``file:///root``, a bare path, ``s3://bucket/prefix``, ``memory://name``, as path segments."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from urllib.parse import unquote

from adapterkit.errors import (
    SyncError,
    UnknownRemoteError,
)

__all__ = ["SCHEMES", "Location", "parse_location", "split_path"]

#: URL schemes the built-in remote serves (a bare path is ``file``).
SCHEMES = ("file", "s3", "memory")


@dataclass(frozen=True)
class Location:
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

    def up(self, depth: int) -> Location:
        return replace(self, parts=self.parts[:depth])

    def join(self, rest: str) -> Location:
        return replace(self, parts=self.parts + split_path(rest, f"{self}/{rest}"))


def split_path(path: str, url: str) -> tuple[str, ...]:
    parts = tuple(part for part in path.split("/") if part)
    if any(part in (".", "..") for part in parts):
        raise SyncError(f"{url}: '.' and '..' are not allowed in a remote URL")
    return parts


def parse_location(url: str) -> Location:
    """``file:///p``, ``s3://bucket/p``, ``memory://p`` or a bare path, as a :class:`Location`."""
    scheme, sep, rest = url.partition("://")
    if not sep or len(scheme) < 2:  # a bare path ("C:\\..." has a one-letter "scheme")
        return Location("file", split_path(os.path.abspath(os.path.expanduser(url)), url), bare=True)
    scheme = scheme.lower()
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise SyncError(f"{url}: a file:// URL names a local path (file:///srv/ak), not a host ({host!r})")
        return Location("file", split_path(unquote(path), url))
    if scheme not in SCHEMES:
        raise UnknownRemoteError(f"{url}: the built-in remote serves {', '.join(f'{s}://' for s in SCHEMES)}")
    location = Location(scheme, split_path(rest, url))
    if scheme == "s3" and not location.parts:
        raise SyncError(f"{url}: name a bucket (s3://bucket[/prefix])")
    return location
