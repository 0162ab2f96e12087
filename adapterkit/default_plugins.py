"""The built-in strategies, remotes and formats, registered through the same hooks as any third-party plugin.

Hook implementations only. The strategy modules import torch (and the s3 remote s3fs), so they are
imported when the hook runs, not when the CLI starts.
"""

from __future__ import annotations

from typing import Any

from adapterkit.hookspecs import hookimpl

__all__ = ["register_formats", "register_remotes", "register_strategies"]


@hookimpl
def register_strategies(register: Any) -> None:
    from adapterkit.strategies import dare, linear, prune, svd, ties

    for strategy in (linear.STRATEGY, svd.STRATEGY, ties.STRATEGY, dare.DARE_LINEAR, dare.DARE_TIES, prune.STRATEGY):
        register(strategy)


@hookimpl
def register_remotes(register: Any) -> None:
    from adapterkit.remotes.fsspec import SCHEMES, open_fsspec_remote

    for scheme in SCHEMES:
        register(scheme, open_fsspec_remote)


@hookimpl
def register_formats(register: Any) -> None:
    from adapterkit.formats.gguf import GgufFormat
    from adapterkit.formats.peft import PeftFormat

    register(PeftFormat())
    register(GgufFormat())
