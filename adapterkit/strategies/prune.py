"""``magnitude_prune``: keep each parent's largest entries, sum, truncate back to rank k.

Works on each module's dense delta (so the result does not depend on how a parent happens to be
factored: B A = (B M)(M⁻¹ A)), one module at a time.
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
    PlannedModule,
    Strategy,
)

__all__ = ["STRATEGY", "magnitude_prune"]


def magnitude_prune(
    module: ModuleInput, *, density: float = 0.5, rank: int | None = None, energy: float | None = None
) -> ModuleResult:
    thresholds = magnitude_thresholds(module.factors, density) if density < 1 else None
    weights = list(module.weights)

    def combine(blocks: list[torch.Tensor], rows: slice) -> torch.Tensor:
        total = torch.zeros_like(blocks[0])
        for i, (block, weight) in enumerate(zip(blocks, weights, strict=True)):
            kept = trim(block, thresholds[i]) if thresholds is not None else block
            total.add_(kept, alpha=weight)
        return total

    return blend_dense(module, combine, rank, energy)


def prune_cost(planned: PlannedModule, *, rank: int | None = None, energy: float | None = None, **_: Any) -> ModuleCost:
    return dense_cost(planned, rank, energy, passes=2)  # each parent's threshold takes a pass of its own


STRATEGY = Strategy(
    name="magnitude_prune",
    function=magnitude_prune,
    description="Keep the largest-magnitude fraction of each delta, weighted sum, truncate to rank k.",
    params={
        "density": DENSITY,
        "rank": RANK,
        "energy": ENERGY,
    },
    estimate=prune_cost,
)
