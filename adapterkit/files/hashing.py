"""Bytes checked against their sha256 while they stream: the one place that hashes on the way through.

A check that raises from inside the iterator, before its last chunk is consumed, matters: the
writer consuming it (a store's blob writer, an upload) then fails before it publishes anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

__all__ = ["verified_chunks"]


def verified_chunks(
    chunks: Iterable[bytes],
    digest: str,
    size: int,
    error: Callable[[int, str], Exception],
    progress: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """Yield ``chunks`` while hashing them; raise ``error(bytes_seen, sha256:...)`` unless they are ``size``
    bytes hashing to ``digest``. More bytes than ``size`` raise at once, before they are yielded."""
    hasher = hashlib.sha256()
    seen = 0
    iterator = iter(chunks)
    try:
        for chunk in iterator:
            seen += len(chunk)
            if seen > size:
                raise error(seen, "sha256:?")
            hasher.update(chunk)
            if progress:
                progress(len(chunk))
            yield chunk
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stop a download (close its connection) when the check fails
    got = "sha256:" + hasher.hexdigest()
    if seen != size or got != digest:
        raise error(seen, got)
