"""adapterkit: a content-addressed registry and toolkit for LoRA adapters.

This module is the public API: the CLI and every plugin, built-in or third-party, use only the
names in ``__all__``. Names that need torch (``Adapter``, ``compose``'s maths, ``merge``,
``inspect``, ...) are imported on first use, so that registry work (``Store``, the CLI's
``list``) never pays for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterkit.base_model import BaseFingerprint, BaseModel, fingerprint
from adapterkit.errors import (
    AdapterFormatError,
    AdapterkitError,
    AmbiguousReferenceError,
    BaseModelError,
    CompositionError,
    ExportError,
    ExtractionError,
    IncompatibleAdaptersError,
    IntegrityError,
    InvalidInputError,
    InvalidReferenceError,
    MergeError,
    NonFiniteError,
    PluginError,
    RefConflictError,
    ReferenceNotFoundError,
    RemoteConflictError,
    SchemaValidationError,
    StoreError,
    StoreLockedError,
    SyncError,
    UnknownFormatError,
    UnknownRemoteError,
    UnknownStrategyError,
    UnsupportedAdapterError,
)
from adapterkit.files.hashing import verified_chunks
from adapterkit.formats.base import AdapterFiles, ExportResult, Format
from adapterkit.formats.peft import PeftFormat
from adapterkit.hookspecs import hookimpl
from adapterkit.params import Param
from adapterkit.plugins import PluginInfo, Plugins, get_plugins
from adapterkit.registry import Store, find_format
from adapterkit.remotes.base import Progress, Remote, TransferResult
from adapterkit.store import (
    STORE_FORMAT_VERSION,
    AdapterStore,
    AddResult,
    GcReport,
    Layer,
    Received,
    Ref,
    TagResult,
    VerifyReport,
    is_digest,
    marker_version,
    parse_duration,
    parse_ref,
    parse_tag_ref,
    store_marker,
)
from adapterkit.store.documents import parse_manifest
from adapterkit.strategies.base import ModuleInput, ModuleResult, Strategy
from adapterkit.sync import open_remote, pull, push
from adapterkit.version import __version__

if TYPE_CHECKING:
    from adapterkit.adapter.model import Adapter, LoraModule
    from adapterkit.analysis.plotting import plot
    from adapterkit.analysis.spectra import inspect
    from adapterkit.checking import CheckReport, Problem, check
    from adapterkit.composition.engine import compose
    from adapterkit.composition.plan import plan_compose
    from adapterkit.extraction import extract, plan_extraction
    from adapterkit.formats.peft import read_adapter, write_adapter
    from adapterkit.merging.dry_run import plan_merge
    from adapterkit.merging.stacking import attach
    from adapterkit.merging.streamed import MergeReport, merge

__all__ = [
    "STORE_FORMAT_VERSION",
    "Adapter",
    "AdapterFiles",
    "AdapterStore",
    "AdapterFormatError",
    "AdapterkitError",
    "AddResult",
    "AmbiguousReferenceError",
    "BaseFingerprint",
    "BaseModel",
    "BaseModelError",
    "CheckReport",
    "CompositionError",
    "ExportError",
    "ExportResult",
    "Format",
    "ExtractionError",
    "GcReport",
    "IncompatibleAdaptersError",
    "IntegrityError",
    "InvalidInputError",
    "InvalidReferenceError",
    "Layer",
    "LoraModule",
    "MergeError",
    "MergeReport",
    "NonFiniteError",
    "ModuleInput",
    "ModuleResult",
    "Param",
    "PeftFormat",
    "PluginError",
    "Problem",
    "PluginInfo",
    "Plugins",
    "Progress",
    "Received",
    "Ref",
    "RefConflictError",
    "ReferenceNotFoundError",
    "Remote",
    "RemoteConflictError",
    "SchemaValidationError",
    "Store",
    "StoreError",
    "StoreLockedError",
    "Strategy",
    "TagResult",
    "SyncError",
    "TransferResult",
    "UnknownFormatError",
    "UnknownRemoteError",
    "UnknownStrategyError",
    "UnsupportedAdapterError",
    "VerifyReport",
    "__version__",
    "attach",
    "check",
    "compose",
    "extract",
    "find_format",
    "fingerprint",
    "get_plugins",
    "hookimpl",
    "inspect",
    "is_digest",
    "marker_version",
    "merge",
    "open_remote",
    "parse_duration",
    "parse_manifest",
    "parse_ref",
    "parse_tag_ref",
    "plan_compose",
    "plan_extraction",
    "plan_merge",
    "plot",
    "pull",
    "push",
    "read_adapter",
    "store_marker",
    "verified_chunks",
    "write_adapter",
]

_LAZY = {
    "Adapter": "adapterkit.adapter.model",
    "LoraModule": "adapterkit.adapter.model",
    "CheckReport": "adapterkit.checking",
    "Problem": "adapterkit.checking",
    "MergeReport": "adapterkit.merging.streamed",
    "attach": "adapterkit.merging.stacking",
    "check": "adapterkit.checking",
    "compose": "adapterkit.composition.engine",
    "inspect": "adapterkit.analysis.spectra",
    "merge": "adapterkit.merging.streamed",
    "plan_compose": "adapterkit.composition.plan",
    "plan_merge": "adapterkit.merging.dry_run",
    "plot": "adapterkit.analysis.plotting",
    "read_adapter": "adapterkit.formats.peft",
    "write_adapter": "adapterkit.formats.peft",
    "extract": "adapterkit.extraction",
    "plan_extraction": "adapterkit.extraction",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
