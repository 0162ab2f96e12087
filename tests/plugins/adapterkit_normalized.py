"""A third-party plugin as a user would write one: a strategy and a command, through the public API only.

Installed in tests through a real ``adapterkit`` entry point (see tests/test_plugins.py).
"""

from __future__ import annotations

from typing import Any

import click
import torch

import adapterkit
from adapterkit.hookspecs import hookimpl
from adapterkit.strategies import ModuleInput, ModuleResult, Strategy


def normalized_linear(module: ModuleInput) -> ModuleResult:
    """The exact weighted sum with weights rescaled to sum to one (in absolute value)."""
    total = sum(abs(w) for w in module.weights) or 1.0
    A = torch.cat([(w / total) * A for (A, _), w in zip(module.factors, module.weights, strict=True)], dim=0)
    B = torch.cat([B for _, B in module.factors], dim=1)
    return ModuleResult(A=A, B=B)


@hookimpl
def register_strategies(register: Any) -> None:
    register(Strategy(name="normalized_linear", function=normalized_linear, description="Weights sum to one."))


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command(name="normalized-hello")
    def hello() -> None:
        """Say hello from a plugin."""
        click.echo(f"hello from adapterkit-normalized on adapterkit {adapterkit.__version__}")
