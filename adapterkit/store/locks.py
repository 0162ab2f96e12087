"""Advisory file locks with a timeout.

Locks guard only two things: compare-and-swap on one ref, and gc against writers (writers hold
the gc lock shared, gc holds it exclusive). Object contents never depend on a lock: they are
published atomically under their own hash. flock locks die with their process, so a killed
writer never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from adapterkit.errors import StoreLockedError

__all__ = ["file_lock"]


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False, timeout: float = 60.0, what: str = "store") -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"timed out after {timeout:.0f} s waiting for the {what} lock ({path}); "
                        "another adapterkit process is working on this store"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
