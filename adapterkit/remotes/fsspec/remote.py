"""``FsspecRemote``: push and pull against a store on a file system (the protocol; backends do the I/O)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adapterkit.errors import (
    InvalidReferenceError,
    ReferenceNotFoundError,
    SyncError,
)
from adapterkit.remotes.base import Progress, TransferResult
from adapterkit.remotes.fsspec.backends import MARKER, MEMORY_LOCK, Backend, FsspecBackend, LocalBackend, counted
from adapterkit.remotes.fsspec.locations import SCHEMES, Location, parse_location
from adapterkit.remotes.fsspec.s3 import S3Backend, s3_filesystem
from adapterkit.store import (
    AdapterStore,
    Layer,
    Ref,
    parse_ref,
    parse_tag_ref,
)

__all__ = ["SCHEMES", "FsspecRemote", "open_fsspec_remote"]


def open_fsspec_remote(url: str) -> FsspecRemote:
    """The factory registered for ``file``, ``s3`` and ``memory`` URLs."""
    return FsspecRemote(url)


class FsspecRemote:
    """A store reached through ``file://`` (or a bare path), ``s3://`` or ``memory://``."""

    def __init__(self, url: str, *, filesystem: Any = None) -> None:
        """``filesystem``: an fsspec file system to use instead of the scheme's default (tests, custom S3 options)."""
        self.url = url
        self.location = parse_location(url)
        self._fs = filesystem

    def __repr__(self) -> str:
        return f"FsspecRemote({self.url!r})"

    def _backend(self, location: Location) -> Backend:
        if location.scheme == "file":
            return LocalBackend(location)
        if self._fs is None:
            if location.scheme == "s3":
                self._fs = s3_filesystem()
            else:
                import fsspec

                self._fs = fsspec.filesystem("memory")
        if location.scheme == "s3":
            return S3Backend(location, self._fs)
        return FsspecBackend(location, self._fs, MEMORY_LOCK if location.scheme == "memory" else None)

    def _nearest_store(self, location: Location, below: int) -> Backend | None:
        """The nearest ancestor of ``location`` with fewer than ``below`` segments that is a store."""
        probe = self._backend(location)
        for depth in range(below - 1, location.top - 1, -1):
            candidate = probe.at(location.up(depth))
            if candidate.is_store():
                return candidate
        return None

    # -- push ---------------------------------------------------------------------------------------

    def _push_target(self, name: str, tag: str) -> tuple[Backend, str, str, bool]:
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
                    f"{self.url}: DEST/NAME:TAG publishes into an existing store, and no {MARKER} was found above it; "
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
        self, store: AdapterStore, digest: str, name: str, tag: str, *, progress: Progress | None = None
    ) -> TransferResult:
        """Publish ``digest`` as ``name:tag`` (or as the URL's own ``NAME:TAG``); only missing objects are sent."""
        parse_tag_ref(f"{name}:{tag}")
        config, layers = store.manifest(digest)
        manifest = store.manifest_bytes(digest)
        objects: dict[str, tuple[str, Layer, Path]] = {}
        for layer in (config, *layers):
            objects.setdefault(layer.digest, ("blobs", layer, store.blob_path(layer.digest)))
        objects[digest] = ("manifests", Layer("manifest", digest, len(manifest)), store.manifest_path(digest))

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

    def _source(self, source: str | None) -> Location:
        """Where ``source`` points: the whole URL (as sync passes it), or a ref relative to this remote's URL."""
        if not source or source == self.url:
            return self.location
        if "://" in source or source.startswith(("/", "~")):
            location = parse_location(source)
            if location.scheme != self.location.scheme:
                raise SyncError(f"{source}: not a {self.location.scheme} URL (this remote is {self.url})")
            return location
        return self.location.join(source)

    def _locate(self, location: Location) -> tuple[Backend, Ref]:
        """The store root above ``location`` and the reference the rest of the path spells."""
        if len(location.parts) <= location.top:
            raise SyncError(f"{location}: name an adapter: ROOT/NAME[:TAG] or ROOT/NAME@sha256:<hex>")
        root = self._nearest_store(location, len(location.parts))
        if root is None:
            if self._backend(location).is_store():
                raise SyncError(f"{location} is a store; name an adapter in it: {location}/NAME[:TAG]")
            raise SyncError(f"no adapterkit store at or above {location} (no {MARKER} found)")
        rest = "/".join(location.parts[len(root.location.parts) :])
        ref = parse_ref(rest)
        if ref.prefix is not None:
            raise InvalidReferenceError(
                f"{location}: a digest prefix cannot be pulled; give NAME[:TAG] or NAME@sha256:<64 hex digits>"
            )
        return root, ref

    def pull(
        self,
        store: AdapterStore,
        source: str | None = None,
        tag: str | None = None,
        *,
        progress: Progress | None = None,
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

        def fetch(layer: Layer) -> Iterable[bytes]:
            return counted(root.read("blobs", layer.digest), progress)

        local = f"{target.name}:{target.tag}"
        done = store.receive(manifest, fetch, local, f"pull {where}", where=where)
        return TransferResult(
            digest=digest, ref=local, transferred_bytes=done.received_bytes, skipped_bytes=done.skipped_bytes
        )
