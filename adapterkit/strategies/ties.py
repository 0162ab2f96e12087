"""``ties``: TIES-merging (Yadav et al., 2023) on each module's dense delta, truncated back to rank k.

Trim each parent's delta to its largest ``density`` fraction, elect a sign per entry from the
weighted trimmed deltas ``w_i D_i'`` (``total``: sign of their sum; ``frequency``: sign of the
sign count), then average the weighted deltas that agree with it: the TIES paper's Alg. 1 and
mergekit's election. ``elect_on="unweighted"`` elects on ``D_i'`` as PEFT's ``ties`` does. Works
on dense deltas rather than on raw factors.
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
from adapterkit.strategies.lowrank import ELECT_ON, ties_merge

__all__ = ["ELECT_ON_PARAM", "MAJORITY_SIGN_METHOD", "STRATEGY", "ties"]

MAJORITY_SIGN_METHOD = Param(str, "total", "'total' or 'frequency'", one_of("total", "frequency"))
ELECT_ON_PARAM = Param(
    str, "weighted", "elect signs on the 'weighted' deltas (TIES paper) or 'unweighted' (PEFT)", one_of(*ELECT_ON)
)


def ties(
    module: ModuleInput,
    *,
    density: float = 0.5,
    majority_sign_method: str = "total",
    elect_on: str = "weighted",
    rank: int | None = None,
    energy: float | None = None,
) -> ModuleResult:
    thresholds = magnitude_thresholds(module.factors, density) if density < 1 else None
    weights = list(module.weights)

    def combine(blocks: list[torch.Tensor], rows: slice) -> torch.Tensor:
        if thresholds is not None:
            blocks = [trim(block, threshold) for block, threshold in zip(blocks, thresholds, strict=True)]
        return ties_merge(blocks, weights, majority_sign_method, elect_on)

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
        "elect_on": ELECT_ON_PARAM,
        "rank": RANK,
        "energy": ENERGY,
    },
    estimate=ties_cost,
)
