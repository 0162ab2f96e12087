"""``verify``: re-hash what is stored, check every document and ref, quarantine what is damaged.

Blobs are re-hashed unless an earlier verify already hashed exactly this file (same inode,
size, mtime and ctime, as DVC does); ``full=True`` re-hashes everything. A corrupt object is
moved to ``corrupt/`` and reported, never deleted: it may be the only copy of someone's work.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import AdapterkitError, StoreError
from adapterkit.store.documents import parse_manifest, parse_metadata
from adapterkit.store.fsutil import replace_atomic
from adapterkit.store.objects import hash_file

if TYPE_CHECKING:
    from adapterkit.store.store import Store

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
            "stale_temp_files": self.stale_temp_files,
        }


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def verify_store(store: Store, *, full: bool = False, progress: Callable[[int], None] | None = None) -> VerifyReport:
    report = VerifyReport()
    root = store.root
    cache_path = root / _CACHE
    try:
        cache: dict[str, list[int]] = {} if full else json.loads(cache_path.read_text("utf-8"))
    except (FileNotFoundError, ValueError):
        cache = {}
    new_cache: dict[str, list[int]] = {}

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    # Blobs: every file must hash to its name.
    sizes: dict[str, int] = {}
    for digest, path in store.blobs:
        report.blobs += 1
        if not digest:
            report.problems.append(Problem("blob", rel(path), "stray file in the blob directory"))
            continue
        key = rel(path)
        try:
            stamp = _stat_key(path)
            if cache.get(key) == stamp:
                sizes[digest] = stamp[1]
                new_cache[key] = stamp
                continue
            actual, size = hash_file(path, progress)
            report.hashed_bytes += size
        except OSError as exc:
            report.problems.append(Problem("blob", key, f"unreadable ({exc.strerror})"))
            continue
        if actual != digest:
            moved = store.blobs.quarantine(path)
            report.quarantined.append(rel(moved))
            report.problems.append(Problem("blob", key, f"content hashes to {actual}; moved to {rel(moved)}"))
            continue
        sizes[digest] = size
        new_cache[key] = stamp

    # Manifests: hash, schema, every blob present with its size, metadata valid.
    manifests: set[str] = set()
    for digest, path in store.manifests:
        report.manifests += 1
        key = rel(path)
        if not digest:
            report.problems.append(Problem("manifest", key, "stray file in the manifest directory"))
            continue
        try:
            actual, _ = hash_file(path)
        except OSError as exc:
            report.problems.append(Problem("manifest", key, f"unreadable ({exc.strerror})"))
            continue
        if actual != digest:
            moved = store.manifests.quarantine(path)
            report.quarantined.append(rel(moved))
            report.problems.append(Problem("manifest", key, f"content hashes to {actual}; moved to {rel(moved)}"))
            continue
        try:
            config, layers = parse_manifest(path.read_bytes(), f"manifest {digest}")
        except AdapterkitError as exc:
            report.problems.append(Problem("manifest", key, str(exc)))
            continue
        manifests.add(digest)
        for layer in (config, *layers):
            what = layer.title or "metadata"
            if layer.digest not in sizes:
                report.problems.append(Problem("manifest", key, f"{what} blob {layer.digest} is missing"))
            elif sizes[layer.digest] != layer.size:
                report.problems.append(
                    Problem(
                        "manifest", key, f"{what} blob {layer.digest} is {sizes[layer.digest]} bytes, not {layer.size}"
                    )
                )
        if config.digest in sizes:
            try:
                parse_metadata(store.blobs.path(config.digest).read_bytes(), f"metadata of {digest}")
            except AdapterkitError as exc:
                report.problems.append(Problem("metadata", key, str(exc)))

    # Refs: readable, pointing at a manifest that exists.
    for name, tag, path in store.refs:
        report.refs += 1
        try:
            target = store.refs.read(name, tag)
        except StoreError as exc:
            report.problems.append(Problem("ref", rel(path), str(exc)))
            continue
        if target not in manifests:
            report.problems.append(Problem("ref", rel(path), f"ref {name}:{tag} points at missing adapter {target}"))

    report.stale_temp_files = sum(1 for p in store.tmp.glob("*") if not _writer_alive(p)) if store.tmp.is_dir() else 0
    with contextlib.suppress(OSError):  # the cache only saves time
        replace_atomic(cache_path, json.dumps(new_cache, sort_keys=True).encode(), store.tmp)
    return report


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
    return time.time() - path.stat().st_mtime < 86400
