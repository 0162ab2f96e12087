"""Advisory file locks with a timeout.

Locks guard only two things: compare-and-swap on one ref, and gc against writers (writers hold
the gc lock shared, gc holds it exclusive). Object contents never depend on a lock: they are
published atomically under their own hash. flock locks die with their process, so a killed
writer never leaves a stale lock behind.

flock has no queue: a process polling for the exclusive lock can wait forever while shared
holders overlap. :func:`gc_lock` therefore puts a turnstile in front of it. Every process passes
the turnstile (held exclusively for an instant) on its way in; gc keeps it while it waits for
the writers inside to finish, so no new writer enters and gc cannot starve.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from adapterkit.errors import StoreLockedError

__all__ = ["file_lock", "gc_lock"]


def _acquire(path: Path, *, shared: bool, deadline: float, timeout: float, what: str) -> int:
    """An open fd of ``path`` holding the lock; raises StoreLockedError once ``deadline`` passes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, mode)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"timed out after {timeout:.0f} s waiting for the {what} lock ({path}); "
                        "another adapterkit process is working on this store"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
    except BaseException:
        os.close(fd)
        raise


def _release(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False, timeout: float = 60.0, what: str = "store") -> Iterator[None]:
    """Hold the flock on ``path`` (created if missing) for the block."""
    fd = _acquire(path, shared=shared, deadline=time.monotonic() + timeout, timeout=timeout, what=what)
    try:
        yield
    finally:
        _release(fd)


@contextlib.contextmanager
def gc_lock(locks_dir: Path, *, exclusive: bool, timeout: float = 60.0) -> Iterator[None]:
    """The store-wide lock: shared for writers (and verify), exclusive for gc, fair to gc."""
    deadline = time.monotonic() + timeout
    turnstile = _acquire(locks_dir / "gc.turnstile", shared=False, deadline=deadline, timeout=timeout, what="gc")
    try:
        held = _acquire(locks_dir / "gc.lock", shared=not exclusive, deadline=deadline, timeout=timeout, what="gc")
    except BaseException:
        _release(turnstile)
        raise
    if not exclusive:
        _release(turnstile)  # writers only pass through; gc keeps it so no writer enters behind it
    try:
        yield
    finally:
        _release(held)
        if exclusive:
            _release(turnstile)
