"""``dare_linear`` and ``dare_ties``: DARE (Yu et al., 2023) on each module's dense delta.

Drop each entry of each parent's delta with probability 1 - density and rescale the survivors
by 1 / density, then combine linearly or TIES-style, and truncate back to rank k. Unlike PEFT's,
the masks are a pure function of (seed, module, parent, entry) (a counter-based hash, see
:class:`DareMask`), the parent being its position in the compose call: the same inputs and seed
give the same adapter and digest, on any machine, and a parent's mask does not depend on which
other parents have the module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adapterkit.strategies._dense import DareMask, blend_dense, dense_cost
from adapterkit.strategies.base import (
    DENSITY,
    ENERGY,
    RANK,
    ModuleCost,
    ModuleInput,
    ModuleResult,
    Param,
    PlannedModule,
    Strategy,
)
from adapterkit.strategies.lowrank import derive_seed, ties_merge
from adapterkit.strategies.ties import ELECT_ON_PARAM, MAJORITY_SIGN_METHOD

__all__ = ["DARE_LINEAR", "DARE_TIES", "dare_linear", "dare_ties"]

Combine = Callable[[list[torch.Tensor], list[float]], torch.Tensor]


def _dare(
    module: ModuleInput, density: float, seed: int, rank: int | None, energy: float | None, then: Combine
) -> ModuleResult:
    """Drop each parent's delta entries block by block, combine the blocks with ``then``, truncate.

    The 1 / density rescaling rides on the weights: both combinations are linear in each parent's
    block, and the sign election does not change under a common positive factor.
    """
    masks = [
        DareMask(derive_seed(seed, module.name, position), (B.shape[0], A.shape[1]), density, A.device)
        for position, (A, B) in zip(module.parent_positions(), module.factors, strict=True)
    ]
    weights = [w / density for w in module.weights]

    def combine(blocks: list[torch.Tensor], rows: slice) -> torch.Tensor:
        if density < 1:
            for block, mask in zip(blocks, masks, strict=True):
                block.mul_(mask(rows, block.dtype))
        return then(blocks, weights)

    return blend_dense(module, combine, rank, energy)


def _weighted_sum(blocks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = blocks[0].mul_(weights[0])
    for block, weight in zip(blocks[1:], weights[1:], strict=True):
        total.add_(block, alpha=weight)
    return total


def dare_linear(
    module: ModuleInput,
    *,
    density: float = 0.5,
    seed: int = 0,
    rank: int | None = None,
    energy: float | None = None,
) -> ModuleResult:
    return _dare(module, density, seed, rank, energy, _weighted_sum)


def dare_ties(
    module: ModuleInput,
    *,
    density: float = 0.5,
    seed: int = 0,
    majority_sign_method: str = "total",
    elect_on: str = "weighted",
    rank: int | None = None,
    energy: float | None = None,
) -> ModuleResult:
    def merge(blocks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        return ties_merge(blocks, weights, majority_sign_method, elect_on)

    return _dare(module, density, seed, rank, energy, merge)


def dare_cost(planned: PlannedModule, *, rank: int | None = None, energy: float | None = None, **_: Any) -> ModuleCost:
    return dense_cost(planned, rank, energy, passes=1)


_COMMON = {
    "density": DENSITY,
    "seed": Param(int, 0, "seed of the random masks (per module and parent)"),
    "rank": RANK,
    "energy": ENERGY,
}
DARE_LINEAR = Strategy(
    name="dare_linear",
    function=dare_linear,
    description="DARE: random drop + rescale of each delta (seeded), weighted sum, truncate to rank k.",
    params=_COMMON,
    estimate=dare_cost,
)
DARE_TIES = Strategy(
    name="dare_ties",
    function=dare_ties,
    description="DARE drop + rescale (seeded), then TIES sign election and disjoint mean; truncate to rank k.",
    params={
        **_COMMON,
        "majority_sign_method": MAJORITY_SIGN_METHOD,
        "elect_on": ELECT_ON_PARAM,
    },
    estimate=dare_cost,
)
