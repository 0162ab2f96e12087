"""``svd``: the exact weighted sum, truncated to the best rank-k approximation.

Optimal in Frobenius norm (Eckart-Young) and computed from the factors alone: QR of the stacked
factors and an SVD of the small core (see :func:`factor_svd`), never the out x in matrix that
PEFT's ``svd`` type builds and decomposes. ``rank`` fixes k; ``energy`` picks, per module, the
smallest k keeping that fraction of the squared singular values; neither keeps each module at
its parents' largest rank.
"""

from __future__ import annotations

from adapterkit.strategies._lowrank import factor_svd
from adapterkit.strategies.base import ENERGY, RANK, ModuleInput, ModuleResult, Strategy

__all__ = ["STRATEGY", "svd"]


def svd(module: ModuleInput, *, rank: int | None = None, energy: float | None = None) -> ModuleResult:
    return factor_svd(module, rank=rank, energy=energy, default_rank=max(module.ranks))


STRATEGY = Strategy(
    name="svd",
    function=svd,
    description="Exact sum, then the optimal rank-k truncation (QR of the factors + SVD of the small core).",
    params={
        "rank": RANK,
        "energy": ENERGY,
    },
    exact=True,
)
