"""``verify``: re-hash what is stored, check every document and ref, quarantine what is damaged.

Blobs are re-hashed unless an earlier verify already hashed exactly this file (same inode,
size, mtime and ctime, as DVC does); ``full=True`` re-hashes everything. A corrupt object is
moved to ``corrupt/`` and reported, never deleted: it may be the only copy of someone's work.
verify holds the gc lock shared, like a writer, so a gc half-way through its sweep is never
mistaken for damage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterkitError, StoreError
from adapterkit.files.fsutil import replace_atomic
from adapterkit.store.documents import parse_manifest, parse_metadata
from adapterkit.store.layout import StoreLayout
from adapterkit.store.locks import gc_lock
from adapterkit.store.objects import ObjectDir, hash_file

__all__ = ["Problem", "VerifyReport", "verify_store"]

_CACHE = Path("state") / "verified.json"


@dataclass(frozen=True)
class Problem:
    kind: str  # blob | manifest | metadata | ref
    path: str
    message: str


@dataclass
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    blobs: int = 0
    manifests: int = 0
    refs: int = 0
    hashed_bytes: int = 0
    quarantined: list[str] = field(default_factory=list)
    #: Corrupt objects left in place because the store cannot be written here (read-only).
    unmoved: list[str] = field(default_factory=list)
    #: Temp files of writers that are gone (killed); `gc` removes them after its grace period.
    stale_temp_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": [p.__dict__ for p in self.problems],
            "checked": {"blobs": self.blobs, "manifests": self.manifests, "refs": self.refs},
            "hashed_bytes": self.hashed_bytes,
            "quarantined": self.quarantined,
            "unmoved": self.unmoved,
            "stale_temp_files": self.stale_temp_files,
        }


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def verify_store(
    store: StoreLayout, *, full: bool = False, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Check everything (see the module docstring); an uninitialised store is empty and fine."""
    if not store.initialised():
        return VerifyReport()  # and write nothing: a state/ dir would make it look like a foreign directory
    with gc_lock(store.root / "locks", exclusive=False, timeout=store.lock_timeout, read_only=True):
        return _verify(store, full=full, progress=progress)


def _verify(store: StoreLayout, *, full: bool, progress: Callable[[int], None] | None) -> VerifyReport:
    checker = _Checker(store, full=full, progress=progress)
    report = checker.report
    for digest, path in store.blobs:
        report.blobs += 1
        if digest:
            checker.blob(digest)
        else:
            checker.problem("blob", path, "stray entry in the blob directory (not an object)")
    for digest, path in store.manifests:
        report.manifests += 1
        if digest:
            checker.manifest(digest)
        else:
            checker.problem("manifest", path, "stray entry in the manifest directory (not an object)")
    for name, tag, path in store.refs:
        report.refs += 1
        try:
            target = store.refs.read(name, tag)
        except StoreError as exc:
            report.problems.append(Problem("ref", checker.rel(path), str(exc)))
            continue
        if target is not None and not checker.manifest(target):  # None: removed since the listing
            state = "damaged" if store.manifests.exists(target) else "missing"
            checker.problem("ref", path, f"ref {name}:{tag} points at {state} adapter {target}")

    report.stale_temp_files = sum(1 for p in store.tmp.iterdir() if not _writer_alive(p)) if store.tmp.is_dir() else 0
    with contextlib.suppress(OSError):  # the cache only saves time
        replace_atomic(store.root / _CACHE, json.dumps(checker.new_cache, sort_keys=True).encode(), store.tmp)
    return report


class _Checker:
    """Checks each object once, on first mention.

    Writers keep publishing while verify runs (both hold the gc lock shared), so a manifest may
    name a blob that appeared after the blob listing, and a ref a manifest that appeared after
    the manifest listing. Checking objects when they are first named, not only when listed,
    keeps such newcomers from being reported as missing.
    """

    def __init__(self, store: StoreLayout, *, full: bool, progress: Callable[[int], None] | None) -> None:
        self.store = store
        self.progress = progress
        self.report = VerifyReport()
        try:
            self.cache: dict[str, list[int]] = {} if full else json.loads((store.root / _CACHE).read_text("utf-8"))
        except (OSError, ValueError, RecursionError):
            self.cache = {}
        self.new_cache: dict[str, list[int]] = {}
        #: digest -> size of every blob found intact; None for one found missing or damaged.
        self.blobs: dict[str, int | None] = {}
        #: digest -> whether the manifest is present and sound.
        self.manifests: dict[str, bool] = {}

    def rel(self, path: Path) -> str:
        return path.relative_to(self.store.root).as_posix()

    def problem(self, kind: str, path: Path, message: str) -> None:
        self.report.problems.append(Problem(kind, self.rel(path), message))

    def quarantine(self, objects: ObjectDir, path: Path) -> str:
        """Move a corrupt object to corrupt/; says where it went (or why it stayed), for the problem's message."""
        try:
            moved = objects.quarantine(path)
        except OSError as exc:  # a store this user cannot write: report, and leave the object where it is
            self.report.unmoved.append(self.rel(path))
            return f"not moved to corrupt/ ({exc.strerror or exc}): run verify with write access to the store"
        if moved is None:
            return "already moved aside by another process"
        self.report.quarantined.append(self.rel(moved))
        return f"moved to {self.rel(moved)}"

    def blob(self, digest: str) -> int | None:
        """The size of blob ``digest`` if it is present and hashes to its name (quarantined if not)."""
        if digest in self.blobs:
            return self.blobs[digest]
        self.blobs[digest] = None
        path = self.store.blobs.path(digest)
        key = self.rel(path)
        try:
            stamp = _stat_key(path)
            if self.cache.get(key) == stamp:
                self.new_cache[key] = stamp
                self.blobs[digest] = stamp[1]
                return stamp[1]
            actual, size = hash_file(path, self.progress)
        except FileNotFoundError:
            return None  # the manifest naming it reports it
        except OSError as exc:
            self.problem("blob", path, f"unreadable ({exc.strerror})")
            return None
        self.report.hashed_bytes += size
        if actual != digest:
            self.problem("blob", path, f"content hashes to {actual}; {self.quarantine(self.store.blobs, path)}")
            return None
        self.new_cache[key] = stamp
        self.blobs[digest] = size
        return size

    def manifest(self, digest: str) -> bool:
        """Whether manifest ``digest`` is present, intact, schema-valid and names intact blobs."""
        if digest in self.manifests:
            return self.manifests[digest]
        self.manifests[digest] = False
        path = self.store.manifests.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False  # the ref naming it reports it
        except OSError as exc:
            self.problem("manifest", path, f"unreadable ({exc.strerror})")
            return False
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            self.problem("manifest", path, f"content hashes to {actual}; {self.quarantine(self.store.manifests, path)}")
            return False
        try:
            config, layers = parse_manifest(data, f"manifest {digest}")
        except AdapterkitError as exc:
            self.problem("manifest", path, str(exc))
            return False
        sound = True
        for layer in (config, *layers):
            what = layer.title or "metadata"
            size = self.blob(layer.digest)
            if size is None:
                self.problem("manifest", path, f"{what} blob {layer.digest} is missing")
                sound = False
            elif size != layer.size:
                self.problem("manifest", path, f"{what} blob {layer.digest} is {size} bytes, not {layer.size}")
                sound = False
        if self.blobs.get(config.digest) is not None:
            try:
                parse_metadata(self.store.blobs.path(config.digest).read_bytes(), f"metadata of {digest}")
            except AdapterkitError as exc:
                self.problem("metadata", path, str(exc))
                sound = False
            except OSError as exc:
                self.problem("metadata", path, f"unreadable ({exc.strerror})")
                sound = False
        self.manifests[digest] = sound
        return sound


def _writer_alive(path: Path) -> bool:
    """Whether the process that named this temp file still runs (the pid is its name's prefix)."""
    pid_text = path.name.split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return time.time() - path.stat().st_mtime < 86400
    except FileNotFoundError:
        return True  # it finished and removed its temp file meanwhile
