"""The store as users see it: adapters come in and go out through the formats, kept by the torch-free store.

:class:`Store` adds to :class:`~adapterkit.store.AdapterStore` everything that needs to know what
an adapter is: which registered format reads a path, the module table and metadata document built
from its config, the check of every module against a base model, loading tensors back, and
exporting through a format. The bytes, digests, refs, gc and verify stay below, in ``store/``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.config import ModuleSpec
from adapterkit.adapter.extras import extras_by_kind, token_counts
from adapterkit.adapter.metadata import build_metadata
from adapterkit.base_model import BaseModel, open_base
from adapterkit.errors import BaseModelError, InvalidInputError, UnknownFormatError
from adapterkit.files.safetensors import TensorScan, scanned
from adapterkit.formats.base import AdapterFiles, ExportResult, Format
from adapterkit.plugins import Plugins, get_plugins
from adapterkit.store import AdapterStore, AddResult, Layer, Received, parse_tag_ref
from adapterkit.store.documents import canonical_json
from adapterkit.store.store import README_NAME, WEIGHTS_NAME, Progress

if TYPE_CHECKING:
    from adapterkit.adapter.model import Adapter

__all__ = ["Store", "find_format"]

#: The format ``add`` falls back to when none recognises a path, so its own error says what is missing.
DEFAULT_FORMAT = "peft"


def find_format(name: str | None = None, path: Path | None = None, *, plugins: Plugins | None = None) -> Format:
    """The format registered as ``name``; else the first that recognises ``path`` (built-ins first)."""
    formats = (plugins or get_plugins()).formats()
    if name is not None:
        if name not in formats:
            raise UnknownFormatError(f"unknown format {name!r}; available: {', '.join(sorted(formats))}")
        return formats[name]
    if path is not None:
        for candidate in formats.values():
            if candidate.can_read and candidate.recognizes(path):
                return candidate
    return formats[DEFAULT_FORMAT]


class Store(AdapterStore):
    """A content-addressed adapter store rooted at ``path`` (default ``$ADAPTERKIT_HOME``, else ``~/.adapterkit``)."""

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, lock_timeout: float = 60.0, plugins: Plugins | None = None
    ) -> None:
        super().__init__(path, lock_timeout=lock_timeout)
        self._plugins = plugins

    def add(
        self,
        path: str | os.PathLike[str],
        tag: str | None = None,
        *,
        base: str | os.PathLike[str] | BaseModel | None = None,
        base_content: bool = False,
        format: str | None = None,
        message: str | None = None,
        progress: Progress | None = None,
    ) -> AddResult:
        """Import the adapter at ``path`` and point ``tag`` (``name[:tag]``) at it.

        The format is the one named, else the first registered format that recognises ``path``.
        With ``base``, the base model's fingerprint is recorded and every module is checked
        against the base's tensors; ``base_content`` also records the base's content digest
        (which reads every byte of the base), so that adapters for two bases of one architecture
        but different weights are told apart. Re-adding an adapter writes nothing new and
        returns the same digest.

        A tensor holding NaN or infinity is refused (:class:`~adapterkit.errors.NonFiniteError`,
        checked while the weights are hashed); an adapter whose every module is zero is stored,
        with a warning.
        """
        source = Path(path)
        if tag is not None:
            parse_tag_ref(tag)  # a bad tag is refused before the adapter is read
        files = find_format(format, source, plugins=self._plugins).read(source)
        base_model = _base_model_entry(files.config, files.modules, base, content=base_content)
        scan = TensorScan(files.weights_source)
        result = self._store(files, base_model, None, tag, message or f"add {source}", progress, scan)
        zero = scan.zero_tensors
        prefix = files.key_prefix
        if files.modules and all(m.a_key(prefix) in zero or m.b_key(prefix) in zero for m in files.modules):
            warnings.warn(
                f"adapterkit: {source}: every module's lora_B (or lora_A) is all zeros, so this adapter "
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
        given = adapter.metadata or {}
        files = AdapterFiles.from_adapter(adapter, source="adapter")
        scan = TensorScan("the adapter to store")
        return self._store(files, given.get("base_model"), given.get("lineage"), tag, message, None, scan)

    def _store(
        self,
        files: AdapterFiles,
        base_model: dict[str, Any] | None,
        lineage: dict[str, Any] | None,
        tag: str | None,
        message: str,
        progress: Progress | None = None,
        scan: TensorScan | None = None,
    ) -> AddResult:
        """Build the metadata document of ``files`` and publish them; one path for ``add`` and ``put``.

        ``scan`` looks at the weights as they are hashed: a NaN or infinity is refused before the blob
        is published, so no non-finite tensor is ever stored.
        """
        from adapterkit.formats.peft import config_bytes

        metadata = build_metadata(
            peft_config=files.config,
            modules=files.modules,
            extra_tensors=files.extra_tensors,
            safetensors_metadata=files.safetensors_metadata,
            base_model=base_model,
            lineage=lineage,
        )
        # Serialised before anything is written: a document JSON cannot hold (NaN, Infinity) is refused up front.
        metadata_bytes = canonical_json(metadata, source=files.source)
        readme = files.files.get(README_NAME)
        weights = files.weights() if scan is None else scanned(files.weights(), scan)
        peft_config = config_bytes(files.config)
        return self.publish(
            metadata_bytes, peft_config, weights, readme, tag, message, progress=progress, source=files.source
        )

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
        """The store's pull transaction (:meth:`AdapterStore.receive`), refusing a non-finite tensor in the weights.

        The scan is deferred to the end of the download, so that a damaged download is reported as
        damaged (its digest does not match) rather than as the NaN its damage may look like.
        """

        def scan_weights(layer: Layer, chunks: Iterable[bytes]) -> Iterable[bytes]:
            if inspect is not None:
                chunks = inspect(layer, chunks)
            if layer.title != WEIGHTS_NAME:
                return chunks
            return scanned(chunks, TensorScan(f"{where}: {WEIGHTS_NAME}", defer=True))

        return super().receive(manifest, fetch, tag, message, where=where, inspect=scan_weights)

    def describe(self, digest: str, *, refs: list[str] | None = None, modules: bool = True) -> dict[str, Any]:
        """What ``show`` prints; with ``modules``, also ``extras``: what the weights file holds beyond the factors.

        ``extras`` maps each kind of extra tensor (:data:`adapterkit.adapter.extras.EXTRA_KINDS`:
        DoRA magnitude vectors, lora_B biases, ``modules_to_save`` copies, trained biases, trainable
        tokens, PEFT's copies of base layers) to ``{"modules": [...]}``, the modules carrying it,
        with ``"tokens": {module: count}`` for trainable tokens. Read from the key names the
        metadata records, so ``show`` stays torch-free and reads no weights.
        """
        info = super().describe(digest, refs=refs, modules=modules)
        if modules:
            config = info["peft_config"]
            extras: dict[str, Any] = {
                kind: {"modules": names} for kind, names in extras_by_kind(info["extra_tensors"], config).items()
            }
            if "trainable_tokens" in extras:
                extras["trainable_tokens"]["tokens"] = token_counts(config, extras["trainable_tokens"]["modules"])
            info["extras"] = extras
        return info

    def get(self, ref: str) -> Adapter:
        """Load the adapter ``ref`` names into memory (every byte checked against its digest).

        The tensors share one buffer the weights were read into, so the weights are held once.
        """
        from adapterkit.adapter.model import Adapter, tensors_from_buffer

        digest = self.resolve(ref)
        meta = self.metadata(digest)
        tensors = tensors_from_buffer(self.weights(digest, writable=True), f"weights of {digest}")
        adapter = Adapter.from_state_dict(meta["peft_config"], tensors, f"weights of {digest}")
        adapter.metadata = meta
        adapter.digest = digest
        return adapter

    def export(
        self,
        ref: str,
        dest: str | os.PathLike[str],
        *,
        format: str = DEFAULT_FORMAT,
        progress: Progress | None = None,
        **options: Any,
    ) -> ExportResult:
        """Write the adapter ``ref`` names at ``dest`` in ``format`` (default: a PEFT folder).

        ``peft`` with no options copies the stored files byte for byte (the store keeps an adapter
        as a PEFT folder); any other format, or options, load the adapter and hand it to the
        format's writer, which checks its options first.
        """
        chosen = find_format(format, plugins=self._plugins)
        try:
            checked = chosen.check_options(options)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        if chosen.name == DEFAULT_FORMAT and not {k: v for k, v in checked.items() if v is not None}:
            out = self.export_files(ref, dest, progress=progress)
            return ExportResult(path=out, files=sorted(p for p in out.iterdir()))
        out = Path(dest)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InvalidInputError(f"{out}: already exists and is not an empty directory")
        return chosen.write(self.get(ref), out, **checked)


def _base_model_entry(
    config: dict[str, Any],
    modules: list[ModuleSpec],
    base: str | os.PathLike[str] | BaseModel | None,
    *,
    content: bool = False,
) -> dict[str, Any] | None:
    name = config.get("base_model_name_or_path")
    revision = config.get("revision")
    if base is None:
        if content:
            raise InvalidInputError("recording the base's content digest needs the base model folder (--base)")
        if name is None:
            return None
        return {"name": str(name), "revision": revision, "structure_digest": None}
    model = open_base(base)
    for module in modules:
        key, _ = model.resolve(module.name)  # an lm_head tied to the embedding is not stored
        if key is None:
            raise BaseModelError(f"{model.path}: has no weight for adapter module {module.name!r}")
        shape = model.tensors[key][1]
        if shape != module.base_shape:
            raise BaseModelError(
                f"{model.path}: {key} is {list(shape)} but adapter module {module.name!r} changes a "
                f"{list(module.base_shape)} weight"
            )
    entry = {
        "name": str(name) if name is not None else None,
        "revision": revision,
        "structure_digest": model.structure_digest,
    }
    if content:
        entry["content_digest"] = model.content_digest
    return entry
