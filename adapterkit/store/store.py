"""The local store: adapters as content-addressed blobs, manifests and ``name:tag`` refs.

Layout (documented in docs/store-format.md)::

    <root>/store.json                       {"format": "adapterkit-store", "version": 1}
    <root>/blobs/sha256/<2>/<62>            files of adapters and their metadata, read-only
    <root>/manifests/sha256/<2>/<62>        one manifest per adapter; its sha256 is the adapter's digest
    <root>/refs/<name>/_tags/<tag>          "sha256:<hex>\\n"
    <root>/logs/<name>/_tags/<tag>          reflog: "<old> <new> <unix time> <message>" per line
    <root>/locks/gc.lock gc.turnstile       the store-wide lock (writers shared, gc exclusive) and its queue
    <root>/locks/refs/<hash>.lock           one per ref, for compare-and-swap
    <root>/tmp/                             temp files, named "<pid>-<uuid>.<kind>"; gc removes stale ones
    <root>/corrupt/ state/                  objects verify moved aside; verify's hash cache

Writes go blobs, then metadata, then manifest, then reflog line, then ref, each published
atomically, all under the gc lock held shared, so a reader or a crash never sees a ref to
something incomplete, and a killed writer leaves at most temp files and unreferenced objects.
This module never imports torch; only ``get`` (which returns tensors) and ``.bin`` imports do.

Nothing is created until the first write: reading, ``verify`` or ``gc`` on a path that holds no
store leave it untouched, so pointing ``--store`` at the wrong directory cannot litter it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import (
    AdapterFormatError,
    AdapterkitError,
    AmbiguousReferenceError,
    BaseModelError,
    InvalidInputError,
    InvalidReferenceError,
    ReferenceNotFoundError,
    StoreError,
)
from adapterkit.fingerprint import fingerprint, read_base_config, resolve_target, tied_embedding
from adapterkit.lora_config import ModuleSpec, describe_modules, validate_lora_config
from adapterkit.peft_io import CONFIG_NAME, README_NAME, WEIGHTS_NAME, AdapterFolder, config_bytes, open_folder
from adapterkit.safetensors_io import TensorScan, iter_canonical_bytes, scanned
from adapterkit.store.documents import Layer, build_manifest, build_metadata, canonical_json, parse_manifest
from adapterkit.store.documents import parse_metadata as _parse_metadata
from adapterkit.store.fsutil import replace_atomic
from adapterkit.store.locks import gc_lock
from adapterkit.store.names import Ref, digest_prefix, parse_ref, parse_tag_ref
from adapterkit.store.objects import ObjectDir
from adapterkit.store.refs import ANY, RefStore
from adapterkit.store.validated import ValidatedDigests

if TYPE_CHECKING:
    from adapterkit.lora import Adapter
    from adapterkit.store.gc import GcReport
    from adapterkit.store.verify import VerifyReport

__all__ = ["STORE_FORMAT_VERSION", "AddResult", "Store", "TagResult", "default_store_path"]

STORE_FORMAT_VERSION = 1
#: What a first writer killed before ``store.json`` appeared can leave behind (see ``writing``).
_BOOTSTRAP_ENTRIES = frozenset({"locks", "tmp"})
Progress = Callable[[int], None]


def default_store_path() -> Path:
    """``$ADAPTERKIT_HOME``, else ``~/.adapterkit``."""
    env = os.environ.get("ADAPTERKIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".adapterkit"


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
    """What :meth:`Store.update_tag` did."""

    ref: str
    digest: str
    #: The digest ``ref`` pointed at before, when this moved it to another adapter; else None.
    previous: str | None = None


class Store:
    """A content-addressed adapter store rooted at ``path``."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, lock_timeout: float = 60.0) -> None:
        self.root = Path(path).expanduser() if path is not None else default_store_path()
        self.tmp = self.root / "tmp"
        self.blobs = ObjectDir(self.root / "blobs" / "sha256", self.tmp)
        self.manifests = ObjectDir(self.root / "manifests" / "sha256", self.tmp)
        self.refs = RefStore(self.root, self.tmp, lock_timeout)
        self._validated = ValidatedDigests(self.root)
        self.lock_timeout = lock_timeout
        self._checked_format = False

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- layout -------------------------------------------------------------------------------

    def initialised(self) -> bool:
        """Whether a store was ever written here (``store.json`` exists)."""
        self._check_format()
        return (self.root / "store.json").is_file()

    def _check_format(self) -> None:
        """Refuse a store of another format version, or a directory that is not a store at all."""
        if self._checked_format:
            return
        marker = self.root / "store.json"
        try:
            doc = json.loads(marker.read_text("utf-8"))
            version = doc["version"]
        except FileNotFoundError:
            version = None
        except (ValueError, KeyError, TypeError, RecursionError):
            raise StoreError(f"{marker}: unreadable store marker; is {self.root} an adapterkit store?") from None
        except OSError as exc:
            raise StoreError(f"{marker}: cannot read ({exc.strerror or exc})") from None
        if version is not None and version != STORE_FORMAT_VERSION:
            raise StoreError(
                f"{self.root}: store format version {version}; this adapterkit reads version {STORE_FORMAT_VERSION}"
            )
        if version is None:
            try:
                foreign = self.root.exists() and any(p.name not in _BOOTSTRAP_ENTRIES for p in self.root.iterdir())
            except OSError as exc:
                raise StoreError(f"{self.root}: cannot be used as a store ({exc.strerror or exc})") from None
            if foreign and marker.is_file():
                return self._check_format()  # a concurrent first writer created the store meanwhile
            if foreign:
                raise StoreError(f"{self.root}: exists, is not empty and is not an adapterkit store (no store.json)")
        self._checked_format = version is not None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """The writer lock: hold it while publishing objects and refs (remotes that pull do).

        Writers hold the gc lock shared, so gc (exclusive) never sweeps what a writer is publishing.

        A new store gets its ``store.json`` under that lock: before it, a concurrent gc could sweep
        the marker's temp file; and a first writer killed half-way leaves only ``locks/`` and
        ``tmp/``, which ``_check_format`` still accepts as an empty store.
        """
        self._check_format()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with gc_lock(self.root / "locks", exclusive=False, timeout=self.lock_timeout):
                marker = self.root / "store.json"
                if not marker.exists():
                    document = {"format": "adapterkit-store", "version": STORE_FORMAT_VERSION}
                    replace_atomic(marker, canonical_json(document) + b"\n", self.tmp)
                    self._checked_format = True
                yield
        except OSError as exc:
            raise StoreError(f"cannot write to store {self.root}: {exc.strerror or exc}") from None

    # -- writing --------------------------------------------------------------------------------

    def add(
        self,
        path: str | os.PathLike[str],
        tag: str | None = None,
        *,
        base: str | os.PathLike[str] | None = None,
        base_content: bool = False,
        progress: Progress | None = None,
    ) -> AddResult:
        """Import the PEFT adapter folder at ``path`` and point ``tag`` (``name[:tag]``) at it.

        With ``base``, the base model's fingerprint is recorded and every module is checked
        against the base's tensors; ``base_content`` also records the base's content digest
        (which reads every byte of the base), so that adapters for two bases of one architecture
        but different weights are told apart. Re-adding an adapter writes nothing new and
        returns the same digest.

        A tensor holding NaN or infinity is refused (:class:`~adapterkit.errors.NonFiniteError`,
        checked while the weights are hashed); an adapter whose every module is zero is stored,
        with a warning.
        """
        target = parse_tag_ref(tag) if tag is not None else None
        folder = open_folder(path)
        if folder.is_bin:
            weights_chunks, shapes, st_metadata = _bin_weights(folder)
        else:
            assert folder.header is not None
            shapes = {name: (t.dtype, t.shape) for name, t in folder.header.tensors.items()}
            weights_chunks = iter_canonical_bytes(folder.weights_path, folder.header)
            st_metadata = folder.header.metadata
        modules, extras, prefix = folder.describe(shapes)
        # Checked in the pass that hashes the weights: a NaN or infinity is refused before the blob is published.
        scan = TensorScan(str(folder.weights_path))
        weights_chunks = scanned(weights_chunks, scan)
        base_model = _base_model_entry(folder.config, modules, base, content=base_content)
        metadata = build_metadata(
            peft_config=folder.config,
            modules=modules,
            extra_tensors=extras,
            safetensors_metadata=st_metadata,
            base_model=base_model,
            source=str(folder.path / CONFIG_NAME),
        )
        # Serialised before anything is written: a document JSON cannot hold (NaN, Infinity) is refused up front.
        metadata_bytes = canonical_json(metadata, source=str(folder.path / CONFIG_NAME))
        peft_config = config_bytes(folder.config)
        try:
            readme = folder.readme.read_bytes() if folder.readme else None
        except OSError as exc:
            raise AdapterFormatError(f"{folder.readme}: cannot read ({exc.strerror or exc})") from None
        result = self._publish(
            metadata_bytes, peft_config, weights_chunks, readme, target, f"add {folder.path}", progress=progress
        )
        zero = scan.zero_tensors
        if modules and all(spec.a_key(prefix) in zero or spec.b_key(prefix) in zero for spec in modules):
            warnings.warn(
                f"adapterkit: {folder.path}: every module's lora_B (or lora_A) is all zeros, so this adapter "
                "changes nothing (saved before training?)",
                stacklevel=2,
            )
        return result

    def put(self, adapter: Adapter, tag: str | None = None, *, message: str = "put") -> AddResult:
        """Store an in-memory adapter (a blend from ``compose``, or one loaded and edited).

        Its ``metadata`` may carry ``base_model`` and ``lineage``; they become part of the digest.
        The config is re-resolved against the tensors first, so what is stored is exactly what
        PEFT will load: a config that would give a module another scaling is refused.
        """
        from adapterkit.lora import dtype_name
        from adapterkit.peft_io import tensors_to_bytes

        target = parse_tag_ref(tag) if tag is not None else None
        tensors = adapter.state_dict()
        shapes = {key: (dtype_name(t, key), tuple(t.shape)) for key, t in tensors.items()}
        validate_lora_config(adapter.config, "adapter config")
        modules, extras, _ = describe_modules(adapter.config, shapes, "adapter")
        for spec in modules:
            own = adapter.modules[spec.name].spec.scaling
            if not math.isclose(spec.scaling, own, rel_tol=1e-12):
                raise AdapterFormatError(
                    f"adapter config gives module {spec.name!r} scaling {spec.scaling:g}, but the module has {own:g}"
                )
        given = adapter.metadata or {}
        metadata = build_metadata(
            peft_config=adapter.config,
            modules=modules,
            extra_tensors=extras,
            safetensors_metadata=given.get("safetensors_metadata") or {},
            base_model=given.get("base_model"),
            lineage=given.get("lineage"),
            source="adapter metadata",
        )
        metadata_bytes = canonical_json(metadata, source="adapter metadata")
        peft_config = config_bytes(adapter.config)
        weights = tensors_to_bytes(tensors)
        scan = TensorScan("the adapter to store")
        return self._publish(metadata_bytes, peft_config, scanned([weights], scan), None, target, message)

    def _publish(
        self,
        metadata_bytes: bytes,
        peft_config_bytes: bytes,
        weights_chunks: Any,
        readme: bytes | None,
        target: Ref | None,
        message: str,
        *,
        progress: Progress | None = None,
    ) -> AddResult:
        """Under the writer lock: publish the adapter's objects, then point ``target`` at it."""
        previous = None
        with self.writing():
            digest, new_bytes = self._commit(metadata_bytes, peft_config_bytes, weights_chunks, readme, progress)
            if target is not None:
                previous = self._set_ref(target.name, target.tag, digest, message)
            info = self.describe(digest)  # under the lock: an untagged adapter is gc-able once it is released
        ref = f"{target.name}:{target.tag}" if target else digest
        return AddResult(digest=digest, ref=ref, new_bytes=new_bytes, info=info, previous=previous)

    def _commit(
        self,
        metadata_bytes: bytes,
        peft_config_bytes: bytes,
        weights_chunks: Any,
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

    def get(self, ref: str) -> Adapter:
        """Load the adapter ``ref`` names into memory (every byte checked against its digest)."""
        from safetensors.torch import load as load_safetensors

        from adapterkit.lora import Adapter

        digest = self.resolve(ref)
        config, layers = self.manifest(digest)
        files = {layer.title: layer for layer in layers}
        meta = self._metadata_blob(digest, config)
        weights = files[WEIGHTS_NAME]
        tensors = load_safetensors(self.blobs.read(weights.digest, weights.size, what=f"weights of {digest}"))
        adapter = Adapter.from_state_dict(meta["peft_config"], tensors, f"weights of {digest}")
        adapter.metadata = meta
        adapter.digest = digest
        return adapter

    def export(self, ref: str, dest: str | os.PathLike[str], *, progress: Progress | None = None) -> Path:
        """Write the adapter as a PEFT folder at ``dest``, byte-identical to its stored blobs."""
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
    import hashlib

    hasher = hashlib.sha256()
    size = 0
    try:
        with source.open("rb") as src, target.open("wb") as dst:
            while chunk := src.read(1 << 20):
                hasher.update(chunk)
                dst.write(chunk)
                size += len(chunk)
                if progress:
                    progress(len(chunk))
    except FileNotFoundError:
        raise ReferenceNotFoundError(f"blob {layer.digest} ({layer.title}) is missing from the store") from None
    if size != layer.size or "sha256:" + hasher.hexdigest() != layer.digest:
        from adapterkit.errors import IntegrityError

        raise IntegrityError(f"blob {layer.digest} ({layer.title}) is corrupt (run `adapterkit verify`)")


def _bin_weights(folder: AdapterFolder) -> tuple[list[bytes], dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    from adapterkit.lora import dtype_name
    from adapterkit.peft_io import load_bin, tensors_to_bytes

    tensors = load_bin(folder.weights_path)
    shapes = {key: (dtype_name(t, key), tuple(t.shape)) for key, t in tensors.items()}
    return [tensors_to_bytes(tensors)], shapes, {}


def _base_model_entry(
    config: dict[str, Any], modules: list[ModuleSpec], base: str | os.PathLike[str] | None, *, content: bool = False
) -> dict[str, Any] | None:
    name = config.get("base_model_name_or_path")
    revision = config.get("revision")
    if base is None:
        if content:
            raise InvalidInputError("recording the base's content digest needs the base model folder (--base)")
        if name is None:
            return None
        return {"name": str(name), "revision": revision, "structure_digest": None}
    fp = fingerprint(base, content=content)
    tied = tied_embedding(fp.tensors, read_base_config(base))  # an lm_head tied to the embedding is not stored
    for module in modules:
        key, _ = resolve_target(module.name, fp.tensors, tied)
        if key is None:
            raise BaseModelError(f"{base}: has no weight for adapter module {module.name!r}")
        shape = fp.tensors[key][1]
        if shape != module.base_shape:
            raise BaseModelError(
                f"{base}: {key} is {list(shape)} but adapter module {module.name!r} changes a "
                f"{list(module.base_shape)} weight"
            )
    entry = {
        "name": str(name) if name is not None else None,
        "revision": revision,
        "structure_digest": fp.structure_digest,
    }
    if fp.content_digest is not None:
        entry["content_digest"] = fp.content_digest
    return entry
