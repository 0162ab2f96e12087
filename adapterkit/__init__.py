"""adapterkit: a content-addressed registry and toolkit for LoRA adapters.

The names that need torch (:class:`Adapter`, :func:`read_adapter`, :func:`write_adapter`) are
imported on first use, so that registry work (``Store``, the CLI's ``list``) never pays for
importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from adapterkit.base_model import BaseFingerprint, fingerprint
from adapterkit.errors import (
    AdapterFormatError,
    AdapterkitError,
    AmbiguousReferenceError,
    BaseModelError,
    CompositionError,
    ExportError,
    IncompatibleAdaptersError,
    IntegrityError,
    InvalidInputError,
    InvalidReferenceError,
    MergeError,
    PluginError,
    RefConflictError,
    ReferenceNotFoundError,
    SchemaValidationError,
    StoreError,
    StoreLockedError,
    UnknownStrategyError,
    UnsupportedAdapterError,
)
from adapterkit.store import AddResult, GcReport, Store, VerifyReport

if TYPE_CHECKING:
    from adapterkit.adapter.model import Adapter, LoraModule
    from adapterkit.analysis.preflight import CheckReport, Problem, check
    from adapterkit.composition.engine import compose
    from adapterkit.formats.peft import read_adapter, write_adapter
    from adapterkit.merging.stacking import attach
    from adapterkit.merging.streamed import merge

__all__ = [
    "AdapterFormatError",
    "Adapter",
    "AdapterkitError",
    "AddResult",
    "AmbiguousReferenceError",
    "BaseFingerprint",
    "BaseModelError",
    "CheckReport",
    "CompositionError",
    "ExportError",
    "GcReport",
    "IncompatibleAdaptersError",
    "IntegrityError",
    "InvalidInputError",
    "InvalidReferenceError",
    "LoraModule",
    "MergeError",
    "PluginError",
    "Problem",
    "RefConflictError",
    "ReferenceNotFoundError",
    "SchemaValidationError",
    "Store",
    "StoreError",
    "StoreLockedError",
    "UnknownStrategyError",
    "UnsupportedAdapterError",
    "VerifyReport",
    "__version__",
    "attach",
    "check",
    "compose",
    "fingerprint",
    "merge",
    "read_adapter",
    "write_adapter",
]

_LAZY = {
    "Adapter": "adapterkit.adapter.model",
    "LoraModule": "adapterkit.adapter.model",
    "CheckReport": "adapterkit.analysis.preflight",
    "Problem": "adapterkit.analysis.preflight",
    "attach": "adapterkit.merging.stacking",
    "check": "adapterkit.analysis.preflight",
    "compose": "adapterkit.composition.engine",
    "merge": "adapterkit.merging.streamed",
    "read_adapter": "adapterkit.formats.peft",
    "write_adapter": "adapterkit.formats.peft",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
