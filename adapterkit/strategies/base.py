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

__all__ = [
    "DENSITY",
    "ENERGY",
    "RANK",
    "ModuleCost",
    "ModuleInput",
    "ModuleResult",
    "Param",
    "PlannedModule",
    "Strategy",
    "fraction",
    "one_of",
    "positive",
]


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
class PlannedModule:
    """What a dry run knows of one module before composing it: the parents' folded factors and its size.

    ``out_features`` x ``in_features`` is the delta's shape in factor layout (convolution kernels
    folded into ``in_features``); ``element_size`` is the bytes per element of the compute dtype.
    """

    module: ModuleInput
    out_features: int
    in_features: int
    element_size: int
    device_type: str


@dataclass(frozen=True)
class ModuleCost:
    """A strategy's estimate for one module: output rank (None when it depends on the data), FLOPs, peak bytes."""

    rank: int | None
    rank_max: int | None
    flops: int
    peak_bytes: int
    #: The relative error truncation will make, where the strategy can tell without composing.
    truncation_error: float | None = None
    #: False for a strategy that never truncates (its error is exactly zero, reported as None).
    truncates: bool = True
    #: ``||result delta||_F``, where the strategy can tell without composing (a dry run then refuses an empty blend).
    norm: float | None = None


#: The parameters every truncating strategy takes.
RANK = Param(int, None, "output rank (default: the parents' largest rank per module)", positive)
ENERGY = Param(float, None, "pick each module's rank to keep this fraction of the energy", fraction)
#: The fraction of each delta's entries that TIES, DARE and magnitude pruning keep.
DENSITY = Param(float, 0.5, "fraction of each delta's entries kept", fraction)


@dataclass(frozen=True)
class Strategy:
    name: str
    function: Callable[..., ModuleResult]
    description: str = ""
    params: Mapping[str, Param] = field(default_factory=dict)
    #: Whether the result is a function of the deltas alone (False for strategies that look at factors).
    exact: bool = False
    #: ``estimate(planned, **params)``: what a dry run reports for one module (ranks, FLOPs, peak bytes).
    #: None: the strategy cannot tell before it runs, and ``compose --dry-run`` says so.
    estimate: Callable[..., ModuleCost] | None = None

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The full parameter set (defaults filled in), or ValueError naming an unknown/ill-typed one."""
        return check_params(f"strategy {self.name!r}", self.params, params)
