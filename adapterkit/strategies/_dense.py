"""Dense per-module deltas, built and combined one block of rows at a time (pure tensor code).

TIES, DARE and magnitude pruning act entry by entry on each parent's dense change ``B_i @ A_i``.
Materialising every parent's out x in delta and sweeping it a dozen times (abs, masks, votes,
sums) makes those strategies memory-bound. Here each parent's delta exists only as a block of rows
at a time, small enough to stay in cache while every step runs on it; ``B_i[rows] @ A_i`` costs
2r flops an entry, which is cheaper to recompute than to store and read back. The blocks are a
function of the shape and device only, so a delta is always computed the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from adapterkit.strategies.base import ModuleCost, ModuleInput, ModuleResult, PlannedModule
from adapterkit.strategies.lowrank import dense_start, sketch_width, truncate_dense

__all__ = [
    "DareMask",
    "assemble",
    "blend_dense",
    "block_entries",
    "dense_cost",
    "magnitude_thresholds",
    "row_blocks",
    "trim",
]

#: Entries in one block of rows: 128K float32 (512 KB) keeps a few parents' blocks in a core's cache
#: (measured fastest on a 2-core EPYC: 64K and 512K are 5-15% slower, 32K 40%). On a GPU, fewer
#: launches over large blocks is what matters.
_BLOCK_ENTRIES = {"cpu": 1 << 17}
_DEVICE_BLOCK_ENTRIES = 1 << 24
#: Selections over at most this many entries use ``kthvalue`` on all of them.
_SELECT_DIRECTLY = 1 << 18
#: Entries sampled to bracket a threshold.
_SAMPLE = 1 << 16

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]


def block_entries(device_type: str) -> int:
    """Entries in one block of rows on this kind of device."""
    return _BLOCK_ENTRIES.get(device_type, _DEVICE_BLOCK_ENTRIES)


def dense_cost(planned: PlannedModule, rank: int | None, energy: float | None, *, passes: int) -> ModuleCost:
    """The cost of blending dense deltas block by block and truncating back to rank k.

    With R = sum of the parents' ranks, N parents, m x n the delta, L = min(m, n): ``passes`` x 2mnR
    (forming the deltas; thresholded strategies select each parent's threshold in a pass of its
    own) + 10Nmn (trimming, dropping, sign election, disjoint mean) + 2(m + n)R² + 24R³ (the exact
    sum's directions, which start the sketch) + the truncation: an exact SVD, 4 max(m, n) L² + 22 L³,
    with ``energy`` or when the sketch would span half of L, else a sketch of q = k + 16 columns
    refined by subspace iterations (counted as the usual two), 12mnq + 12(m + n)q². Working set
    mn + (m + n)L or (m + n)q, plus (N + 4) blocks of rows, in elements. With ``energy`` the rank
    depends on the dense delta itself, so it is None (``rank_max`` bounds it).
    """
    ranks = planned.module.ranks
    m, n = planned.out_features, planned.in_features
    R, N, L = sum(ranks), len(ranks), min(m, n)
    k = None if energy is not None else max(0, min(rank if rank is not None else max(ranks), L))
    q = sketch_width((m, n), rank, energy, max(ranks))
    if q is None:
        truncation, workspace = 4 * max(m, n) * L**2 + 22 * L**3, m * n + (m + n) * L
    else:
        truncation, workspace = 12 * m * n * q + 12 * (m + n) * q**2, (m + n) * q
    return ModuleCost(
        rank=k,
        rank_max=L,
        flops=passes * 2 * m * n * R + 10 * N * m * n + 2 * (m + n) * R**2 + 24 * R**3 + truncation,
        peak_bytes=(m * n + workspace + (N + 4) * min(m * n, block_entries(planned.device_type)))
        * planned.element_size,
    )


def row_blocks(out_dim: int, in_dim: int, device: torch.device) -> list[slice]:
    """Row ranges covering an out x in matrix, each about one cache-sized block."""
    step = max(1, block_entries(device.type) // max(1, in_dim))
    return [slice(start, min(start + step, out_dim)) for start in range(0, out_dim, step)]


def assemble(
    factors: Factors, combine: Callable[[list[torch.Tensor], slice], torch.Tensor], start: torch.Tensor | None
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """D, the out x in matrix whose rows are ``combine([B_i[rows] @ A_i ...], rows)``; ``||D||²``; and ``Dᵀ start``.

    ``combine`` may overwrite the blocks it is given. The norm (in float64) and the sketch are
    accumulated while each block is still in cache, which spares the truncation a pass over D.
    """
    A0, B0 = factors[0]
    merged = torch.empty(B0.shape[0], A0.shape[1], dtype=A0.dtype, device=A0.device)
    square = torch.zeros((), dtype=torch.float64, device=A0.device)
    sketch = None if start is None else torch.zeros(A0.shape[1], start.shape[1], dtype=A0.dtype, device=A0.device)
    for rows in row_blocks(B0.shape[0], A0.shape[1], A0.device):
        block = combine([B[rows] @ A for A, B in factors], rows)
        merged[rows] = block
        square += torch.linalg.vector_norm(block, dtype=torch.float64).square()
        if sketch is not None:
            sketch.addmm_(block.T, start[rows])
    return merged, float(square), sketch


def blend_dense(
    module: ModuleInput,
    combine: Callable[[list[torch.Tensor], slice], torch.Tensor],
    rank: int | None,
    energy: float | None,
) -> ModuleResult:
    """Build the module's combined dense delta block by block with ``combine``, then truncate it to rank k."""
    A0, B0 = module.factors[0]
    start = dense_start(module, (B0.shape[0], A0.shape[1]), rank, energy)
    merged, square, sketch = assemble(module.factors, combine, start)
    return truncate_dense(merged, rank, energy, max(module.ranks), row_sketch=sketch, square_norm=square)


def magnitude_thresholds(factors: Factors, density: float) -> list[float]:
    """For each parent, the smallest |entry| of ``B @ A`` among its ``round(density * n)`` largest (at least one).

    Entries ``>= threshold`` are kept, so entries tied at the threshold are all kept, where PEFT's
    ``topk`` keeps exactly ``int(density * n)`` and breaks ties arbitrarily: the result does not
    depend on the order ties happen to come in. Exact: equal to ``kthvalue`` over every entry,
    computed from the same row blocks the strategies then prune.
    """
    thresholds = []
    for A, B in factors:
        out_dim, in_dim = B.shape[0], A.shape[1]
        n = out_dim * in_dim
        keep = max(1, round(density * n))
        thresholds.append(_kth_magnitude(A, B, n - keep + 1))
    return thresholds


def trim(block: torch.Tensor, threshold: float) -> torch.Tensor:
    """``block`` with the entries of magnitude below ``threshold`` set to 0, in one float operation.

    ``hardshrink`` zeroes ``|x| <= lambda``; with lambda the float just below the threshold that is
    exactly ``|x| < threshold``, without the bool masks that cost several times more on CPU.
    """
    below = torch.nextafter(torch.tensor(threshold, dtype=block.dtype), torch.tensor(-math.inf, dtype=block.dtype))
    return torch.nn.functional.hardshrink(block, float(below))


def _blocks_abs(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.cat([(B[rows] @ A).abs_().flatten() for rows in row_blocks(B.shape[0], A.shape[1], A.device)])


def _select(values: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """The k-th smallest entries (1-based) of a 1-D tensor, exactly.

    NumPy's introselect, on the CPU: ``torch.kthvalue`` and ``torch.sort`` take 20-100x longer on
    the same entries.
    """
    array = values.cpu().numpy()
    picked = np.partition(array, [k - 1 for k in ks])
    return [float(picked[k - 1]) for k in ks]


def _kth_magnitude(A: torch.Tensor, B: torch.Tensor, k: int) -> float:
    """The k-th smallest |entry| of ``B @ A``, in one pass over its row blocks.

    The quantiles of a sample of ~64K entries (a grid of rows and columns, from the factors
    directly) bracket the answer; counting the entries below the bracket and selecting among the
    few inside it gives the same value as selecting among all of them. If the bracket misses (a
    pathological distribution), every entry is selected among after all.
    """
    out_dim, in_dim = B.shape[0], A.shape[1]
    n = out_dim * in_dim
    if n <= _SELECT_DIRECTLY:
        return _select(_blocks_abs(A, B), [k])[0]
    lo, hi = _bracket(A, B, k / n)
    below_count = 0
    inside = []
    for rows in row_blocks(out_dim, in_dim, A.device):
        values = (B[rows] @ A).abs_()
        if values.device.type == "cpu":  # NumPy's comparisons and masking are ~4x torch's on CPU
            array = values.numpy()
            below_count += int(np.count_nonzero(array < lo))
            keep = array >= lo
            keep &= array <= hi
            inside.append(torch.from_numpy(array[keep]))
        else:
            low = values < lo
            below_count += int(low.sum())
            inside.append(values[(values <= hi) & ~low])
    candidates = torch.cat(inside)
    if below_count < k <= below_count + candidates.numel():
        return _select(candidates, [k - below_count])[0]
    return _select(_blocks_abs(A, B), [k])[0]


def _bracket(A: torch.Tensor, B: torch.Tensor, quantile: float) -> tuple[float, float]:
    """Values below and above the ``quantile`` of |B @ A| with overwhelming probability, from a sample.

    The sample is a grid of evenly spaced rows and columns, so it sees every part of the matrix.
    """
    out_dim, in_dim = B.shape[0], A.shape[1]
    n_rows = min(out_dim, 256)
    n_cols = min(in_dim, _SAMPLE // n_rows)
    rows = torch.arange(n_rows, device=A.device) * out_dim // n_rows
    cols = torch.arange(n_cols, device=A.device) * in_dim // n_cols
    sample = (B[rows] @ A[:, cols]).abs_().flatten()
    m = sample.numel()
    margin = 4.0 / m**0.5  # >= 8 standard deviations of a sample quantile (at most 0.5 / sqrt(m))
    lo_rank = max(1, int((quantile - margin) * m))
    hi_rank = min(m, int((quantile + margin) * m) + 2)
    lo, hi = _select(sample, [lo_rank, hi_rank])
    return lo, hi


# --- DARE's random masks: a counter-based hash of (key, row, column) ----------------------------------------------

_M1, _M2, _M3, _M4 = -1640531535, -2048144789, -1028477387, 668265263  # 0x9E3779B1, murmur3's, 0x27D4EB2F


def _xorshift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x ^= x >>> bits`` on int32 in place (a logical shift: the arithmetic one, masked)."""
    return x.bitwise_xor_(torch.bitwise_right_shift(x, bits).bitwise_and_((1 << (32 - bits)) - 1))


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer, in place on int32 (multiplication wraps as in C)."""
    return _xorshift_right(_xorshift_right(_xorshift_right(x, 16).mul_(_M2), 13).mul_(_M3), 16)


def _int32(value: int) -> int:
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class DareMask:
    """DARE's keep masks for one parent's out x in delta: 1 with probability ``density``, else 0.

    Each entry's draw is a hash of (key, row, column): well-mixed keys per row and per column,
    combined and mixed once more. So a block is the same whichever way the matrix is cut and on
    any device, and costs about ten integer operations per entry, where a Mersenne-Twister draw on
    the CPU costs more than the rest of the strategy. The draw, read as a number in [0, 1) to
    24-bit precision, is compared with ``density``.
    """

    def __init__(self, key: int, shape: tuple[int, int], density: float, device: torch.device) -> None:
        k1, k2 = _int32(key), _int32(key >> 32)
        out_dim, in_dim = shape
        self.row_keys = _fmix32(torch.arange(out_dim, dtype=torch.int32, device=device).mul_(_M1).add_(k1))
        self.column_keys = _fmix32(torch.arange(in_dim, dtype=torch.int32, device=device).mul_(_M4).add_(k2))
        #: draws are uniform int32, so P(draw < cutoff) = (cutoff + 2**31) / 2**32 = density
        self.cutoff = density * 2.0**32 - 2.0**31

    def __call__(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        draws = torch.bitwise_xor(self.row_keys[rows, None], self.column_keys[None, :]).mul_(_M2)
        draws = _xorshift_right(draws, 15).mul_(_M3)
        # sign(cutoff - draw) is 1 where kept, -1 or 0 elsewhere; float operations, no bool masks
        return draws.to(dtype).neg_().add_(self.cutoff).sign_().clamp_min_(0)
