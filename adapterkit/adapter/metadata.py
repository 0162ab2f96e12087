"""The metadata document of an adapter: what the store keeps beside its files, and what its digest covers.

Built from the PEFT config and the module table; validated against ``schemas/adapter.schema.json``
when the store publishes it, and again on every read. The base model entry and the lineage are part of
it, so the same tensors with another base or another history get another digest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adapterkit.adapter.config import ModuleSpec, carried_features

__all__ = ["FORMAT_VERSION", "build_metadata"]

#: ``format_version`` of the metadata document (schemas/adapter.schema.json).
FORMAT_VERSION = 1


def build_metadata(
    *,
    peft_config: Mapping[str, Any],
    modules: Sequence[ModuleSpec],
    extra_tensors: Sequence[str],
    safetensors_metadata: Mapping[str, str],
    base_model: Mapping[str, Any] | None,
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata document for an adapter (the store validates it against ``adapter.schema.json`` as it publishes)."""
    metadata = {
        "format_version": FORMAT_VERSION,
        "peft_type": "LORA",
        "r": peft_config.get("r", 8),
        "lora_alpha": peft_config.get("lora_alpha", 8),
        "use_rslora": bool(peft_config.get("use_rslora", False)),
        "target_modules": _target_modules(peft_config.get("target_modules")),
        "rank_pattern": dict(peft_config.get("rank_pattern") or {}),
        "alpha_pattern": dict(peft_config.get("alpha_pattern") or {}),
        "task_type": peft_config.get("task_type"),
        "modules": [module.to_json() for module in modules],
        "num_parameters": sum(module.num_parameters for module in modules),
        "extra_tensors": list(extra_tensors),
        "carried": carried_features(peft_config),
        "base_model": dict(base_model) if base_model is not None else None,
        "lineage": dict(lineage) if lineage is not None else None,
        "peft_config": dict(peft_config),
        "safetensors_metadata": {k: v for k, v in safetensors_metadata.items() if (k, v) != ("format", "pt")},
    }
    return metadata


def _target_modules(value: Any) -> Any:
    if isinstance(value, list | tuple | set):
        return sorted(str(v) for v in value) if isinstance(value, set) else [str(v) for v in value]
    return value if isinstance(value, str) or value is None else str(value)
