"""A store's layout on disk: where its parts live, its format marker, and the writer lock.

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

Nothing is created until the first write: reading, ``verify`` or ``gc`` on a path that holds no
store leave it untouched, so pointing ``--store`` at the wrong directory cannot litter it.
:class:`StoreLayout` is what ``gc`` and ``verify`` work on; :class:`~adapterkit.store.AdapterStore`
builds the adapter store on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterkit.errors import StoreError
from adapterkit.files.fsutil import replace_atomic
from adapterkit.store.documents import canonical_json
from adapterkit.store.locks import gc_lock
from adapterkit.store.objects import ObjectDir
from adapterkit.store.refs import RefStore
from adapterkit.store.validated import ValidatedDigests

__all__ = ["STORE_FORMAT_VERSION", "StoreLayout", "default_store_path", "marker_version", "store_marker"]

STORE_FORMAT_VERSION = 1
#: What a first writer killed before ``store.json`` appeared can leave behind (see ``writing``).
_BOOTSTRAP_ENTRIES = frozenset({"locks", "tmp"})


_STORE_FORMAT = "adapterkit-store"


def store_marker() -> bytes:
    """The bytes of a new store's ``store.json``: any copy of a store, local or remote, starts with it."""
    return canonical_json({"format": _STORE_FORMAT, "version": STORE_FORMAT_VERSION}) + b"\n"


def marker_version(data: bytes) -> int | None:
    """The format version a ``store.json`` declares, or None when ``data`` is no adapterkit store marker."""
    try:
        doc = json.loads(data)
        version = doc["version"] if doc.get("format", _STORE_FORMAT) == _STORE_FORMAT else None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def default_store_path() -> Path:
    """``$ADAPTERKIT_HOME``, else ``~/.adapterkit``."""
    env = os.environ.get("ADAPTERKIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".adapterkit"


class StoreLayout:
    """The parts of a store rooted at ``path`` (blobs, manifests, refs, temp files) and its writer lock."""

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
        return f"{type(self).__name__}({str(self.root)!r})"

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
            version = marker_version(marker.read_bytes())
        except FileNotFoundError:
            version = None
        except OSError as exc:
            raise StoreError(f"{marker}: cannot read ({exc.strerror or exc})") from None
        else:
            if version is None:
                raise StoreError(f"{marker}: unreadable store marker; is {self.root} an adapterkit store?")
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
                    replace_atomic(marker, store_marker(), self.tmp)
                    self._checked_format = True
                yield
        except OSError as exc:
            raise StoreError(f"cannot write to store {self.root}: {exc.strerror or exc}") from None
