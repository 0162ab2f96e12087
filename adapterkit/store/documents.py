"""The JSON documents of the store: metadata (the adapter's config blob) and manifests.

Both are canonical JSON (sorted keys, no whitespace, no timestamps) so that the same adapter
gives the same digest on any machine, and both are validated against ``schemas/`` on every
write and every read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapterkit.errors import AdapterFormatError, IntegrityError, SchemaValidationError
from adapterkit.schema import ADAPTER_SCHEMA, MANIFEST_SCHEMA, validate

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "LAYER_MEDIA_TYPES",
    "Layer",
    "build_manifest",
    "canonical_json",
    "check_metadata",
    "parse_manifest",
    "parse_metadata",
]

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.adapterkit.lora.v1"
CONFIG_MEDIA_TYPE = "application/vnd.adapterkit.lora.config.v1+json"
TITLE = "org.opencontainers.image.title"
LAYER_MEDIA_TYPES = {
    "adapter_config.json": "application/vnd.adapterkit.peft.config.v1+json",
    "adapter_model.safetensors": "application/vnd.adapterkit.safetensors",
    "README.md": "text/markdown",
}


def canonical_json(document: Any, *, source: str = "document") -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same document always gives the same bytes and digest."""
    try:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise AdapterFormatError(f"{source}: cannot be stored as JSON ({exc}; NaN and Infinity are not JSON)") from None
    return text.encode("utf-8")


@dataclass(frozen=True)
class Layer:
    """One file of an adapter: its name in a PEFT folder and its blob."""

    title: str
    digest: str
    size: int

    @property
    def media_type(self) -> str:
        return LAYER_MEDIA_TYPES.get(self.title, "application/octet-stream")


def build_manifest(config: Layer, layers: Sequence[Layer]) -> dict[str, Any]:
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config.digest, "size": config.size},
        "layers": [
            {
                "mediaType": layer.media_type,
                "digest": layer.digest,
                "size": layer.size,
                "annotations": {TITLE: layer.title},
            }
            for layer in layers
        ],
    }
    validate(manifest, MANIFEST_SCHEMA, "manifest")
    return manifest


def _load(data: bytes, source: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{source}: not valid JSON ({exc})") from None
    except RecursionError:
        raise IntegrityError(f"{source}: not valid JSON (nested too deeply)") from None


def _load_valid(data: bytes, source: str, schema: str, known_valid: bool) -> Any:
    """A stored document, after validation against ``schema`` (skipped when ``known_valid``)."""
    document = _load(data, source)
    if not known_valid:
        try:
            validate(document, schema, source)
        except SchemaValidationError as exc:
            raise IntegrityError(str(exc)) from None
    return document


def parse_manifest(data: bytes, source: str, *, known_valid: bool = False) -> tuple[Layer, list[Layer]]:
    """(config blob, file layers) of a stored manifest, after schema validation (skipped when ``known_valid``)."""
    manifest = _load_valid(data, source, MANIFEST_SCHEMA, known_valid)
    config = Layer("", manifest["config"]["digest"], manifest["config"]["size"])
    layers = [Layer(d["annotations"][TITLE], d["digest"], d["size"]) for d in manifest["layers"]]
    titles = [layer.title for layer in layers]
    if len(set(titles)) != len(titles) or not {"adapter_config.json", "adapter_model.safetensors"} <= set(titles):
        raise IntegrityError(f"{source}: layers must name adapter_config.json and adapter_model.safetensors once each")
    return config, layers


def check_metadata(data: bytes, source: str) -> dict[str, Any]:
    """A metadata document about to be stored: refused (SchemaValidationError, naming ``source``) unless valid."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SchemaValidationError(f"{source}: the metadata document is not valid JSON") from None
    validate(document, ADAPTER_SCHEMA, source)
    return document


def parse_metadata(data: bytes, source: str, *, known_valid: bool = False) -> dict[str, Any]:
    """A stored metadata document, after schema validation (skipped when ``known_valid``)."""
    return _load_valid(data, source, ADAPTER_SCHEMA, known_valid)
