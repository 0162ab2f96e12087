"""The content-addressed adapter store: bytes, documents, refs, gc, verify, the pull transaction.

No torch, PEFT or format module is imported here, directly or lazily; :class:`adapterkit.Store`
builds adapters on top of :class:`AdapterStore`.
"""

from adapterkit.store.documents import Layer
from adapterkit.store.gc import GcReport, parse_duration
from adapterkit.store.layout import STORE_FORMAT_VERSION, StoreLayout, default_store_path, marker_version, store_marker
from adapterkit.store.names import Ref, is_digest, parse_ref, parse_tag_ref
from adapterkit.store.store import AdapterStore, AddResult, Received, TagResult
from adapterkit.store.verify import Problem, VerifyReport

__all__ = [
    "STORE_FORMAT_VERSION",
    "AdapterStore",
    "AddResult",
    "GcReport",
    "Layer",
    "Problem",
    "Received",
    "Ref",
    "StoreLayout",
    "TagResult",
    "VerifyReport",
    "default_store_path",
    "is_digest",
    "marker_version",
    "parse_duration",
    "parse_ref",
    "parse_tag_ref",
    "store_marker",
]
