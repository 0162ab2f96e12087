"""The content-addressed adapter store (no torch import here)."""

from adapterkit.store.gc import GcReport, parse_duration
from adapterkit.store.names import Ref, parse_ref, parse_tag_ref
from adapterkit.store.store import AddResult, Store, TagResult, default_store_path
from adapterkit.store.verify import Problem, VerifyReport

__all__ = [
    "AddResult",
    "GcReport",
    "Problem",
    "Ref",
    "Store",
    "TagResult",
    "VerifyReport",
    "default_store_path",
    "parse_duration",
    "parse_ref",
    "parse_tag_ref",
]
