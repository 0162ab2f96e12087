"""The hooks a plugin can implement (pluggy project ``adapterkit``, entry-point group ``adapterkit``).

Each hook hands the plugin a callback, as llm's ``register_models`` does, so adapterkit keeps the
registry: it knows which plugin registered what, and refuses two plugins claiming one name.
A plugin may accept only the arguments it needs (pluggy's opt-in arguments), so hooks can grow.
"""

from __future__ import annotations

from typing import Any

import pluggy

__all__ = ["hookimpl", "hookspec", "register_commands", "register_formats", "register_remotes", "register_strategies"]

hookspec = pluggy.HookspecMarker("adapterkit")
hookimpl = pluggy.HookimplMarker("adapterkit")


@hookspec
def register_strategies(register: Any) -> None:
    """Register composition strategies: call ``register(strategy)`` with a :class:`adapterkit.Strategy` each."""


@hookspec
def register_remotes(register: Any) -> None:
    """Register remote backends: call ``register(scheme, factory)``; ``factory(url)`` returns a remote."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``adapterkit`` click group ``cli`` (e.g. with ``@cli.command()``)."""


@hookspec
def register_formats(register: Any) -> None:
    """Register adapter formats: call ``register(format)`` with a :class:`adapterkit.Format` instance each."""
