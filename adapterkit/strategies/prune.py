"""``magnitude_prune``: keep each parent's largest entries, sum, truncate back to rank k.

Works on each module's dense delta (so the result does not depend on how a parent happens to be
factored: B A = (B M)(M⁻¹ A)), one module at a time.
"""

from __future__ import annotations

from adapterkit.strategies._lowrank import dense_deltas, prune_magnitude, truncate_dense
from adapterkit.strategies.base import ModuleInput, ModuleResult, Param, Strategy

__all__ = ["STRATEGY", "magnitude_prune"]


def magnitude_prune(
    module: ModuleInput, *, density: float = 0.5, rank: int | None = None, energy: float | None = None
) -> ModuleResult:
    merged = sum(
        w * prune_magnitude(d, density, inplace=True) for d, w in zip(dense_deltas(module), module.weights, strict=True)
    )
    return truncate_dense(merged, rank, energy, max(module.ranks))


STRATEGY = Strategy(
    name="magnitude_prune",
    function=magnitude_prune,
    description="Keep the largest-magnitude fraction of each delta, weighted sum, truncate to rank k.",
    params={
        "density": Param(float, 0.5, "fraction of each delta's entries kept"),
        "rank": Param(int, None, "output rank (default: the parents' largest rank per module)"),
        "energy": Param(float, None, "pick each module's rank to keep this fraction of the energy"),
    },
)
