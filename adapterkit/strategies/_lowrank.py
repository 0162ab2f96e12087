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
_EXACT_SVD_LIMIT = 256
#: Selections over at most this many entries use ``kthvalue`` directly; larger ones bracket with a sample first.
_SELECT_DIRECTLY = 1 << 18


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


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.kthvalue(values, k).values`` of a 1-D tensor, exactly, in a few linear passes.

    ``kthvalue`` copies and partially sorts all n entries on one core (seconds for a 4096 x 14336
    delta). Here the quantile of a strided sample brackets the answer; counting the entries below
    the bracket and selecting among the few inside it gives the same value. If the bracket misses
    (a pathological distribution) it falls back to ``kthvalue``.
    """
    n = values.numel()
    if n <= _SELECT_DIRECTLY:
        return torch.kthvalue(values.cpu(), k).values.to(values.device)
    sample = values[:: max(1, n // min(1 << 16, n // 64))].sort().values
    m = sample.numel()
    margin = 4.0 / m**0.5  # >= 8 standard deviations of a sample quantile (at most 0.5 / sqrt(m))
    lo = sample[max(0, int((k / n - margin) * m))]
    hi = sample[min(m - 1, int((k / n + margin) * m) + 1)]
    below = int(torch.count_nonzero(values < lo))
    if below < k:
        inside = values[(values >= lo) & (values <= hi)]
        if k - below <= inside.numel():
            return torch.kthvalue(inside.cpu(), k - below).values.to(values.device)
    return torch.kthvalue(values.cpu(), k).values.to(values.device)


def prune_magnitude(delta: torch.Tensor, density: float, *, inplace: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude (ties at the threshold kept).

    ``inplace`` zeroes the others in ``delta`` itself, for callers that own it (saves a full copy).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    keep = round(density * n)
    if keep <= 0:
        return delta.zero_() if inplace else torch.zeros_like(delta)
    magnitude = delta.abs()
    threshold = _kth_smallest(magnitude.flatten(), n - keep + 1)
    mask = magnitude.ge_(threshold)
    return delta.mul_(mask) if inplace else delta * mask


def prune_random(delta: torch.Tensor, density: float, seed: int, *, inplace: bool = False) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density and rescale the rest by 1 / density.

    The mask is drawn on the CPU from a generator seeded per (seed, module, parent), so the same
    seed gives the same adapter on any device. ``inplace`` works in ``delta`` itself.
    """
    if density >= 1:
        return delta
    generator = torch.Generator(device="cpu").manual_seed(seed)
    mask = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    mask = mask.to(delta.device)
    return delta.mul_(mask).div_(density) if inplace else delta * mask / density


def majority_sign(deltas: list[torch.Tensor], method: str) -> torch.Tensor:
    """TIES sign election over the (unweighted, pruned) deltas, as PEFT does: by total or by count.

    Accumulated in place, without stacking the deltas into one more N x out x in tensor.
    """
    if method == "total":
        votes = deltas[0].clone()
        for delta in deltas[1:]:
            votes.add_(delta)
    elif method == "frequency":
        votes = deltas[0].sign()
        for delta in deltas[1:]:
            votes.add_(delta.sign())
    else:
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {method!r}")
    sign = votes.sign_()
    return sign.masked_fill_(sign == 0, 1)


def disjoint_merge(deltas: list[torch.Tensor], weights: list[float], sign: torch.Tensor) -> torch.Tensor:
    """Mean of the weighted deltas over the parents whose entry agrees with the elected sign.

    An entry agrees when it is non-zero with the elected sign (``delta * sign > 0``, sign being
    +-1); one reused buffer holds each parent's agreement as 0/1, and the sums are made in place.
    """
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    agree = torch.empty_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        torch.mul(delta, sign, out=agree).gt_(0)
        total.addcmul_(delta, agree, value=weight)
        count.add_(agree)
    return total.div_(count.clamp_(min=1))


def truncate_dense(delta: torch.Tensor, k: int | None, energy: float | None, default: int) -> ModuleResult:
    """The rank-k truncation of a dense delta: exact SVD when small, randomized (with power iterations) when large."""
    out_dim, in_dim = delta.shape
    if min(out_dim, in_dim) <= _EXACT_SVD_LIMIT or energy is not None:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        U, Vh = _fix_signs(U, Vh)
        rank = choose_rank(S, k, energy, default)
        A, B = _split(U, S, Vh, rank)
        return ModuleResult(A=A, B=B, truncation_error=_relative_tail(S, rank))
    rank = min(k if k is not None else default, min(out_dim, in_dim))
    q = min(rank + 16, min(out_dim, in_dim))
    # float64 accumulation without a float64 copy (a float32 norm is off by ~0.5% at 5e7 entries)
    norm = torch.linalg.vector_norm(delta, dtype=torch.float64)
    # svd_lowrank draws a random sketch: seed it so results are reproducible, without touching the caller's
    # random state on the CPU or on the delta's GPU.
    with torch.random.fork_rng(devices=[delta.device] if delta.device.type == "cuda" else []):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(delta, q=q, niter=6)
    U, Vh = _fix_signs(U, V.T)
    A, B = _split(U, S, Vh, rank)
    residual = B @ A
    error = torch.linalg.vector_norm(torch.sub(delta, residual, out=residual), dtype=torch.float64)
    return ModuleResult(A=A, B=B, truncation_error=float(error / norm) if norm > 0 else 0.0)
