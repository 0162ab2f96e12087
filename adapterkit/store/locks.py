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
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from adapterkit.errors import StoreLockedError

__all__ = ["file_lock", "gc_lock"]


#: Errors that say the store cannot be written here (permissions, a read-only mount).
_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _open(path: Path, *, read_only: bool) -> int | None:
    """An fd of the lock file ``path`` (created if missing); None for a reader of a store it cannot write.

    flock needs no write access, so a reader (``read_only``) that may not create or write the file
    opens it read-only and still takes part in the locking. Where even that is impossible (no lock
    file, and no right to create one), nobody without write access could hold it, and nobody with
    it has yet: the reader goes on unlocked.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if not read_only or exc.errno not in _READ_ONLY_ERRNOS:
            raise
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def _acquire(path: Path, *, shared: bool, deadline: float, read_only: bool = False) -> int | None:
    """An open fd of ``path`` holding the lock; None once ``deadline`` passes (the caller says why).

    With ``read_only``, ``-1`` stands for "no lock file, none needed" (see :func:`_open`).
    """
    fd = _open(path, read_only=read_only)
    if fd is None:
        return -1
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, mode)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
    except BaseException:
        os.close(fd)
        raise


def _release(fd: int) -> None:
    if fd == -1:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False, timeout: float = 60.0, what: str = "store") -> Iterator[None]:
    """Hold the flock on ``path`` (created if missing) for the block."""
    fd = _acquire(path, shared=shared, deadline=time.monotonic() + timeout)
    if fd is None:
        raise StoreLockedError(
            f"timed out after {timeout:.0f} s waiting for the {what} lock ({path}); "
            "another adapterkit process is working on this store"
        )
    try:
        yield
    finally:
        _release(fd)


@contextlib.contextmanager
def gc_lock(locks_dir: Path, *, exclusive: bool, timeout: float = 60.0, read_only: bool = False) -> Iterator[None]:
    """The store-wide lock: shared for writers (and verify), exclusive for gc, fair to gc.

    ``read_only``: the holder only reads (``verify``, ``gc --dry-run``), so a store it cannot write
    (permissions, a read-only mount) is locked through read-only file handles instead of refused.
    """
    deadline = time.monotonic() + timeout
    turnstile = _acquire(locks_dir / "gc.turnstile", shared=False, deadline=deadline, read_only=read_only)
    if turnstile is None:
        raise _store_locked(locks_dir, timeout)
    try:
        held = _acquire(locks_dir / "gc.lock", shared=not exclusive, deadline=deadline, read_only=read_only)
    except BaseException:
        _release(turnstile)
        raise
    if held is None:
        _release(turnstile)
        raise _store_locked(locks_dir, timeout)
    if not exclusive:
        _release(turnstile)  # writers only pass through; gc keeps it so no writer enters behind it
    try:
        yield
    finally:
        _release(held)
        if exclusive:
            _release(turnstile)


def _store_locked(locks_dir: Path, timeout: float) -> StoreLockedError:
    # Writers (and verify) hold it shared, gc exclusive: named after gc, it is the lock of the whole store.
    return StoreLockedError(
        f"timed out after {timeout:.0f} s waiting for the store lock ({locks_dir / 'gc.lock'}); another adapterkit "
        "process holds it (a gc, or a command writing to or verifying this store): retry when it is done"
    )
