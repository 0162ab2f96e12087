"""adapterkit: a content-addressed registry and toolkit for LoRA adapters.

The names that need torch (:class:`Adapter`, :func:`read_adapter`, :func:`write_adapter`) are
imported on first use, so that registry work (``Store``, the CLI's ``list``) never pays for
importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from adapterkit.errors import (
    AdapterFormatError,
    AdapterkitError,
    AmbiguousReferenceError,
    BaseModelError,
    CompositionError,
    ExtractionError,
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
from adapterkit.fingerprint import BaseFingerprint, fingerprint
from adapterkit.store import AddResult, GcReport, Store, VerifyReport

if TYPE_CHECKING:
    from adapterkit.composition import compose
    from adapterkit.extraction import extract
    from adapterkit.lora import Adapter, LoraModule
    from adapterkit.merging import merge
    from adapterkit.peft_io import read_adapter, write_adapter
    from adapterkit.stacking import attach

__all__ = [
    "AdapterFormatError",
    "Adapter",
    "AdapterkitError",
    "AddResult",
    "AmbiguousReferenceError",
    "BaseFingerprint",
    "BaseModelError",
    "CompositionError",
    "ExtractionError",
    "GcReport",
    "IncompatibleAdaptersError",
    "IntegrityError",
    "InvalidInputError",
    "InvalidReferenceError",
    "LoraModule",
    "MergeError",
    "PluginError",
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
    "compose",
    "extract",
    "fingerprint",
    "merge",
    "read_adapter",
    "write_adapter",
]

_LAZY = {
    "Adapter": "adapterkit.lora",
    "LoraModule": "adapterkit.lora",
    "attach": "adapterkit.stacking",
    "compose": "adapterkit.composition",
    "extract": "adapterkit.extraction",
    "merge": "adapterkit.merging",
    "read_adapter": "adapterkit.peft_io",
    "write_adapter": "adapterkit.peft_io",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
