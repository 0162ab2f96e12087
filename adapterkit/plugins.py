"""The plugin manager: a typed facade over pluggy.

Built-in plugins (``DEFAULT_PLUGINS``) and third-party ones (entry points of group
``adapterkit``) go through the same hooks. Entry points are loaded one at a time: a plugin that
fails to import warns and is skipped, so one broken package never breaks the CLI (the failure
llm #1280 shows); ``ADAPTERKIT_STRICT_PLUGINS=1`` turns that warning into an error.
``ADAPTERKIT_DISABLE_PLUGINS=a,b`` blocks plugins by name. Core code calls the typed methods
here, never ``pm.hook`` directly, and learns which plugin registered each name so that a clash
is an error naming both.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from adapterkit import hookspecs
from adapterkit.errors import PluginError

if TYPE_CHECKING:
    import click

    from adapterkit.formats.base import Format
    from adapterkit.strategies.base import Strategy

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "PluginInfo", "Plugins", "get_plugins"]

ENTRY_POINT_GROUP = "adapterkit"
DEFAULT_PLUGINS = ("adapterkit.default_plugins",)


@dataclass(frozen=True)
class PluginInfo:
    name: str
    hooks: tuple[str, ...]
    version: str | None
    builtin: bool


class Plugins:
    """One loaded set of plugins."""

    def __init__(self, *, entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("adapterkit")
        self.pm.add_hookspecs(hookspecs)
        self.failed: dict[str, str] = {}
        self._versions: dict[str, str] = {}
        for blocked in filter(None, (n.strip() for n in os.environ.get("ADAPTERKIT_DISABLE_PLUGINS", "").split(","))):
            self.pm.set_blocked(blocked)
        for module in DEFAULT_PLUGINS:
            self.pm.register(importlib.import_module(module), name=module)
        if entry_points:
            self._load_entry_points()
        self.pm.check_pending()

    def _load_entry_points(self) -> None:
        strict = os.environ.get("ADAPTERKIT_STRICT_PLUGINS", "") not in ("", "0")
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.pm.is_blocked(ep.name) or self.pm.has_plugin(ep.name):
                continue
            try:
                self.pm.register(ep.load(), name=ep.name)
            except Exception as exc:
                message = f"plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
                if strict:
                    raise PluginError(message) from exc
                self.failed[ep.name] = message
                warnings.warn(f"adapterkit: {message}; continuing without it", stacklevel=2)
                continue
            if ep.dist is not None:
                self._versions[ep.name] = ep.dist.version

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register a plugin object (a module or a class with ``@hookimpl`` functions)."""
        return self.pm.register(plugin, name=name)

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)

    def _collect(self, hook: str, key: Callable[..., str]) -> dict[str, tuple[Any, str]]:
        """Call ``hook`` on each plugin in turn with a ``register`` that remembers who registered what."""
        found: dict[str, tuple[Any, str]] = {}
        caller = getattr(self.pm.hook, hook)
        for impl in caller.get_hookimpls():  # registration order: built-ins first
            owner = impl.plugin_name

            def register(*args: Any, _owner: str = owner) -> None:
                name = key(*args)
                if name in found:
                    raise PluginError(
                        f"{hook}: {name!r} is registered by both plugin {found[name][1]!r} and plugin {_owner!r}"
                    )
                found[name] = (args[-1] if len(args) > 1 else args[0], _owner)

            kwargs = {"register": register}
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        return found

    def strategies(self) -> dict[str, Strategy]:
        """Every registered strategy by name."""
        return {name: obj for name, (obj, _) in self._collect("register_strategies", lambda s: s.name).items()}

    def strategy_owners(self) -> dict[str, str]:
        return {name: owner for name, (_, owner) in self._collect("register_strategies", lambda s: s.name).items()}

    def remotes(self) -> dict[str, Callable[[str], Any]]:
        """Remote factories by URL scheme."""
        return {
            scheme: factory
            for scheme, (factory, _) in self._collect("register_remotes", lambda scheme, _f: scheme).items()
        }

    def remote_owners(self) -> dict[str, str]:
        return {
            scheme: owner for scheme, (_, owner) in self._collect("register_remotes", lambda scheme, _f: scheme).items()
        }

    def formats(self) -> dict[str, Format]:
        """Every registered adapter format by name, built-ins first (the order ``add`` tries them in)."""
        return {name: obj for name, (obj, _) in self._collect("register_formats", lambda f: f.name).items()}

    def format_owners(self) -> dict[str, str]:
        return {name: owner for name, (_, owner) in self._collect("register_formats", lambda f: f.name).items()}

    def register_commands(self, cli: click.Group) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(**{arg: cli for arg in impl.argnames})
            except Exception as exc:  # one plugin's command must not take the CLI down
                self.failed[impl.plugin_name] = f"register_commands failed: {type(exc).__name__}: {exc}"
                warnings.warn(f"adapterkit: plugin {impl.plugin_name!r} could not add commands: {exc}", stacklevel=2)

    def info(self) -> list[PluginInfo]:
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = tuple(sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or ()))
            out.append(PluginInfo(name, hooks, self._versions.get(name), name in DEFAULT_PLUGINS))
        return sorted(out, key=lambda p: (not p.builtin, p.name))


@functools.cache
def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded on first use."""
    return Plugins()
