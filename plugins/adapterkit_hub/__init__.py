"""The Hugging Face Hub remote: ``adapterkit push REF hf://org/name[@branch]``, ``adapterkit pull hf://org/name[@rev]``.

A plugin like any third-party one (entry point ``hf`` in group ``adapterkit``), shipped in the
adapterkit wheel. Importing it costs nothing: huggingface_hub is imported when a remote is used,
not when the CLI loads its plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterkit import hookimpl

if TYPE_CHECKING:
    from adapterkit_hub.remote import HubRemote

__all__ = ["open_hub_remote", "register_remotes"]


def open_hub_remote(url: str) -> HubRemote:
    """A remote for ``url``; endpoint from ``HF_ENDPOINT``, token from ``HF_TOKEN`` or the saved login."""
    from adapterkit_hub.remote import HubRemote

    return HubRemote(url)


@hookimpl
def register_remotes(register: Any) -> None:
    register("hf", open_hub_remote)
