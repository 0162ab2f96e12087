"""Composition strategies: pure tensor maths, one module each, no I/O and no plugin imports."""

from adapterkit.strategies.base import ModuleInput, ModuleResult, Param, Strategy

__all__ = ["ModuleInput", "ModuleResult", "Param", "Strategy"]
