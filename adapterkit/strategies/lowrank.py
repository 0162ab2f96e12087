"""Low-rank maths shared by the strategies and by inspect: the stacked-factor SVD, rank choice, truncation.

Pure tensor code. Public to the package: ``inspect`` predicts what ``svd --rank`` keeps with the very
calls the strategy makes, so the two can never disagree.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from adapterkit.strategies.base import ModuleInput, ModuleResult

__all__ = [
    "ELECT_ON",
    "derive_seed",
    "disjoint_merge",
    "dense_start",
    "factor_svd",
    "majority_sign",
    "stacked_svd",
    "ties_merge",
    "truncate_dense",
]

#: Extra directions carried through a subspace iteration beyond the rank asked for.
_OVERSAMPLE = 16
#: Subspace iterations (each a pass with Dᵀ and one with D) a sketched truncation makes at least and
#: at most; it stops once an iteration lowers the lost energy by less than _CONVERGED of itself.
_MIN_ITERATIONS = 1
_MAX_ITERATIONS = 8
_CONVERGED = 1e-3
#: Below this fraction of ||D||^2 the lost energy is measured from D - BA, not by subtraction.
_CANCELLATION = 1e-4


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


def derive_seed(seed: int, name: str, index: int) -> int:
    """A seed for (user seed, module, parent's position in the compose call).

    Masks depend neither on the order modules are visited in, nor on the device, nor on which
    other parents have the module.
    """
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def majority_sign(deltas: list[torch.Tensor], method: str) -> torch.Tensor:
    """TIES sign election over the (pruned) deltas it is given: by ``total`` or ``frequency``.

    A ``total`` of exactly zero elects no sign (0), so nothing is kept there: the voters cancel,
    and keeping the positive ones (mergekit and PEFT elect +1 on a zero total) would turn
    ``A - A`` into ``|A|`` instead of nothing. A ``frequency`` tie (as many voters each way, common
    with two parents) goes to +1 as in mergekit and PEFT. Accumulated in place, without stacking
    the deltas into one more N x out x in tensor, and with float operations only (bool-producing
    comparisons are several times slower on CPU).
    """
    if method not in ("total", "frequency"):  # the strategies' parameter check says the same first
        raise ValueError(f"parameter 'majority_sign_method' must be one of 'total', 'frequency', got {method!r}")
    if method == "total":
        votes = deltas[0].clone()
        for delta in deltas[1:]:
            votes.add_(delta)
        return votes.sign_()
    votes = deltas[0].sign()
    for delta in deltas[1:]:
        votes.add_(delta.sign())
    # +1 where the count is +0 (a tie, or nothing to vote on); -0 only arises where every delta is 0
    return torch.ones_like(votes).copysign_(votes)


def disjoint_merge(deltas: list[torch.Tensor], weights: list[float], sign: torch.Tensor) -> torch.Tensor:
    """Mean of the weighted deltas over the parents whose entry agrees with the elected sign (+-1, or 0: none).

    An entry agrees when it is non-zero with the elected sign: ``relu(delta * sign)`` is its
    magnitude where it agrees and 0 elsewhere, so sums and counts need no masks. Overwrites the deltas.
    """
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        agreeing = delta.mul_(sign).clamp_min_(0)
        total.add_(agreeing, alpha=weight)
        count.add_(agreeing.sign_())
    return total.div_(count.clamp_min_(1)).mul_(sign)


#: What TIES elects signs on: the weighted trimmed deltas ``w_i D_i'`` (the TIES paper's Alg. 1 and
#: mergekit), or the unweighted ones ``D_i'`` (PEFT's ``add_weighted_adapter``).
ELECT_ON = ("weighted", "unweighted")


def ties_merge(deltas: list[torch.Tensor], weights: list[float], method: str, elect_on: str) -> torch.Tensor:
    """TIES' sign election and disjoint mean of the (trimmed or dropped) deltas; overwrites them.

    ``weighted``: elect on ``w_i D_i'``, then average the ``w_i D_i'`` that agree with the elected
    sign, so a negatively weighted parent votes against its own delta's sign and is never added
    against the elected one. ``unweighted`` (PEFT): elect on ``D_i'``, then average the ``w_i D_i'``
    whose ``D_i'`` agrees.
    """
    if elect_on not in ELECT_ON:  # the strategies' parameter check says the same first
        raise ValueError(f"parameter 'elect_on' must be one of 'weighted', 'unweighted', got {elect_on!r}")
    if elect_on == "unweighted":
        return disjoint_merge(deltas, weights, majority_sign(deltas, method))
    for delta, weight in zip(deltas, weights, strict=True):
        delta.mul_(weight)
    return disjoint_merge(deltas, [1.0] * len(deltas), majority_sign(deltas, method))


def dense_start(
    module: ModuleInput, shape: tuple[int, int], rank: int | None, energy: float | None
) -> torch.Tensor | None:
    """An out x q orthonormal start W for truncating a dense delta D of this module, or None for an exact SVD.

    D (pruned, dropped, sign-merged) is a perturbation of the parents' exact weighted sum, whose
    dominant directions mostly survive: its leading left singular vectors, from the small core
    (:func:`stacked_svd`), make a start that random sketches need several passes over D to reach.
    Columns beyond the sum's rank are seeded Gaussian, so the start is deterministic.
    """
    out_dim, _ = shape
    q = sketch_width(shape, rank, energy, max(module.ranks))
    if q is None:
        return None
    Qb, _, U, _, _ = stacked_svd(module.factors, module.weights)
    start = Qb @ U[:, :q]
    if start.shape[1] < q:
        generator = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(out_dim, q - start.shape[1], generator=generator, dtype=start.dtype).to(start.device)
        start = torch.linalg.qr(torch.cat([start, noise], dim=1)).Q
    return start


def _output_rank(shape: tuple[int, int], k: int | None, default: int) -> int:
    return min(k if k is not None else default, *shape)


def sketch_width(shape: tuple[int, int], k: int | None, energy: float | None, default: int) -> int | None:
    """Columns of the sketch that truncates a dense delta of ``shape`` to rank k; None for an exact SVD.

    The exact SVD is used with ``energy`` (which needs the whole spectrum) and when a sketch would
    span half the smaller dimension or more, where it saves little.
    """
    q = _output_rank(shape, k, default) + _OVERSAMPLE
    return None if energy is not None or 2 * q >= min(shape) else q


def _project(
    delta: torch.Tensor, row_sketch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``D P`` for P the projector onto ``row_sketch``'s span, as (basis, U, S, Vh) with ``D basis = U S Vh``."""
    basis = torch.linalg.qr(row_sketch).Q
    U, S, small_Vh = torch.linalg.svd(delta @ basis, full_matrices=False)
    return basis, U, S, small_Vh


def truncate_dense(
    delta: torch.Tensor,
    k: int | None,
    energy: float | None,
    default: int,
    *,
    row_sketch: torch.Tensor | None = None,
    square_norm: float | None = None,
) -> ModuleResult:
    """The rank-k truncation of a dense delta D: exact SVD when small, a sketched SVD when large.

    ``row_sketch`` is ``Dᵀ W`` for a start W from :func:`dense_start`, accumulated by the caller
    while it built D (so it costs no pass over D); without it a seeded random start is used. The
    sketch is refined by subspace iteration until an iteration stops paying (at least one, since
    a start from the parents' exact sum misses what pruning moved out of its span). Each result is
    ``D P`` for an orthogonal projector P, so the error follows from the kept singular values and
    ``||D||²`` (``square_norm`` if the caller accumulated it), unless it is so small that the
    subtraction would cancel and ``D - BA`` is formed after all.
    """
    out_dim, in_dim = delta.shape
    q = sketch_width((out_dim, in_dim), k, energy, default)
    if q is None:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        U, Vh = _fix_signs(U, Vh)
        rank = choose_rank(S, k, energy, default)
        A, B = _split(U, S, Vh, rank)
        return ModuleResult(A=A, B=B, truncation_error=_relative_tail(S, rank))
    rank = _output_rank((out_dim, in_dim), k, default)
    if row_sketch is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
        start = torch.randn(out_dim, q, generator=generator, dtype=delta.dtype).to(delta.device)
        row_sketch = delta.T @ start
    total = square_norm if square_norm is not None else float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
    basis, U, S, small_Vh = _project(delta, row_sketch)
    lost = total - float(S[:rank].double().square().sum())
    for iteration in range(_MAX_ITERATIONS):
        # one subspace iteration: the row space D's leading left directions map to, then D on it again
        candidate = _project(delta, delta.T @ U)
        candidate_lost = total - float(candidate[2][:rank].double().square().sum())
        improved = lost - candidate_lost
        if improved > 0:
            basis, U, S, small_Vh = candidate
            lost = candidate_lost
        if iteration + 1 >= _MIN_ITERATIONS and improved <= _CONVERGED * max(lost, 0.0):
            break
    U, Vh = _fix_signs(U, small_Vh @ basis.T)
    A, B = _split(U, S, Vh, rank)
    if total <= 0:
        return ModuleResult(A=A, B=B, truncation_error=0.0)
    if lost > _CANCELLATION * total:
        return ModuleResult(A=A, B=B, truncation_error=math.sqrt(lost / total))
    residual = B @ A
    error = torch.linalg.vector_norm(torch.sub(delta, residual, out=residual), dtype=torch.float64)
    return ModuleResult(A=A, B=B, truncation_error=float(error) / math.sqrt(total))
