"""``gc``: remove what no ref (or recent reflog entry) reaches, once it is older than the grace.

Never automatic, and conservative by construction: it holds the gc lock exclusively (writers
hold it shared), refuses to run while any ref or manifest is unreadable (an unreadable manifest
would make its blobs look unreachable), deletes manifests before blobs so no manifest ever
names a missing blob, and spares anything younger than the grace period (writers freshen the
mtime of objects they reuse, as git does). Files that are not shaped like store objects are
left alone (verify reports them): gc only deletes what the store itself writes.

A reflog entry naming a manifest that is gone is history, not damage: an earlier gc with a
shorter grace removed it legitimately, so such entries are skipped rather than refused.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterkitError, StoreError
from adapterkit.files.fsutil import remove_quietly
from adapterkit.store.documents import parse_manifest
from adapterkit.store.layout import StoreLayout
from adapterkit.store.locks import gc_lock

__all__ = ["GcReport", "collect", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``24h``, ``7d``, ``2w`` or plain seconds."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _UNITS else "s"
    number = value[:-1] if value[-1:] in _UNITS else value
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: use a number with s, m, h, d or w (e.g. 24h)") from None
    if seconds < 0:
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    return seconds


@dataclass
class GcReport:
    dry_run: bool
    removed: list[tuple[str, int]] = field(default_factory=list)
    kept_manifests: int = 0
    kept_blobs: int = 0
    #: Of those kept, objects no ref reaches: kept by the grace period (a recent reflog entry, or their own age).
    young_manifests: int = 0
    young_blobs: int = 0

    @property
    def freed_bytes(self) -> int:
        return sum(size for _, size in self.removed)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "removed": [{"path": path, "size": size} for path, size in self.removed],
            "freed_bytes": self.freed_bytes,
            "kept": {"manifests": self.kept_manifests, "blobs": self.kept_blobs},
            "kept_unreachable": {"manifests": self.young_manifests, "blobs": self.young_blobs},
        }


def collect(store: StoreLayout, *, grace: float, dry_run: bool) -> GcReport:
    """Mark from refs and recent reflog entries, then sweep manifests, blobs and temp files."""
    report = GcReport(dry_run=dry_run)
    if not store.initialised():
        return report  # nothing was ever written: don't create lock files in someone's directory
    with gc_lock(store.root / "locks", exclusive=True, timeout=store.lock_timeout, read_only=dry_run):
        now = time.time()
        cutoff = now - grace
        refs: dict[str, str] = {}
        for name, tag, _ in store.refs:
            try:
                digest = store.refs.read(name, tag)
            except StoreError as exc:
                raise StoreError(
                    f"gc refused: {exc}; point it at an adapter (`adapterkit tag REF {name}:{tag}`) or delete that file"
                ) from None
            if digest:
                refs[digest] = f"{name}:{tag}"
        recent: set[str] = set()
        for _, _, entries in store.refs.all_logs():
            for entry in entries:
                if entry.time >= cutoff:
                    recent.update(d for d in (entry.old, entry.new) if d)

        manifests: dict[str, tuple[Path, set[str]]] = {}
        for digest, path in store.manifests:
            if not digest:
                continue  # a stray: verify reports it, gc never deletes what it did not write
            try:
                config, layers = parse_manifest(store.manifests.read(digest, what="manifest"), f"manifest {digest}")
            except AdapterkitError as exc:
                reason = str(exc).removesuffix(" (run `adapterkit verify`)")
                raise StoreError(f"gc refused: {reason}; run `adapterkit verify` first") from None
            manifests[digest] = (path, {config.digest, *(layer.digest for layer in layers)})
        for digest, ref in sorted(refs.items()):
            if digest not in manifests:
                raise StoreError(
                    f"gc refused: ref {ref} names {digest}, whose manifest is missing; "
                    "run `adapterkit verify`, then re-add the adapter or remove the ref"
                )
        roots = set(refs) | recent

        live_blobs: set[str] = set()
        referenced_blobs: set[str] = set()  # reached from a ref; the rest is kept only by the grace period
        doomed_manifests = []
        for digest, (path, blobs) in manifests.items():
            if digest in roots or _mtime(path) >= cutoff:
                live_blobs |= blobs
                report.kept_manifests += 1
                if digest in refs:
                    referenced_blobs |= blobs
                else:
                    report.young_manifests += 1  # a recent reflog entry or its own age keeps it
            else:
                doomed_manifests.append(path)
        doomed_blobs = []
        for digest, path in store.blobs:
            if not digest:
                continue
            if digest in live_blobs or _mtime(path) >= cutoff:
                report.kept_blobs += 1
                report.young_blobs += digest not in referenced_blobs
            else:
                doomed_blobs.append(path)
        doomed_temp = (
            [p for p in store.tmp.iterdir() if p.is_file() and _mtime(p) < cutoff] if store.tmp.is_dir() else []
        )

        for path in (*doomed_manifests, *doomed_blobs, *doomed_temp):  # manifests first: never a dangling name
            report.removed.append((path.relative_to(store.root).as_posix(), _size(path)))
            if not dry_run:
                remove_quietly(path)
        if not dry_run:
            _prune_empty_dirs(store.root / "refs")
            _prune_empty_dirs(store.blobs.root)
            _prune_empty_dirs(store.manifests.root)
    return report


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _prune_empty_dirs(top: Path) -> None:
    if not top.is_dir():
        return
    for dirpath, _, _ in sorted(os.walk(top), key=lambda item: -len(item[0])):
        if Path(dirpath) != top:
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
