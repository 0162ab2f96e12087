"""``svd``: the exact weighted sum, truncated to the best rank-k approximation.

Optimal in Frobenius norm (Eckart-Young) and computed from the factors alone: QR of the stacked
factors and an SVD of the small core (see :func:`factor_svd`), never the out x in matrix that
PEFT's ``svd`` type builds and decomposes. ``rank`` fixes k; ``energy`` picks, per module, the
smallest k keeping that fraction of the squared singular values; neither keeps each module at
its parents' largest rank.
"""

from __future__ import annotations

import math

from adapterkit.strategies.base import ENERGY, RANK, ModuleCost, ModuleInput, ModuleResult, PlannedModule, Strategy
from adapterkit.strategies.lowrank import choose_rank, factor_svd, stacked_svd

__all__ = ["STRATEGY", "svd", "svd_cost"]


def svd(module: ModuleInput, *, rank: int | None = None, energy: float | None = None) -> ModuleResult:
    return factor_svd(module, rank=rank, energy=energy, default_rank=max(module.ranks))


def svd_cost(planned: PlannedModule, *, rank: int | None = None, energy: float | None = None) -> ModuleCost:
    """The rank and error ``svd`` will pick, from the spectrum of the exact sum computed as the strategy does.

    FLOPs: 2Rn (folding) + 2(m + n)R² (two Householder QRs) + 24R³ (core product and its SVD with
    vectors) + 2(m + n)Rk (the output factors); working set ((m + n)(2R + k) + 4R²) elements.
    """
    module = planned.module
    S = stacked_svd(module.factors, module.weights)[3]
    k = choose_rank(S, rank, energy, max(module.ranks))
    R, m, n = sum(module.ranks), planned.out_features, planned.in_features
    power = S.double() ** 2
    total = float(power.sum())
    return ModuleCost(
        rank=k,
        rank_max=S.numel(),
        truncation_error=math.sqrt(float(power[k:].sum()) / total) if total > 0 else 0.0,
        norm=math.sqrt(float(power[:k].sum())),
        flops=2 * R * n + 2 * (m + n) * R**2 + 24 * R**3 + 2 * (m + n) * R * k,
        peak_bytes=((m + n) * (2 * R + k) + 4 * R**2) * planned.element_size,
    )


STRATEGY = Strategy(
    name="svd",
    function=svd,
    description="Exact sum, then the optimal rank-k truncation (QR of the factors + SVD of the small core).",
    params={
        "rank": RANK,
        "energy": ENERGY,
    },
    exact=True,
    estimate=svd_cost,
)
