"""``ties``: TIES-merging (Yadav et al., 2023) on each module's dense delta, truncated back to rank k.

Trim each parent's delta to its largest ``density`` fraction, elect a sign per entry from the
trimmed deltas (``total``: sign of their sum; ``frequency``: sign of the sign count), then
average the weighted deltas that agree with it. This follows PEFT's ``ties`` exactly, minus
its double scaling, but on dense deltas rather than on raw factors.
"""

from __future__ import annotations

from typing import Any

import torch

from adapterkit.strategies._dense import blend_dense, dense_cost, magnitude_thresholds, trim
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
    one_of,
)
from adapterkit.strategies.lowrank import disjoint_merge, majority_sign

__all__ = ["MAJORITY_SIGN_METHOD", "STRATEGY", "ties"]

MAJORITY_SIGN_METHOD = Param(str, "total", "'total' or 'frequency'", one_of("total", "frequency"))


def ties(
    module: ModuleInput,
    *,
    density: float = 0.5,
    majority_sign_method: str = "total",
    rank: int | None = None,
    energy: float | None = None,
) -> ModuleResult:
    thresholds = magnitude_thresholds(module.factors, density) if density < 1 else None
    weights = list(module.weights)

    def combine(blocks: list[torch.Tensor], rows: slice) -> torch.Tensor:
        if thresholds is not None:
            blocks = [trim(block, threshold) for block, threshold in zip(blocks, thresholds, strict=True)]
        return disjoint_merge(blocks, weights, majority_sign(blocks, majority_sign_method))

    return blend_dense(module, combine, rank, energy)


def ties_cost(planned: PlannedModule, *, rank: int | None = None, energy: float | None = None, **_: Any) -> ModuleCost:
    return dense_cost(planned, rank, energy, passes=2)  # trimming selects each parent's threshold first


STRATEGY = Strategy(
    name="ties",
    function=ties,
    description="TIES: trim to the largest entries, elect signs, average the agreeing ones; truncate to rank k.",
    params={
        "density": DENSITY,
        "majority_sign_method": MAJORITY_SIGN_METHOD,
        "rank": RANK,
        "energy": ENERGY,
    },
    estimate=ties_cost,
)
