"""The built-in strategies, registered through the same hook as any third-party plugin.

Hook implementations only. The strategy modules import torch, so they are imported when the
hook runs (a composition), not when the CLI starts.
"""

from __future__ import annotations

from typing import Any

from adapterkit.hookspecs import hookimpl

__all__ = ["register_strategies"]


@hookimpl
def register_strategies(register: Any) -> None:
    from adapterkit.strategies import dare, linear, prune, svd, ties

    for strategy in (linear.STRATEGY, svd.STRATEGY, ties.STRATEGY, dare.DARE_LINEAR, dare.DARE_TIES, prune.STRATEGY):
        register(strategy)
