"""``linear``: the exact weighted sum, by concatenating factors.

sum_i w_i B_i A_i = [B_1 ... B_n] [w_1 A_1; ...; w_n A_n], so stacking gives the exact sum with
rank sum(r_i) and no cross terms (PEFT's ``linear`` type mixes factors and is exact only for one
adapter). Nothing is truncated.
"""

from __future__ import annotations

import torch

from adapterkit.strategies.base import ModuleCost, ModuleInput, ModuleResult, PlannedModule, Strategy
from adapterkit.strategies.lowrank import stacked_svd

__all__ = ["STRATEGY", "linear", "linear_cost"]


def linear(module: ModuleInput) -> ModuleResult:
    A = torch.cat([w * A for (A, _), w in zip(module.factors, module.weights, strict=True)], dim=0)
    B = torch.cat([B for _, B in module.factors], dim=1)
    return ModuleResult(A=A, B=B)


def linear_cost(planned: PlannedModule) -> ModuleCost:
    """2Rn FLOPs (folding scaling and weight into A); working set 2(m + n)R elements; output rank R = sum r_i."""
    module = planned.module
    R = sum(module.ranks)
    m, n = planned.out_features, planned.in_features
    S = stacked_svd(module.factors, module.weights)[3]  # the exact sum's spectrum, from the small core
    return ModuleCost(
        rank=R,
        rank_max=R,
        flops=2 * R * n,
        peak_bytes=2 * (m + n) * R * planned.element_size,
        truncates=False,
        norm=float(S.double().norm()),
    )


STRATEGY = Strategy(
    name="linear",
    function=linear,
    description="Exact weighted sum of the deltas (rank = sum of the parents' ranks).",
    exact=True,
    estimate=linear_cost,
)
