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

from adapterkit.params import Param, check_params, fraction, one_of, positive

if TYPE_CHECKING:
    import torch

__all__ = ["ENERGY", "RANK", "ModuleInput", "ModuleResult", "Param", "Strategy", "fraction", "one_of", "positive"]


@dataclass(frozen=True)
class ModuleInput:
    """One module of every parent that has it.

    ``factors`` hold (A, B) with A as (r, in) and B as (out, r) (convolutions flattened), in
    float32 or float64 on the chosen device, each parent's scaling folded into A, so that
    ``B @ A`` is that parent's change and ``sum(w * B @ A)`` the exact weighted sum.
    ``ranks`` are the parents' own ranks.
    """

    name: str
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]]
    weights: Sequence[float]
    ranks: Sequence[int]


@dataclass(frozen=True)
class ModuleResult:
    A: torch.Tensor
    B: torch.Tensor
    #: ||exact - result||_F / ||exact||_F where the strategy truncated, else None.
    truncation_error: float | None = None


#: The parameters every truncating strategy takes.
RANK = Param(int, None, "output rank (default: the parents' largest rank per module)", positive)
ENERGY = Param(float, None, "pick each module's rank to keep this fraction of the energy", fraction)


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
        return check_params(f"strategy {self.name!r}", self.params, params)
