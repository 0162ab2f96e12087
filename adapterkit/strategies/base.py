"""What a composition strategy is: a name, its parameters, and a pure function per module.

A strategy never sees files, stores or plugins. For one module it receives every parent's
factors with the parent's scaling and weight already folded in (``B_i @ A_i`` is the parent's
weighted change), and returns new factors (and, when it truncated, the relative error it made).
The composition engine does the rest: pairing modules, shapes, dtypes, devices and lineage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["ENERGY", "RANK", "ModuleInput", "ModuleResult", "Param", "Strategy", "fraction", "one_of", "positive"]


@dataclass(frozen=True)
class ModuleInput:
    """One module of every parent that has it.

    ``factors`` hold (A, B) with A as (r, in) and B as (out, r) (convolutions flattened), in
    float32 or float64 on the chosen device, each parent's scaling folded into A, so that
    ``B @ A`` is that parent's change and ``sum(w * B @ A)`` the exact weighted sum.
    ``ranks`` are the parents' own ranks; ``positions`` each parent's position among all the
    adapters of the compose call (parents lacking the module are left out of ``factors`` but keep
    their place), default ``0, 1, ...``: what a per-parent random draw is keyed by.
    """

    name: str
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]]
    weights: Sequence[float]
    ranks: Sequence[int]
    positions: Sequence[int] | None = None

    def parent_positions(self) -> list[int]:
        return list(self.positions) if self.positions is not None else list(range(len(self.factors)))


@dataclass(frozen=True)
class ModuleResult:
    A: torch.Tensor
    B: torch.Tensor
    #: ||exact - result||_F / ||exact||_F where the strategy truncated, else None.
    truncation_error: float | None = None


@dataclass(frozen=True)
class Param:
    """One parameter a strategy accepts: its type and default, shown by ``adapterkit plugins``.

    ``check`` returns what is wrong with a value (None when it is fine), so a bad value is refused
    before any module is touched.
    """

    type: type
    default: Any = None
    help: str = ""
    check: Callable[[Any], str | None] | None = None


def fraction(value: float) -> str | None:
    """A fraction in (0, 1]: a density or an energy."""
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


def positive(value: int) -> str | None:
    return None if value >= 1 else f"must be at least 1, got {value}"


#: The parameters every truncating strategy takes.
RANK = Param(int, None, "output rank (default: the parents' largest rank per module)", positive)
ENERGY = Param(float, None, "pick each module's rank to keep this fraction of the energy", fraction)


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}, got {value!r}"

    return check


@dataclass(frozen=True)
class Strategy:
    name: str
    function: Callable[..., ModuleResult]
    description: str = ""
    params: Mapping[str, Param] = field(default_factory=dict)
    #: Whether the result is a function of the deltas alone (False for strategies that look at factors).
    exact: bool = False

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The full parameter set (defaults filled in), or ValueError naming an unknown/ill-typed one."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(
                f"strategy {self.name!r} takes no parameter {unknown[0]!r} (takes: {', '.join(self.params) or 'none'})"
            )
        out = {}
        for key, spec in self.params.items():
            value = params.get(key, spec.default)
            if value is not None and not isinstance(value, spec.type):
                if spec.type is float and isinstance(value, int):
                    value = float(value)
                else:
                    raise ValueError(
                        f"strategy {self.name!r}: parameter {key!r} must be {spec.type.__name__}, got {value!r}"
                    )
            problem = spec.check(value) if spec.check is not None and value is not None else None
            if problem:
                raise ValueError(f"strategy {self.name!r}: parameter {key!r} {problem}")
            out[key] = value
        return out
