"""``push`` and ``pull``: find the remote for a URL's scheme and let it move what is missing.

Which schemes exist is the plugin manager's business (``register_remotes``); a bare path is a
``file`` remote. This module only dispatches.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from adapterkit.errors import InvalidReferenceError, PluginError, UnknownRemoteError
from adapterkit.plugins import Plugins, get_plugins
from adapterkit.remotes.base import Progress, Remote, TransferResult
from adapterkit.store import AdapterStore, parse_ref

__all__ = ["open_remote", "pull", "push"]


def _scheme(url: str) -> str:
    scheme = urlsplit(url).scheme
    # "C:\\path" or a bare path: a local directory.
    return scheme if len(scheme) > 1 else "file"


def open_remote(url: str, *, plugins: Plugins | None = None) -> Remote:
    """The remote a plugin registered for ``url``'s scheme."""
    remotes = (plugins or get_plugins()).remotes()
    scheme = _scheme(url)
    if scheme not in remotes:
        known = ", ".join(f"{s}://" for s in sorted(remotes)) or "none"
        raise UnknownRemoteError(f"no remote handles {scheme}:// URLs ({url}); available: {known}")
    remote = remotes[scheme](url)
    if not isinstance(remote, Remote):
        raise PluginError(f"the {scheme}:// plugin returned {type(remote).__name__}, which is not a Remote")
    return remote


def push(
    store: AdapterStore, ref: str, dest: str, *, plugins: Plugins | None = None, progress: Progress | None = None
) -> TransferResult:
    """Publish the adapter ``ref`` at ``dest``, under the ref's name and tag unless ``dest`` names its own."""
    parsed = parse_ref(ref)
    if parsed.name is None:
        raise InvalidReferenceError(f"{ref!r}: push a NAME[:TAG] (or NAME@sha256:...) so the remote has a name for it")
    digest = store.resolve(ref)
    return open_remote(dest, plugins=plugins).push(
        store, digest, parsed.name, parsed.tag or "latest", progress=progress
    )


def pull(
    store: AdapterStore,
    source: str,
    tag: str | None = None,
    *,
    plugins: Plugins | None = None,
    progress: Progress | None = None,
) -> TransferResult:
    """Fetch the adapter ``source`` names into ``store`` and point ``tag`` (default: the remote's) at it."""
    return open_remote(source, plugins=plugins).pull(store, source, tag, progress=progress)
