"""A base model folder opened once, and its fingerprint, read from safetensors headers.

:class:`BaseModel` reads every shard's header, the index, ``config.json`` and the tied
embedding once; adding an adapter with ``--base``, fingerprinting, merging and checking an
adapter against a base all take that one object instead of reading the folder again.

``structure_digest`` hashes the sorted (tensor name, dtype, shape) list: it is instant for any
model size (only headers are read) and the same however the model is sharded, which is exactly
what decides whether an adapter fits a base. ``content_digest`` additionally hashes every
tensor's bytes, for when "the same architecture" is not enough.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterFormatError, BaseModelError
from adapterkit.files.safetensors import Header, read_header

__all__ = [
    "INDEX_NAME",
    "INPUT_EMBEDDINGS",
    "OUTPUT_EMBEDDINGS",
    "BaseFingerprint",
    "BaseModel",
    "Shapes",
    "base_weight_key",
    "fingerprint",
    "input_embedding",
    "is_vocabulary_tensor",
    "open_base",
    "read_base_config",
    "read_base_headers",
    "resolve_target",
    "structure_digest",
    "tied_embedding",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BaseFingerprint:
    """What adapterkit knows of a base model from its safetensors files."""

    structure_digest: str
    #: tensor name -> (dtype, shape), across all shards.
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    content_digest: str | None = None


def read_base_headers(base_dir: str | os.PathLike[str]) -> dict[Path, Header]:
    """The header of every safetensors shard of the model in ``base_dir``."""
    base = Path(base_dir)
    if not base.is_dir():
        raise BaseModelError(f"{base}: not a directory (expected a model folder)")
    index_path = base / INDEX_NAME
    if index_path.is_file():
        shards = _shards_from_index(index_path)
    elif (base / SINGLE_NAME).is_file():
        shards = {SINGLE_NAME: None}
    else:
        found = sorted(p.name for p in base.glob("*.safetensors"))
        if not found:
            raise BaseModelError(
                f"{base}: no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); re-save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        shards = dict.fromkeys(found)
    headers: dict[Path, Header] = {}
    owner: dict[str, str] = {}
    for shard, expected in shards.items():
        path = base / shard
        if not path.is_file():
            raise BaseModelError(f"{index_path}: lists shard {shard!r}, which is missing")
        try:
            header = read_header(path)
        except AdapterFormatError as exc:
            raise BaseModelError(str(exc)) from None
        for name in header.tensors:
            if name in owner:
                raise BaseModelError(f"{base}: tensor {name!r} is in both {owner[name]} and {shard}")
            owner[name] = shard
        if expected is not None and set(header.tensors) != expected:
            raise BaseModelError(f"{index_path}: weight_map does not match the tensors in {shard}")
        headers[path] = header
    return headers


def _shards_from_index(index_path: Path) -> dict[str, set[str]]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except OSError as exc:
        raise BaseModelError(f"{index_path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise BaseModelError(f"{index_path}: not a safetensors index (no weight_map object)") from None
    shards: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
            raise BaseModelError(f"{index_path}: tensor {tensor!r} maps to an invalid shard name {shard!r}")
        shards.setdefault(shard, set()).add(tensor)
    return dict(sorted(shards.items()))


def _digest(items: list[list[object]]) -> str:
    raw = json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _content_digest(headers: Mapping[Path, Header]) -> str:
    rows = []
    for path, header in headers.items():
        with path.open("rb") as fh:
            for name, info in header.tensors.items():
                fh.seek(header.data_start + info.begin)
                hasher = hashlib.sha256()
                remaining = info.nbytes
                while remaining:
                    chunk = fh.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise BaseModelError(f"{path}: truncated while hashing {name!r}")
                    hasher.update(chunk)
                    remaining -= len(chunk)
                rows.append([name, info.dtype, list(info.shape), hasher.hexdigest()])
    return _digest(sorted(rows))


def fingerprint(base: str | os.PathLike[str] | BaseModel, *, content: bool = False) -> BaseFingerprint:
    """Fingerprint the model in ``base`` (a folder or an opened :class:`BaseModel`); ``content=True`` also
    hashes every tensor's bytes."""
    model = base if isinstance(base, BaseModel) else BaseModel.open(base)
    return model.fingerprint(content=content)


def base_weight_key(module: str, tensors: dict[str, tuple[str, tuple[int, ...]]], param: str = "weight") -> str | None:
    """The base tensor holding parameter ``param`` of module ``module`` (its weight: what a LoRA changes), or None.

    PEFT names modules by their path in the model it wrapped (``model.layers.0.q_proj`` for a
    causal LM), while the base may have been saved with or without the task head's wrapper, so
    the module path may carry one leading component more or fewer than the tensor names.
    """
    candidates = [f"{module}.{param}"]
    _, _, rest = module.partition(".")
    if rest:
        candidates.append(f"{rest}.{param}")
    for candidate in candidates:
        if candidate in tensors:
            return candidate
    suffix = f".{module}.{param}"
    matches = [name for name in tensors if name.endswith(suffix)]
    return matches[0] if len(matches) == 1 else None


def structure_digest(tensors: Shapes) -> str:
    """The structure fingerprint of a tensor table: the digest of its sorted ``[name, dtype, shape]`` rows."""
    return _digest([[name, dtype, list(shape)] for name, (dtype, shape) in sorted(tensors.items())])


def is_vocabulary_tensor(name: str, tensors: Shapes) -> bool:
    """Whether ``name`` has one row per token: the input embedding or an output layer (``lm_head``)."""
    module = name.rsplit(".", 1)[0]
    return name == input_embedding(tensors) or module.rsplit(".", 1)[-1] in OUTPUT_EMBEDDINGS


#: Output layers that transformers drops from the checkpoint when they are tied to the input embedding.
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
#: Where common causal-LM layouts keep the input embedding (Llama/Mistral/Qwen, GPT-2, BLOOM, GPT-NeoX, ...).
INPUT_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
#: tensor name -> (dtype, shape), as :func:`fingerprint` lists a base's tensors.
Shapes = dict[str, tuple[str, tuple[int, ...]]]


def read_base_config(base_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The base's ``config.json``, or None when it has none."""
    path = Path(base_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BaseModelError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise BaseModelError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise BaseModelError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise BaseModelError(f"{path}: not a JSON object")
    return doc


def input_embedding(tensors: Shapes) -> str | None:
    """The base's input embedding tensor, when exactly one tensor has a known embedding name."""
    found = [name for name in tensors if any(name == s or name.endswith("." + s) for s in INPUT_EMBEDDINGS)]
    return found[0] if len(found) == 1 else None


def tied_embedding(tensors: Shapes, config: Mapping[str, Any] | None) -> str | None:
    """The stored tensor that serves as both input and output embedding, or None when they are separate.

    transformers saves a tied output layer not at all, so a base is tied when its config says so
    (transformers' default is tied) and no output layer is stored.
    """
    if config is not None and config.get("tie_word_embeddings", True) is False:
        return None
    if any(name.rsplit(".", 2)[-2] in OUTPUT_EMBEDDINGS for name in tensors if "." in name):
        return None  # the output layer is stored on its own
    return input_embedding(tensors)


def resolve_target(module: str, tensors: Shapes, tied: str | None) -> tuple[str | None, bool]:
    """``(base tensor, reached through the tie)`` for a LoRA module path."""
    key = base_weight_key(module, tensors)
    if key is not None:
        return key, False
    if tied is not None and module.rsplit(".", 1)[-1] in OUTPUT_EMBEDDINGS:
        return tied, True
    return None, False


class BaseModel:
    """A base model folder, opened once: shard headers, index, config, tensors, tied embedding, fingerprint.

    Only headers and small JSON files are read; tensor data is read where a caller asks for it
    (``content_digest``, the merge). ``config`` is None when the folder has none, or when it cannot
    be read (``config_error`` then says why, and :meth:`require_config` raises it): a merge that
    copies ``config.json`` unchanged does not need to understand it.
    """

    def __init__(self, path: Path, headers: dict[Path, Header]) -> None:
        self.path = path
        self.headers = headers
        #: tensor name -> (dtype, shape), across all shards.
        self.tensors: Shapes = {
            name: (info.dtype, info.shape) for header in headers.values() for name, info in header.tensors.items()
        }
        self.structure_digest = structure_digest(self.tensors)
        self.index: dict[str, Any] | None = None
        if (path / INDEX_NAME).is_file():  # read_base_headers took the shards from it, so it is valid JSON
            self.index = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))
        self.config_error: BaseModelError | None = None
        try:
            self.config: dict[str, Any] | None = read_base_config(path)
        except BaseModelError as exc:
            self.config, self.config_error = None, exc
        #: The stored tensor serving as both input and output embedding, or None.
        self.tied = tied_embedding(self.tensors, self.config)
        self._content_digest: str | None = None

    @classmethod
    def open(cls, base_dir: str | os.PathLike[str]) -> BaseModel:
        """Open the model folder ``base_dir``; a missing or corrupt shard is a :class:`BaseModelError`."""
        path = Path(base_dir)
        return cls(path, read_base_headers(path))

    def __repr__(self) -> str:
        return f"BaseModel({str(self.path)!r})"

    def require_config(self) -> dict[str, Any] | None:
        """``config.json`` (None when there is none), or the error that made it unreadable."""
        if self.config_error is not None:
            raise self.config_error
        return self.config

    @property
    def content_digest(self) -> str:
        """Hash of every tensor's bytes (reads the whole model once, then remembered)."""
        if self._content_digest is None:
            self._content_digest = _content_digest(self.headers)
        return self._content_digest

    def fingerprint(self, *, content: bool = False) -> BaseFingerprint:
        return BaseFingerprint(
            structure_digest=self.structure_digest,
            tensors=self.tensors,
            content_digest=self.content_digest if content else None,
        )

    def resolve(self, module: str) -> tuple[str | None, bool]:
        """``(base tensor, reached through the tie)`` that the LoRA module path ``module`` changes."""
        return resolve_target(module, self.tensors, self.tied)

    def shard_of(self, tensor: str) -> tuple[Path, Header]:
        """The shard file holding ``tensor`` and that shard's header."""
        for path, header in self.headers.items():
            if tensor in header.tensors:
                return path, header
        raise KeyError(tensor)


def open_base(base: str | os.PathLike[str] | BaseModel) -> BaseModel:
    """``base`` itself when already opened, else the folder opened: callers accept either."""
    return base if isinstance(base, BaseModel) else BaseModel.open(base)
