"""The maths of extraction: leading singular triplets of a dense delta, and how many to keep (pure tensors).

A fine-tune's change to one weight, ``D = tuned - base``, is an out x in matrix; the best rank-k
approximation of it in Frobenius norm is its truncated SVD (Eckart-Young). A full SVD costs
O(out * in * min(out, in)) and gives every singular value when only the first few are kept, so
:func:`top_singular` computes just the leading k triplets by a randomized range finder with
subspace (power) iterations: a handful of passes of ``D @ X`` and ``Dᵀ @ Q`` with a thin X, each
O(out * in * k). It stops when a pass no longer changes the energy the k directions capture, so a
delta with a clear low-rank structure costs two passes and a flat spectrum gets more. When k is a
sizeable part of the smaller dimension the sketch would save little, and the exact SVD is used.

Choosing ranks needs no tensors beyond the singular values: :func:`energy_rank` for a fraction of
a module's energy, :func:`allocate_budget` for the ranks that keep the most total energy for a
parameter count across modules. No function here reads a file.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Spectrum",
    "allocate_budget",
    "balanced_factors",
    "energy_rank",
    "gaussian_sketch",
    "relative_error",
    "residual_norm",
    "sketch_width",
    "top_singular",
    "uses_exact_svd",
]

#: Directions carried beyond the k asked for: the sketch's last columns converge slowest.
_MIN_OVERSAMPLE = 16
#: Subspace iterations at most; each is one pass with Dᵀ and one with D.
_MAX_ITERATIONS = 16
#: An iteration that lowers the lost energy by less than this fraction of it (or by less than
#: ``_FLOOR`` of the total, float32's resolution of it) ends the iterations: the error has converged.
_CONVERGED = 1e-4
_FLOOR = 1e-7
#: Matrices up to this many entries get their exact SVD in float64.
_EXACT_IN_FLOAT64 = 1 << 22
#: Entries in one block of rows when a residual is measured (keeps the temporary small).
_BLOCK_ENTRIES = 1 << 22
#: Below this fraction of ||D||² the lost energy is measured from D - BA: ``energy - kept`` would cancel.
_CANCELLATION = 1e-4


@dataclass(frozen=True)
class Spectrum:
    """The leading singular triplets of a matrix D (out x in): ``D ≈ U diag(S) Vh``, S non-increasing.

    ``energy`` is ``||D||_F²`` (accumulated in float64), so ``energy - sum(S[:r]²)`` is what rank r
    leaves out. ``complete`` means S is the whole spectrum (an exact SVD), so no rank beyond
    ``len(S)`` can capture more.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    energy: float
    complete: bool

    def kept(self, rank: int) -> float:
        """``sum(S[:rank]²)``: the energy the leading ``rank`` directions keep (float64)."""
        return float(self.S[:rank].double().square().sum())

    def truncate(self, rank: int) -> Spectrum:
        """The leading ``rank`` triplets only (a view: the rest can be freed once this is kept)."""
        return Spectrum(
            self.U[:, :rank].clone(), self.S[:rank].clone(), self.Vh[:rank].clone(), self.energy, self.complete
        )


def _oversample(k: int) -> int:
    return max(_MIN_OVERSAMPLE, k // 4)


def sketch_width(shape: tuple[int, int], k: int) -> int:
    """Columns of the sketch that finds the leading ``k`` triplets of an out x in matrix."""
    return min(k + _oversample(k), min(shape))


def uses_exact_svd(shape: tuple[int, int], k: int) -> bool:
    """Whether the leading ``k`` triplets of a matrix of ``shape`` come from an exact SVD.

    A sketch spanning half the smaller dimension or more costs about what the exact SVD costs.
    """
    return 2 * sketch_width(shape, k) >= min(shape)


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make each left vector's largest-magnitude entry positive: results independent of the LAPACK build."""
    if U.numel() == 0:
        return U, Vh
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def _energy(D: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(D, dtype=torch.float64)) ** 2


def gaussian_sketch(in_dim: int, q: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The seeded in x q Gaussian test matrix :func:`top_singular` starts from (the same on every device)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(in_dim, q, generator=generator, dtype=dtype).to(device)


def top_singular(
    D: torch.Tensor,
    k: int,
    *,
    start: torch.Tensor | None = None,
    energy: float | None = None,
    sketch: torch.Tensor | None = None,
) -> Spectrum:
    """The leading ``k`` singular triplets of ``D`` (float32 or float64, any device).

    Exact SVD when :func:`uses_exact_svd` says so (then every triplet is returned). Otherwise a
    randomized range finder: ``D`` times a seeded Gaussian test matrix (:func:`gaussian_sketch`;
    ``sketch`` is that product when the caller formed it already, while ``D`` was being read; with
    ``start``, an in x s matrix of directions already known when growing an earlier result, those
    take the first columns), then subspace iterations, each followed by a Rayleigh-Ritz step (an
    SVD of the thin ``Qᵀ D``) that gives the current triplets and the energy they capture, until
    the energy still to gain is negligible. ``energy`` is ``||D||_F²`` when the caller has it.
    """
    out_dim, in_dim = D.shape
    total = _energy(D) if energy is None else energy
    k = max(0, min(k, out_dim, in_dim))
    if uses_exact_svd((out_dim, in_dim), k):
        # float64 while it is cheap: float32's SVD leaves ~1e-6 of ||D|| in the reconstruction, which is a
        # visible part of a small truncation error
        wide = D.double() if D.numel() <= _EXACT_IN_FLOAT64 else D
        U, S, Vh = torch.linalg.svd(wide, full_matrices=False)
        U, Vh = _fix_signs(U, Vh)
        return Spectrum(U.to(D.dtype), S.to(D.dtype), Vh.to(D.dtype), total, complete=True)
    q = sketch_width((out_dim, in_dim), k)
    if start is not None and start.shape[1]:
        omega = gaussian_sketch(in_dim, q, D.dtype, D.device)
        known = start[:, : q - _MIN_OVERSAMPLE // 2].to(device=D.device, dtype=D.dtype)
        sketch = D @ torch.cat([known, omega[:, known.shape[1] :]], dim=1)
    elif sketch is None or sketch.shape != (out_dim, q):
        sketch = D @ gaussian_sketch(in_dim, q, D.dtype, D.device)
    Q = torch.linalg.qr(sketch).Q
    captured_before = -math.inf
    for _ in range(_MAX_ITERATIONS):
        Z = D.T @ Q  # (Qᵀ D)ᵀ: the row space the current left directions reach
        Uz, Sz, Vzh = torch.linalg.svd(Z, full_matrices=False)  # Qᵀ D = Vzhᵀ diag(Sz) Uzᵀ
        captured = float(Sz[:k].double().square().sum())
        if _converged(captured - captured_before, Sz, k, max(total - captured, 0.0), total):
            break
        captured_before = captured
        Q = torch.linalg.qr(D @ Uz).Q
    U, Vh = _fix_signs(Q @ Vzh.T[:, :k], Uz[:, :k].T)
    return Spectrum(U, Sz[:k], Vh, total, complete=False)


def _converged(gain: float, S: torch.Tensor, k: int, lost: float, total: float) -> bool:
    """Whether the energy still to gain by iterating is below ``_CONVERGED`` of what is lost (or float noise).

    Subspace iteration shrinks the angle of the k-th direction by about ``s[q+1] / s[k]`` per
    iteration (s the singular values), so the energy it will still gain is about
    ``gain * rate / (1 - rate)`` with ``rate = (s[q+1] / s[k])**2`` (the ratio squared: a margin over
    the energy's own rate, the fourth power). The sketch's last value stands for ``s[q+1]``. With a
    gap after the k-th value, as a fine-tune's low-rank change above noise has, the second estimate
    is already final and the iterations stop there; a flat spectrum iterates until the gain is small.
    """
    tolerance = _CONVERGED * lost + _FLOOR * total
    if gain <= tolerance:
        return True
    if not math.isfinite(gain) or k == 0 or float(S[k - 1]) <= 0:
        return False
    ratio = min(float(S[-1]) / float(S[k - 1]), 1.0) ** 2
    return ratio < 0.5 and gain * ratio / (1 - ratio) <= tolerance


def balanced_factors(spectrum: Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the rank-``rank`` truncation: B = U √S, A = √S Vh.

    Splitting the singular values evenly keeps both factors at the same scale, which is what
    half-precision storage and further training want.
    """
    root = spectrum.S[:rank].sqrt()
    return root[:, None] * spectrum.Vh[:rank], spectrum.U[:, :rank] * root


def residual_norm(D: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``||D - B @ A||_F``, formed a block of rows at a time (exact, no cancellation, no out x in temporary)."""
    out_dim, in_dim = D.shape
    A = A.to(device=D.device, dtype=D.dtype)
    B = B.to(device=D.device, dtype=D.dtype)
    step = max(1, _BLOCK_ENTRIES // max(1, in_dim))
    square = 0.0
    for begin in range(0, out_dim, step):
        rows = slice(begin, min(begin + step, out_dim))
        block = torch.addmm(D[rows], B[rows], A, alpha=-1)
        square += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
    return math.sqrt(square)


def relative_error(
    spectrum: Spectrum,
    rank: int,
    D: torch.Tensor | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """``||D - B A||_F / ||D||_F`` for the rank-``rank`` truncation (0 for a zero D).

    From the energies (``energy - kept``) when that is well above float rounding; otherwise, or
    when ``factors`` (A, B) are given (rounded to a storage dtype, say), measured on ``D`` itself.
    """
    if spectrum.energy <= 0:
        return 0.0
    lost = spectrum.energy - spectrum.kept(rank)
    if D is not None and (factors is not None or lost < _CANCELLATION * spectrum.energy):
        A, B = factors if factors is not None else balanced_factors(spectrum, rank)
        return residual_norm(D, A, B) / math.sqrt(spectrum.energy)
    return math.sqrt(max(lost, 0.0) / spectrum.energy)


def energy_rank(spectrum: Spectrum, fraction: float) -> int | None:
    """The smallest rank keeping ``fraction`` of the energy, or None when the triplets at hand do not reach it.

    None asks for more triplets; a complete spectrum always answers (at worst its full length).
    """
    if spectrum.energy <= 0:
        return 0
    power = spectrum.S.double().square()
    kept = torch.cumsum(power, 0)
    goal = fraction * spectrum.energy
    reached = torch.nonzero(kept >= goal * (1 - 1e-12))
    if reached.numel():
        return int(reached[0, 0]) + 1
    return int(spectrum.S.numel()) if spectrum.complete else None


def allocate_budget(
    gains: Mapping[str, Sequence[float]], costs: Mapping[str, int], budget: int
) -> tuple[dict[str, int], int]:
    """Ranks per module keeping the most total energy within ``budget`` parameters; and the parameters left.

    ``gains[m]`` are module m's squared singular values (non-increasing), ``costs[m]`` what one
    rank of it costs (in + out). Each rank is an item worth its gain at its cost; because a
    module's gains never increase, taking items by gain per parameter, best first, takes each
    module's ranks in order, and is optimal up to the last item that no longer fits (an item that
    does not fit closes its module; cheaper modules may still take theirs). Ties go to the module
    name, then the rank, so the answer is deterministic.
    """
    ranks = dict.fromkeys(gains, 0)
    heap: list[tuple[float, str, int]] = []
    for name, values in gains.items():
        if len(values) and values[0] > 0:
            heap.append((-values[0] / costs[name], name, 0))
    heapq.heapify(heap)
    left = budget
    while heap:
        _, name, index = heapq.heappop(heap)
        if costs[name] > left:
            continue  # this module's next rank does not fit; it is closed
        ranks[name] = index + 1
        left -= costs[name]
        values = gains[name]
        if index + 1 < len(values) and values[index + 1] > 0:
            heapq.heappush(heap, (-values[index + 1] / costs[name], name, index + 1))
    return ranks, left
