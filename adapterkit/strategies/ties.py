"""``ties``: TIES-merging (Yadav et al., 2023) on each module's dense delta, truncated back to rank k.

Trim each parent's delta to its largest ``density`` fraction, elect a sign per entry from the
trimmed deltas (``total``: sign of their sum; ``frequency``: sign of the sign count), then
average the weighted deltas that agree with it. This follows PEFT's ``ties`` exactly, minus
its double scaling, but on dense deltas rather than on raw factors.
"""

from __future__ import annotations

from adapterkit.strategies._lowrank import (
    dense_deltas,
    disjoint_merge,
    majority_sign,
    prune_magnitude,
    truncate_dense,
)
from adapterkit.strategies.base import ModuleInput, ModuleResult, Param, Strategy

__all__ = ["STRATEGY", "ties"]


def ties(
    module: ModuleInput,
    *,
    density: float = 0.5,
    majority_sign_method: str = "total",
    rank: int | None = None,
    energy: float | None = None,
) -> ModuleResult:
    trimmed = [prune_magnitude(d, density, inplace=True) for d in dense_deltas(module)]
    sign = majority_sign(trimmed, majority_sign_method)
    merged = disjoint_merge(trimmed, list(module.weights), sign)
    return truncate_dense(merged, rank, energy, max(module.ranks))


STRATEGY = Strategy(
    name="ties",
    function=ties,
    description="TIES: trim to the largest entries, elect signs, average the agreeing ones; truncate to rank k.",
    params={
        "density": Param(float, 0.5, "fraction of each delta's entries kept"),
        "majority_sign_method": Param(str, "total", "'total' or 'frequency'"),
        "rank": Param(int, None, "output rank (default: the parents' largest rank per module)"),
        "energy": Param(float, None, "pick each module's rank to keep this fraction of the energy"),
    },
)
