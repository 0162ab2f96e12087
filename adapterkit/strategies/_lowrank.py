"""Shared low-rank and dense-delta maths for the strategies (pure tensor code)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from adapterkit.strategies.base import ModuleInput, ModuleResult

__all__ = [
    "dense_deltas",
    "derive_seed",
    "disjoint_merge",
    "factor_svd",
    "majority_sign",
    "prune_magnitude",
    "prune_random",
    "stacked_svd",
    "truncate_dense",
]

#: Above this size (min of the two dimensions) a dense truncation uses a randomized SVD.
_EXACT_SVD_LIMIT = 1024


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make each singular pair's largest-magnitude entry of U positive, so results do not depend on the LAPACK build."""
    if U.numel() == 0:
        return U, Vh
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors B = U_k sqrt(S_k), A = sqrt(S_k) Vh_k: balanced, so neither factor carries all the scale."""
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root


def choose_rank(S: torch.Tensor, rank: int | None, energy: float | None, default: int) -> int:
    """The output rank: ``rank`` if given, else the smallest keeping ``energy`` of sum(S^2), else ``default``."""
    if rank is not None:
        return max(0, min(rank, S.numel()))
    if energy is not None:
        power = S.double() ** 2
        total = power.sum()
        if total == 0:
            return 0
        kept = torch.cumsum(power, 0) / total
        return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype, device=kept.device)).item()) + 1
    return max(0, min(default, S.numel()))


def _relative_tail(S: torch.Tensor, k: int) -> float:
    power = S.double() ** 2
    total = power.sum()
    return float((power[k:].sum() / total).sqrt()) if total > 0 else 0.0


def stacked_svd(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Qb, Qa, U, S, Vh)`` with ``sum_i w_i B_i A_i = (Qb U) diag(S) (Qa Vhᵀ)ᵀ``, from the R x R core only."""
    A_cat = torch.cat([w * A for (A, _), w in zip(factors, weights, strict=True)], dim=0)
    B_cat = torch.cat([B for _, B in factors], dim=1)
    Qb, Rb = torch.linalg.qr(B_cat)
    Qa, Ra = torch.linalg.qr(A_cat.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb, Qa, U, S, Vh


def factor_svd(module: ModuleInput, *, rank: int | None, energy: float | None, default_rank: int) -> ModuleResult:
    """The best rank-k approximation of ``sum(w B A)``, from QR of the stacked factors and an SVD of the small core.

    With B_cat = Qb Rb and A_catᵀ = Qa Ra, the exact sum is Qb (Rb Raᵀ) Qaᵀ; only the R x R core
    (R = sum of ranks) is decomposed, so the cost is O((in + out) R²) and the out x in matrix is
    never formed. Eckart-Young makes the truncated SVD of the exact sum optimal in Frobenius norm.
    """
    Qb, Qa, U, S, Vh = stacked_svd(module.factors, module.weights)
    U, Vh = _fix_signs(U, Vh)
    k = choose_rank(S, rank, energy, default_rank)
    a_core, b_core = _split(U, S, Vh, k)
    return ModuleResult(A=a_core @ Qa.T, B=Qb @ b_core, truncation_error=_relative_tail(S, k))


def dense_deltas(module: ModuleInput) -> list[torch.Tensor]:
    """Each parent's unweighted change B @ A (out x in), one module at a time."""
    return [B @ A for A, B in module.factors]


def derive_seed(seed: int, name: str, index: int) -> int:
    """A seed for (user seed, module, parent): masks do not depend on module order or device."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def prune_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude (ties at the threshold kept)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = round(density * n)
    if keep <= 0:
        return torch.zeros_like(delta)
    flat = delta.abs().flatten()
    threshold = torch.kthvalue(flat.cpu(), n - keep + 1).values.to(delta.device)
    return delta * (delta.abs() >= threshold)


def prune_random(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density and rescale the rest by 1 / density.

    The mask is drawn on the CPU from a generator seeded per (seed, module, parent), so the same
    seed gives the same adapter on any device.
    """
    if density >= 1:
        return delta
    generator = torch.Generator(device="cpu").manual_seed(seed)
    mask = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return delta * mask.to(delta.device) / density


def majority_sign(deltas: list[torch.Tensor], method: str) -> torch.Tensor:
    """TIES sign election over the (unweighted, pruned) deltas, as PEFT does: by total or by count."""
    stacked = torch.stack(deltas)
    if method == "total":
        sign = stacked.sum(dim=0).sign()
    elif method == "frequency":
        sign = stacked.sign().sum(dim=0).sign()
    else:
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {method!r}")
    return torch.where(sign == 0, torch.ones_like(sign), sign)


def disjoint_merge(deltas: list[torch.Tensor], weights: list[float], sign: torch.Tensor) -> torch.Tensor:
    """Mean of the weighted deltas over the parents whose entry agrees with the elected sign."""
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        agree = (delta.sign() == sign) & (delta != 0)
        total += torch.where(agree, weight * delta, 0.0)
        count += agree
    return total / count.clamp(min=1)


def truncate_dense(delta: torch.Tensor, k: int | None, energy: float | None, default: int) -> ModuleResult:
    """The rank-k truncation of a dense delta: exact SVD when small, randomized (with power iterations) when large."""
    out_dim, in_dim = delta.shape
    norm = torch.linalg.matrix_norm(delta.double())
    if min(out_dim, in_dim) <= _EXACT_SVD_LIMIT or energy is not None:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        U, Vh = _fix_signs(U, Vh)
        rank = choose_rank(S, k, energy, default)
        A, B = _split(U, S, Vh, rank)
        return ModuleResult(A=A, B=B, truncation_error=_relative_tail(S, rank))
    rank = min(k if k is not None else default, min(out_dim, in_dim))
    q = min(rank + 16, min(out_dim, in_dim))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # svd_lowrank draws a random sketch: fix it so results are reproducible
    try:
        U, S, V = torch.svd_lowrank(delta, q=q, niter=6)
    finally:
        torch.random.set_rng_state(generator_state)
    U, Vh = _fix_signs(U, V.T)
    A, B = _split(U, S, Vh, rank)
    error = torch.linalg.matrix_norm((delta - B @ A).double())
    return ModuleResult(A=A, B=B, truncation_error=float(error / norm) if norm > 0 else 0.0)
