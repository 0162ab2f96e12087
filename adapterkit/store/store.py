"""The adapter store: adapters as content-addressed blobs, manifests and ``name:tag`` refs.

Writes go blobs, then metadata, then manifest, then reflog line, then ref, each published
atomically, all under the gc lock held shared, so a reader or a crash never sees a ref to
something incomplete, and a killed writer leaves at most temp files and unreferenced objects.
This package never imports torch, PEFT or adapterkit's formats: it keeps bytes, documents and refs.
What an adapter *is* (reading a format, checking tensors, loading them) is the business of
:class:`adapterkit.Store`, which builds on :class:`AdapterStore`. The layout on disk is
:mod:`adapterkit.store.layout`'s.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import (
    AdapterkitError,
    AmbiguousReferenceError,
    IntegrityError,
    InvalidInputError,
    InvalidReferenceError,
    ReferenceNotFoundError,
    StoreError,
    SyncError,
)
from adapterkit.files.hashing import verified_chunks
from adapterkit.store.documents import Layer, build_manifest, canonical_json, check_metadata, parse_manifest
from adapterkit.store.documents import parse_metadata as _parse_metadata
from adapterkit.store.layout import StoreLayout
from adapterkit.store.names import digest_prefix, parse_ref, parse_tag_ref
from adapterkit.store.refs import ANY

if TYPE_CHECKING:
    from adapterkit.store.gc import GcReport
    from adapterkit.store.verify import VerifyReport

__all__ = ["CONFIG_NAME", "README_NAME", "WEIGHTS_NAME", "AdapterStore", "AddResult", "Received", "TagResult"]

#: The files of a stored adapter, named as in a PEFT folder (a PEFT folder is how the store lays an adapter out).
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
Progress = Callable[[int], None]


@dataclass(frozen=True)
class AddResult:
    digest: str
    ref: str
    #: Bytes the store did not hold before (0 when re-adding a stored adapter).
    new_bytes: int
    info: dict[str, Any] = field(default_factory=dict)
    #: The digest the ref pointed at before, when this moved it to another adapter; else None.
    previous: str | None = None


@dataclass(frozen=True)
class TagResult:
    """What :meth:`AdapterStore.update_tag` did."""

    ref: str
    digest: str
    #: The digest ``ref`` pointed at before, when this moved it to another adapter; else None.
    previous: str | None = None


@dataclass(frozen=True)
class Received:
    """What :meth:`AdapterStore.receive` did: the adapter's digest and the bytes written or already held."""

    digest: str
    received_bytes: int
    skipped_bytes: int


class AdapterStore(StoreLayout):
    """A content-addressed adapter store rooted at ``path``: blobs, manifests, refs, gc and verify.

    It stores what it is given as bytes (metadata document, PEFT config, canonical weights,
    README) and knows nothing of tensors; :class:`adapterkit.Store` adds reading and writing
    adapters through the formats.
    """

    # -- writing --------------------------------------------------------------------------------

    def publish(
        self,
        metadata_bytes: bytes,
        peft_config_bytes: bytes,
        weights_chunks: Iterable[bytes],
        readme: bytes | None,
        tag: str | None,
        message: str,
        *,
        progress: Progress | None = None,
        source: str = "adapter metadata",
    ) -> AddResult:
        """Under the writer lock: publish an adapter's objects, then point ``tag`` (``name[:tag]``) at it.

        The metadata document is validated against the schema first (a refusal names ``source``);
        ``weights_chunks`` are the canonical safetensors bytes, hashed as they are written. The
        caller (``Store.add``/``put``) has built them.
        """
        target = parse_tag_ref(tag) if tag is not None else None
        check_metadata(metadata_bytes, source)
        previous = None
        with self.writing():
            digest, new_bytes = self._commit(metadata_bytes, peft_config_bytes, weights_chunks, readme, progress)
            self._validated.add("sha256:" + hashlib.sha256(metadata_bytes).hexdigest())  # checked just above
            if target is not None:
                previous = self._set_ref(target.name, target.tag, digest, message)
            info = self.describe(digest)  # under the lock: an untagged adapter is gc-able once it is released
        ref = f"{target.name}:{target.tag}" if target else digest
        return AddResult(digest=digest, ref=ref, new_bytes=new_bytes, info=info, previous=previous)

    def _commit(
        self,
        metadata_bytes: bytes,
        peft_config_bytes: bytes,
        weights_chunks: Iterable[bytes],
        readme: bytes | None,
        progress: Progress | None = None,
    ) -> tuple[str, int]:
        """Publish blobs, then metadata, then the manifest; returns (digest, new bytes)."""
        new_bytes = 0
        layers = []
        weights = self.blobs.put(weights_chunks, progress=progress)
        for title, stored in (
            (CONFIG_NAME, self.blobs.put_bytes(peft_config_bytes)),
            (WEIGHTS_NAME, weights),
            *(((README_NAME, self.blobs.put_bytes(readme)),) if readme is not None else ()),
        ):
            layers.append(Layer(title, stored.digest, stored.size))
            new_bytes += stored.size if stored.created else 0
        meta = self.blobs.put_bytes(metadata_bytes)
        new_bytes += meta.size if meta.created else 0
        manifest = self.manifests.put_bytes(canonical_json(build_manifest(Layer("", meta.digest, meta.size), layers)))
        new_bytes += manifest.size if manifest.created else 0
        return manifest.digest, new_bytes

    def receive(
        self,
        manifest: bytes,
        fetch: Callable[[Layer], Iterable[bytes]],
        tag: str,
        message: str,
        *,
        where: str = "remote",
        inspect: Callable[[Layer, Iterable[bytes]], Iterable[bytes]] | None = None,
    ) -> Received:
        """The pull transaction: store the adapter ``manifest`` describes, then point ``tag`` at it.

        ``fetch(layer)`` yields the bytes of one blob the store lacks (a remote's download, a
        downloaded temp file); each is hashed as it is written and refused unless it matches the
        manifest, so nothing damaged ever gets a name. Under the writer lock, blobs go first, then
        the metadata is checked against the schema, then the manifest, then the ref: a pull that
        fails half-way leaves at most complete, unreferenced blobs, which a re-run reuses and
        ``gc`` otherwise collects. ``where`` names the source in messages. ``inspect(layer,
        chunks)`` may wrap each blob's verified bytes with a check of its own that raises before
        the last chunk (the public ``Store`` refuses a non-finite tensor this way): the store
        itself knows nothing of what the bytes hold.
        """
        target = parse_tag_ref(tag)
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        try:
            config, layers = parse_manifest(manifest, f"manifest {digest} from {where}")
        except IntegrityError as exc:
            raise SyncError(str(exc)) from None
        received = skipped = 0
        with self.writing():
            for layer in _unique((config, *layers)):
                if self.has_blob(layer.digest, layer.size):
                    skipped += layer.size
                    continue
                chunks: Iterable[bytes] = verified_chunks(
                    fetch(layer), layer.digest, layer.size, _mismatch(layer, where)
                )
                self.blobs.put(inspect(layer, chunks) if inspect is not None else chunks)
                received += layer.size
            try:
                _parse_metadata(self.blobs.read(config.digest, config.size), f"metadata of {digest} from {where}")
            except IntegrityError as exc:
                raise SyncError(str(exc)) from None
            if self.manifests.put_bytes(manifest).created:
                received += len(manifest)
            else:
                skipped += len(manifest)
            self._set_ref(target.name, target.tag, digest, message)
        return Received(digest, received, skipped)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        """Whether the store holds the blob ``digest`` (at ``size`` bytes, when given)."""
        try:
            found = self.blobs.path(digest).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return False
        return size is None or found == size

    def read_blob(self, digest: str, size: int | None = None, *, what: str = "blob") -> bytes:
        """The blob ``digest`` (of ``size`` bytes, when given), checked against its digest; ``what`` names it."""
        return self.blobs.read(digest, size, what=what)

    def manifest_bytes(self, digest: str) -> bytes:
        """The manifest of the adapter ``digest``, checked against its digest."""
        return self.manifests.read(digest, what=f"manifest {digest}")

    def manifest_path(self, digest: str) -> Path:
        """Where the manifest ``digest`` lives (read-only)."""
        return self.manifests.path(digest)

    def blob_path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (read-only; it may be missing: check with :meth:`has_blob`)."""
        return self.blobs.path(digest)

    def _set_ref(self, name: str, tag: str, digest: str, message: str) -> str | None:
        """Point ``name:tag`` at ``digest``; returns what it pointed at before when that was another adapter."""
        old = self.refs.update(name, tag, digest, expected=ANY, message=message)
        return old if old != digest else None

    def tag(self, ref: str, new_ref: str) -> str:
        """Point ``new_ref`` (``name[:tag]``) at the adapter ``ref`` resolves to; returns its digest."""
        return self.update_tag(ref, new_ref).digest

    def update_tag(self, ref: str, new_ref: str) -> TagResult:
        """:meth:`tag`, also saying which adapter ``new_ref`` named before when this moved it (as ``rm`` does)."""
        target = parse_tag_ref(new_ref)
        self.resolve(ref)  # fail before the store is touched; resolved again under the lock below
        with self.writing():
            digest = self.resolve(ref)  # gc cannot remove it now, until the ref is written
            previous = self._set_ref(target.name, target.tag, digest, f"tag {ref}")
        return TagResult(ref=f"{target.name}:{target.tag}", digest=digest, previous=previous)

    def remove(self, ref: str) -> str:
        """Remove the ref ``name[:tag]`` (the adapter's data stays until gc); returns its digest."""
        return self.remove_refs([ref])[0][1]

    def remove_refs(self, refs: Sequence[str]) -> list[tuple[str, str]]:
        """Remove several refs, all or none: each is checked (a ``name[:tag]`` that exists) before any goes.

        Returns ``(name:tag, digest it pointed at)`` per ref removed, in the order given (a ref
        named twice is removed once). The adapters' data stays until gc finds nothing pointing at it.
        """
        targets: dict[tuple[str, str], str] = {}
        for ref in refs:
            parsed = parse_ref(ref)
            if parsed.name is None or parsed.tag is None:
                raise InvalidReferenceError(f"{ref!r}: rm removes refs; give NAME[:TAG]")
            targets.setdefault((parsed.name, parsed.tag), ref)
        if not targets:
            return []
        if not self.initialised():
            name, tag = next(iter(targets))
            raise ReferenceNotFoundError(f"no ref {name}:{tag} in {self.root}")
        removed = []
        with self.writing():
            for name, tag in targets:
                if self.refs.read(name, tag) is None:  # a corrupt ref raises here too: nothing is removed
                    raise ReferenceNotFoundError(f"no ref {name}:{tag} in {self.root}")
            for (name, tag), ref in targets.items():
                try:
                    removed.append((f"{name}:{tag}", self.refs.delete(name, tag, message=f"rm {ref}")))
                except ReferenceNotFoundError:  # another process removed it since the check
                    raise ReferenceNotFoundError(f"no ref {name}:{tag} in {self.root}") from None
        return removed

    # -- reading --------------------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """The digest ``ref`` names: ``name[:tag]``, ``name@sha256:...``, a digest or a unique prefix."""
        self._check_format()
        parsed = parse_ref(ref)
        if parsed.digest is not None:
            if not self.manifests.exists(parsed.digest):
                raise ReferenceNotFoundError(f"no adapter {parsed.digest} in {self.root}")
            return parsed.digest
        if parsed.prefix is not None:
            return self._by_prefix(parsed.prefix, ref)
        assert parsed.name is not None and parsed.tag is not None
        digest = self.refs.read(parsed.name, parsed.tag)
        if digest is not None:
            return digest
        prefix = digest_prefix(ref)
        if prefix is not None:
            return self._by_prefix(prefix, ref)
        raise ReferenceNotFoundError(f"no adapter {parsed.name}:{parsed.tag} in {self.root}")

    def _by_prefix(self, prefix: str, ref: str) -> str:
        sub = self.manifests.root / prefix[:2]
        rest = prefix[2:]
        found = sorted(f"sha256:{prefix[:2]}{p.name}" for p in sub.glob(f"{rest}*")) if sub.is_dir() else []
        if not found:
            raise ReferenceNotFoundError(f"no adapter {ref} in {self.root}")
        if len(found) > 1:
            raise AmbiguousReferenceError(f"{ref!r} matches {len(found)} adapters; give more digits")
        return found[0]

    def manifest(self, digest: str) -> tuple[Layer, list[Layer]]:
        """(metadata blob, file layers) of the adapter ``digest``, hash-verified and schema-checked."""
        data = self.manifests.read(digest, what="manifest")
        known = digest in self._validated
        parsed = parse_manifest(data, f"manifest {digest}", known_valid=known)
        if not known:
            self._validated.add(digest)
        return parsed

    def metadata(self, digest: str) -> dict[str, Any]:
        """The metadata document of the adapter ``digest``, hash-verified and schema-checked."""
        config, _ = self.manifest(digest)
        return self._metadata_blob(digest, config)

    def _metadata_blob(self, digest: str, config: Layer) -> dict[str, Any]:
        data = self.blobs.read(config.digest, config.size, what=f"metadata of {digest}")
        known = config.digest in self._validated
        parsed = _parse_metadata(data, f"metadata of {digest}", known_valid=known)
        if not known:
            self._validated.add(config.digest)
        return parsed

    def refs_by_digest(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, tag, _ in self.refs:
            try:
                digest = self.refs.read(name, tag)
            except StoreError:
                continue  # verify reports it; listing the rest still works
            if digest:
                out.setdefault(digest, []).append(f"{name}:{tag}")
        return out

    def describe(self, digest: str, *, refs: list[str] | None = None, modules: bool = True) -> dict[str, Any]:
        """What ``show`` prints: the adapter's digest, refs, files, config and modules."""
        config, layers = self.manifest(digest)
        meta = self._metadata_blob(digest, config)
        if refs is None:
            refs = self.refs_by_digest().get(digest, [])
        info: dict[str, Any] = {
            "digest": digest,
            "refs": refs,
            "size": sum(layer.size for layer in layers),
            "files": [{"name": layer.title, "digest": layer.digest, "size": layer.size} for layer in layers],
            "peft_type": meta["peft_type"],
            "task_type": meta["task_type"],
            "r": meta["r"],
            "lora_alpha": meta["lora_alpha"],
            "use_rslora": meta["use_rslora"],
            "target_modules": meta["target_modules"],
            "num_modules": len(meta["modules"]),
            "ranks": sorted({module["r"] for module in meta["modules"]}),
            "num_parameters": meta["num_parameters"],
            "base_model": meta["base_model"],
            "lineage": meta["lineage"],
            "carried": meta["carried"],
            "extra_tensors": meta["extra_tensors"],
        }
        if modules:
            info["rank_pattern"] = meta["rank_pattern"]
            info["alpha_pattern"] = meta["alpha_pattern"]
            info["modules"] = meta["modules"]
            info["peft_config"] = meta["peft_config"]
        return info

    def show(self, ref: str) -> dict[str, Any]:
        return self.describe(self.resolve(ref))

    def list(self, pattern: str | None = None) -> list[dict[str, Any]]:
        """One summary per adapter that a ref points at, ordered by its first ref.

        ``pattern`` keeps only the refs it matches, as a shell glob (``*``, ``?``, ``[...]``; ``*``
        also matches ``/``): against ``name:tag`` when it holds a ``:`` (``*:v1``), else against the
        name (``demo/*``). An adapter is listed with its matching refs only, and not at all without one.
        """
        if not self.root.exists():
            return []
        self._check_format()
        by_digest = self.refs_by_digest()
        if pattern is not None:
            matching = {digest: [ref for ref in refs if _matches(ref, pattern)] for digest, refs in by_digest.items()}
            by_digest = {digest: refs for digest, refs in matching.items() if refs}
        out = []
        for digest, refs in by_digest.items():
            try:
                out.append(self.describe(digest, refs=refs, modules=False))
            except AdapterkitError as exc:
                out.append({"digest": digest, "refs": refs, "error": str(exc)})
        return sorted(out, key=lambda item: item["refs"])

    def weights(self, digest: str, *, writable: bool = False) -> bytes:
        """The canonical safetensors bytes of the adapter ``digest``, checked against their digest
        (in a ``bytearray`` that tensors can share without a copy when ``writable``)."""
        _, layers = self.manifest(digest)
        weights = next(layer for layer in layers if layer.title == WEIGHTS_NAME)
        return self.blobs.read(weights.digest, weights.size, what=f"weights of {digest}", writable=writable)

    def export_files(self, ref: str, dest: str | os.PathLike[str], *, progress: Progress | None = None) -> Path:
        """Write the adapter's stored files (a PEFT folder) at ``dest``, byte-identical to its blobs."""
        digest = self.resolve(ref)
        _, layers = self.manifest(digest)
        out = Path(dest)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InvalidInputError(f"{out}: already exists and is not an empty directory")
        staging = out.parent / f".{out.name}.adapterkit-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir(parents=True)
            for layer in layers:
                _copy_verified(self.blobs.path(layer.digest), staging / layer.title, layer, progress)
            if out.exists():
                out.rmdir()
            os.replace(staging, out)
        except OSError as exc:
            raise StoreError(f"cannot export to {out}: {exc.strerror or exc}") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return out

    def reflog(self, ref: str) -> list[dict[str, Any]]:
        parsed = parse_tag_ref(ref)
        return [
            {"old": e.old, "new": e.new, "time": e.time, "message": e.message}
            for e in self.refs.reflog(parsed.name, parsed.tag)
        ]

    def history(self, ref: str) -> list[dict[str, Any]]:
        """What ``adapterkit log`` prints: every change of the ref ``name[:tag]``, newest first, from its reflog.

        Each entry has ``ref``, ``digest`` (what the ref pointed at after the change; None when it
        was removed), ``previous`` (before it; None when it was created), ``time`` (Unix seconds)
        and ``operation`` (the command that made it, such as ``add PATH`` or ``tag REF``). A
        removed ref keeps its history until its reflog is deleted.
        """
        parsed = parse_tag_ref(ref)
        self._check_format()
        name = f"{parsed.name}:{parsed.tag}"
        entries = [
            {"ref": name, "digest": e.new, "previous": e.old, "time": e.time, "operation": e.message}
            for e in self.refs.reflog(parsed.name, parsed.tag)
        ]
        if not entries:
            raise ReferenceNotFoundError(f"no history for ref {name} in {self.root}")
        return entries[::-1]

    # -- maintenance ------------------------------------------------------------------------------

    def verify(self, *, full: bool = False, progress: Progress | None = None) -> VerifyReport:
        """Re-hash and check everything; corrupt objects are moved to ``corrupt/`` and reported."""
        from adapterkit.store.verify import verify_store

        try:
            return verify_store(self, full=full, progress=progress)
        except OSError as exc:
            raise StoreError(f"cannot verify store {self.root}: {exc.strerror or exc}") from None

    def gc(self, *, grace: float = 86400.0, dry_run: bool = False) -> GcReport:
        """Remove what no ref or recent reflog entry reaches, once older than ``grace`` seconds."""
        from adapterkit.store.gc import collect

        try:
            return collect(self, grace=grace, dry_run=dry_run)
        except OSError as exc:
            raise StoreError(f"cannot gc store {self.root}: {exc.strerror or exc}") from None


def _matches(ref: str, pattern: str) -> bool:
    """Whether ``name:tag`` matches the glob ``pattern`` (see :meth:`Store.list`)."""
    return fnmatch.fnmatchcase(ref if ":" in pattern else ref.rsplit(":", 1)[0], pattern)


def _copy_verified(source: Path, target: Path, layer: Layer, progress: Progress | None) -> None:
    def corrupt(_size: int, _digest: str) -> Exception:
        return IntegrityError(f"blob {layer.digest} ({layer.title}) is corrupt (run `adapterkit verify`)")

    try:
        with source.open("rb") as src, target.open("wb") as dst:
            for chunk in verified_chunks(_file_chunks(src), layer.digest, layer.size, corrupt, progress):
                dst.write(chunk)
    except FileNotFoundError:
        raise ReferenceNotFoundError(f"blob {layer.digest} ({layer.title}) is missing from the store") from None


def _file_chunks(fh: Any, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := fh.read(size):
        yield chunk


def _unique(layers: Iterable[Layer]) -> list[Layer]:
    seen: dict[str, Layer] = {}
    for layer in layers:
        seen.setdefault(layer.digest, layer)
    return list(seen.values())


def _mismatch(layer: Layer, where: str) -> Callable[[int, str], Exception]:
    def error(size: int, got: str) -> Exception:
        if size > layer.size:
            return SyncError(
                f"{where}: {layer.digest} sent more than the {layer.size} bytes its manifest gives; "
                "the remote copy is damaged, nothing was stored for it"
            )
        return SyncError(
            f"{where}: {layer.digest} arrived as {size} bytes hashing to {got}; the remote copy is corrupt "
            "(or was changed in transit), nothing was stored for it"
        )

    return error
