"""The ``Remote`` protocol: what a backend registered through ``register_remotes`` must provide.

A factory registered for a URL scheme (``register("s3", factory)``) is called with the whole URL
the user gave and returns a :class:`Remote`. The remote moves bytes; the local store checks
them: a pull writes through the store's own API, which verifies every digest, and writes the
local ref last, so a failed pull leaves at most unreferenced objects that ``gc`` collects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from adapterkit.store import AdapterStore

__all__ = ["Progress", "Remote", "TransferResult"]

#: Called with a number of bytes each time a chunk has been transferred.
Progress = Callable[[int], None]


@dataclass(frozen=True)
class TransferResult:
    """What a push or pull did."""

    digest: str
    #: push: where the adapter now is on the remote (a URL); pull: the local ref written.
    ref: str
    #: Bytes actually sent or received.
    transferred_bytes: int
    #: Bytes the other side already had and that were therefore not sent.
    skipped_bytes: int


@runtime_checkable
class Remote(Protocol):
    """A backend for one URL (``file:///srv/ak``, ``s3://bucket/prefix``, ``hf://org/repo``)."""

    url: str

    def push(
        self, store: AdapterStore, digest: str, name: str, tag: str, *, progress: Progress | None = None
    ) -> TransferResult:
        """Publish the stored adapter ``digest`` on the remote as ``name:tag``.

        ``name`` and ``tag`` come from the local ref pushed; a URL that names its own target
        (``DEST/NAME:TAG``) overrides them. Only what the remote lacks is sent; the remote's ref
        moves last, and only if nobody moved it since it was read (a conditional write where the
        backend has one).
        """
        ...

    def pull(
        self, store: AdapterStore, source: str, tag: str | None, *, progress: Progress | None = None
    ) -> TransferResult:
        """Fetch the adapter ``source`` names on this remote into ``store``, then point ``tag`` at it.

        ``source`` is the remote-specific rest of the URL (``NAME[:TAG]``, ``NAME@sha256:...``,
        a revision); ``tag`` defaults to the remote's own name and tag. Every fetched byte is
        verified against its digest before anything references it.
        """
        ...
