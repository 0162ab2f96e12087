"""``dare_linear`` and ``dare_ties``: DARE (Yu et al., 2023) on each module's dense delta.

Drop each entry of each parent's delta with probability 1 - density and rescale the survivors
by 1 / density, then combine linearly or TIES-style, and truncate back to rank k. Unlike PEFT's,
the masks are seeded per (seed, module, parent): the same inputs and seed give the same adapter
and digest, on any machine.
"""

from __future__ import annotations

import torch

from adapterkit.strategies._lowrank import (
    dense_deltas,
    derive_seed,
    disjoint_merge,
    majority_sign,
    prune_random,
    truncate_dense,
)
from adapterkit.strategies.base import ModuleInput, ModuleResult, Param, Strategy

__all__ = ["DARE_LINEAR", "DARE_TIES", "dare_linear", "dare_ties"]


def _dropped(module: ModuleInput, density: float, seed: int) -> list[torch.Tensor]:
    return [
        prune_random(delta, density, derive_seed(seed, module.name, i), inplace=True)
        for i, delta in enumerate(dense_deltas(module))
    ]


def dare_linear(
    module: ModuleInput,
    *,
    density: float = 0.5,
    seed: int = 0,
    rank: int | None = None,
    energy: float | None = None,
) -> ModuleResult:
    merged = sum(w * d for d, w in zip(_dropped(module, density, seed), module.weights, strict=True))
    return truncate_dense(merged, rank, energy, max(module.ranks))


def dare_ties(
    module: ModuleInput,
    *,
    density: float = 0.5,
    seed: int = 0,
    majority_sign_method: str = "total",
    rank: int | None = None,
    energy: float | None = None,
) -> ModuleResult:
    dropped = _dropped(module, density, seed)
    merged = disjoint_merge(dropped, list(module.weights), majority_sign(dropped, majority_sign_method))
    return truncate_dense(merged, rank, energy, max(module.ranks))


_COMMON = {
    "density": Param(float, 0.5, "probability of keeping each entry"),
    "seed": Param(int, 0, "seed of the random masks (per module and parent)"),
    "rank": Param(int, None, "output rank (default: the parents' largest rank per module)"),
    "energy": Param(float, None, "pick each module's rank to keep this fraction of the energy"),
}
DARE_LINEAR = Strategy(
    name="dare_linear",
    function=dare_linear,
    description="DARE: random drop + rescale of each delta (seeded), weighted sum, truncate to rank k.",
    params=_COMMON,
)
DARE_TIES = Strategy(
    name="dare_ties",
    function=dare_ties,
    description="DARE drop + rescale (seeded), then TIES sign election and disjoint mean; truncate to rank k.",
    params={**_COMMON, "majority_sign_method": Param(str, "total", "'total' or 'frequency'")},
)
