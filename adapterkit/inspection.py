"""``inspect`` and dry-run plans: what adapters hold, how they interfere, and what a blend or merge will cost.

Everything here works from the LoRA factors alone and never forms a module's dense ``out x in``
delta, so inspecting a 70B adapter costs about as much as loading it:

* A module's spectrum (the singular values of ``scaling * B @ A``) comes from QR of ``B`` and of
  ``Aᵀ`` and an SVD of the ``r x r`` product of their triangular factors; its Frobenius norm is
  the norm of that spectrum.
* The Frobenius inner product of two deltas is a trace of ``r x r`` Gram matrices:
  ``<B_i A_i, B_j A_j>_F = trace((B_iᵀ B_j)(A_j A_iᵀ))``, which gives their cosine similarity.
* The sign-conflict fraction of two deltas is estimated from a seeded sample of entries, each
  entry computed as a dot product of one row of ``B`` and one column of ``A``.
* The energy kept versus rank by the exact weighted sum comes from the same QR + small-SVD trick
  over the stacked factors that the ``svd`` strategy uses, so it predicts what ``svd --rank`` keeps.

Every function returns plain dicts of numbers, strings and lists (JSON-able as they are), so the
CLI only prints them. Pure tensor maths apart from reading base-model headers in
:func:`plan_merge_summary`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from adapterkit.composition import (
    _common_shape,
    adapter_digest,
    adapter_label,
    check_compatible,
    check_not_empty,
    delta_norm,
    resolve_strategy,
)
from adapterkit.errors import CompositionError, UnsupportedAdapterError
from adapterkit.lora import check_weights
from adapterkit.lora_config import delta_blockers
from adapterkit.strategies._dense import block_entries
from adapterkit.strategies._lowrank import choose_rank, derive_seed, sketch_width, stacked_svd

if TYPE_CHECKING:
    from adapterkit.lora import Adapter, LoraModule
    from adapterkit.plugins import Plugins

__all__ = [
    "DEFAULT_SIGN_SAMPLES",
    "ENERGY_THRESHOLDS",
    "NUMERICAL_RANK_TOLERANCE",
    "effective_rank",
    "factor_inner",
    "factor_spectrum",
    "inspect",
    "plan_compose",
    "plan_merge_summary",
    "sample_entries",
]

#: Energy fractions whose ranks the summary reports (keys of ``ranks_for_energy``).
ENERGY_THRESHOLDS: tuple[float, ...] = (0.9, 0.95, 0.99)
#: Singular values above this fraction of the largest count towards ``numerical_rank``.
NUMERICAL_RANK_TOLERANCE = 1e-6
#: Entries sampled per module for the sign-conflict estimate (standard error at most 0.5 / sqrt(n) ~ 0.008).
DEFAULT_SIGN_SAMPLES = 4096
#: Strategies whose output rank follows from the factors (the rest truncate a dense delta).
_FACTOR_STRATEGIES = ("linear", "svd")
#: Dense strategies that select each parent's magnitude threshold in a pass of its own.
_THRESHOLDED = ("ties", "magnitude_prune")


# --- pure maths on factors ---------------------------------------------------------------------------------------


def _flat(module: LoraModule, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scaling * A, B)`` as ``(r, in * kernel)`` and ``(out, r)``: ``B @ A`` is the delta in factor layout.

    Embeddings and ``fan_in_fan_out`` layers store the delta transposed, and convolutions reshape
    it; neither changes singular values, inner products or the set of entries, so all the
    statistics here are computed in this one layout.
    """
    return module.A.to(dtype).flatten(1) * module.spec.scaling, module.B.to(dtype).flatten(1)


def factor_spectrum(module: LoraModule) -> torch.Tensor:
    """Singular values of one module's ``scaling * B @ A`` (float64), from its r x r core only."""
    return _stacked([_flat(module)], [1.0])


def _stacked(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]) -> torch.Tensor:
    """Singular values of ``sum_i w_i B_i A_i``, computed exactly as the ``svd`` strategy computes them."""
    return stacked_svd(factors, weights)[3]


def factor_inner(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> float:
    """``<B_1 A_1, B_2 A_2>_F`` as ``trace((B_1ᵀ B_2)(A_2 A_1ᵀ))``: two r x r Gram matrices, no dense delta."""
    (A1, B1), (A2, B2) = first, second
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())  # trace(X Y) = sum(X * Yᵀ), and (A_2 A_1ᵀ)ᵀ = A_1 A_2ᵀ


def effective_rank(S: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))`` with ``p = S / sum(S)``: 1 for rank one, r for a flat spectrum.

    Unlike a count of non-zero singular values it is continuous, so an adapter whose rank 16 is
    mostly spent on two directions reads as about 2, not 16. Zero for a zero delta.
    """
    total = S.double().sum()
    if total <= 0:
        return 0.0
    p = S.double() / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _numerical_rank(S: torch.Tensor) -> int:
    if S.numel() == 0 or S[0] <= 0:
        return 0
    return int((NUMERICAL_RANK_TOLERANCE * S[0] < S).sum())


def _energy_curve(S: torch.Tensor) -> torch.Tensor:
    """Fraction of ``sum(S²)`` kept by the best rank-k approximation, for k = 1..len(S) (zeros for a zero delta)."""
    power = S.double() ** 2
    total = power.sum()
    return torch.cumsum(power, 0) / total if total > 0 else torch.zeros_like(power)


def _rank_for(curve: torch.Tensor, energy: float) -> int:
    """The smallest k whose kept fraction reaches ``energy`` (0 for a zero curve), as ``choose_rank`` decides."""
    if curve.numel() == 0 or curve[-1] <= 0:
        return 0
    k = int(torch.searchsorted(curve, torch.tensor(energy, dtype=curve.dtype)).item()) + 1
    return min(k, curve.numel())


def sample_entries(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], samples: int, seed: int
) -> tuple[torch.Tensor, bool]:
    """Entries of every ``B_i @ A_i`` at one shared set of positions: ``(len(factors), n)`` values, and exactness.

    When the matrix has at most ``samples`` entries, all of them are returned in order (exact).
    Otherwise ``samples`` positions are drawn uniformly with replacement from a CPU generator
    seeded with ``seed``, so the estimate is the same on every run and device; each entry is the
    dot product of a row of ``B`` with a column of ``A`` (O(samples * r) per factor pair).
    """
    rows, cols = factors[0][1].shape[0], factors[0][0].shape[1]
    if rows * cols <= samples:
        return torch.stack([(B @ A).flatten() for A, B in factors]), True
    generator = torch.Generator(device="cpu").manual_seed(seed)
    index = torch.randint(0, rows * cols, (samples,), generator=generator)
    r_idx, c_idx = index // cols, index % cols
    return torch.stack([(B[r_idx] * A[:, c_idx].T).sum(dim=1) for A, B in factors]), False


def _conflict(values_i: torch.Tensor, values_j: torch.Tensor, exact: bool) -> tuple[float, float]:
    """Fraction of entries whose signs are strictly opposite, and its standard error (0 when exact).

    A zero entry conflicts with nothing. Sampled positions are independent, so the count is
    binomial and the standard error is ``sqrt(p (1 - p) / n)``.
    """
    opposite = (values_i * values_j) < 0
    p = float(opposite.double().mean())
    return p, 0.0 if exact else math.sqrt(p * (1 - p) / opposite.numel())


# --- argument checks shared with compose ------------------------------------------------------------------------


def _check_deltas(adapters: Sequence[Adapter]) -> None:
    """Refuse adapters whose weight change is not ``scaling * B @ A``: every number here would be wrong."""
    for adapter in adapters:
        blocking = delta_blockers(adapter.config)
        if blocking:
            raise UnsupportedAdapterError(
                f"adapter {adapter_digest(adapter)[:19]} sets {blocking[0]!r}: its weight change is not "
                "scaling * B @ A, so it cannot be inspected"
            )


def _present(adapters: Sequence[Adapter], weights: Sequence[float], name: str) -> list[tuple[int, LoraModule, float]]:
    return [
        (i, a.modules[name], w) for i, (a, w) in enumerate(zip(adapters, weights, strict=True)) if name in a.modules
    ]


def _factor_bytes(adapter: Adapter) -> int:
    return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in adapter.modules.values())


def _energy_key(energy: float) -> str:
    return format(energy, "g")


# --- inspect ----------------------------------------------------------------------------------------------------


def inspect(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    *,
    rank_curve: bool = False,
    sign_samples: int = DEFAULT_SIGN_SAMPLES,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Describe ``adapters`` and, for two or more, how their (weighted) deltas interfere; JSON-able.

    Per adapter and module: rank, spectrum, effective and numerical rank, Frobenius norm. For two
    or more adapters, per pair and shared module: cosine similarity and estimated sign-conflict
    fraction of the weighted deltas. For the exact weighted sum (any number of adapters, so one
    adapter shows how far ``svd`` can compress it): the ranks keeping 90/95/99% of the energy per
    module and for one rank shared by all modules, plus the whole curves with ``rank_curve``.

    Two or more adapters must pass the checks ``compose`` makes (same base unless ``force``, the
    same shape for a module they share), since the interference numbers predict a blend.

    Definitions (``D`` is a module's ``scaling * B @ A``; per-adapter numbers ignore the weight,
    interference and energy use the weighted ``w * D``):

    * ``effective_rank``: ``exp(-sum p log p)`` with ``p = S / sum(S)`` (Roy & Vetterli, 2007),
      a continuous "how many directions carry the change"; ``numerical_rank``: the number of
      singular values above ``NUMERICAL_RANK_TOLERANCE`` (1e-6) times the largest.
    * ``cosine``: ``<w_i D_i, w_j D_j>_F / (|w_i D_i| |w_j D_j|)`` per shared module (None when
      either is zero); a pair's ``cosine`` treats each adapter's deltas as one vector over all its
      modules, ``mean_cosine`` averages the shared modules' cosines.
    * ``sign_conflict``: the fraction of entries where ``w_i D_i`` and ``w_j D_j`` have strictly
      opposite signs. A module with at most ``sign_samples`` entries is counted exactly
      (``exact``, standard error 0); otherwise ``sign_samples`` positions are drawn uniformly with
      replacement (CPU generator seeded from ``seed`` and the module name, the same positions for
      every pair), so the estimate is binomial with standard error ``sqrt(p (1 - p) / n)``. A pair's
      figure weights modules by their entry counts; its error combines the modules' in quadrature.
    * ``energy``: for the exact weighted sum of each module, the fraction of ``sum(S²)`` kept by
      the best rank-k approximation; ``ranks_for_energy`` holds the smallest k reaching each of
      ``ENERGY_THRESHOLDS`` (as ``svd --energy`` picks it); ``overall`` is the same for one rank k
      used by every module (``svd --rank k``): ``sum_m kept_m(k) / sum_m total_m``.

    Shape: ``{"weights", "adapters": [{"index", "digest", "weight", "num_modules",
    "num_parameters", "size_bytes", "ranks": {"min", "max"}, "mean_effective_rank",
    "frobenius_norm", "modules": {name: {"kind", "shape", "r", "scaling", "frobenius_norm",
    "effective_rank", "numerical_rank", "spectrum"}}}], "interference": None | {"sign_samples",
    "seed", "pairs": [{"adapters": [i, j], "shared_modules", "cosine", "mean_cosine",
    "sign_conflict", "sign_conflict_stderr", "modules": {name: {"cosine", "sign_conflict",
    "sign_conflict_stderr", "exact", "entries"}}}]}, "energy": {"thresholds", "modules": {name:
    {"adapters", "input_rank", "numerical_rank", "frobenius_norm", "ranks_for_energy": {"0.9",
    "0.95", "0.99"}, ["curve"]}}, "overall": {"max_rank", "frobenius_norm", "ranks_for_energy",
    ["curve"]}}}``, curves only with ``rank_curve``.
    """
    values = check_weights(adapters, weights, "inspect")
    if sign_samples < 1:
        raise CompositionError(f"sign_samples must be at least 1, got {sign_samples}")
    _check_deltas(adapters)
    if len(adapters) > 1:
        check_compatible(adapters, force=force)
    from adapterkit.weighting import check_finite_factors, check_weight_range

    labels = [adapter_label(adapter, i) for i, adapter in enumerate(adapters)]
    check_finite_factors(adapters, labels)
    # The report squares singular values in float64; weights compose could use in float32 keep them finite.
    check_weight_range(adapters, values, labels, torch.float32)
    names = sorted({name for adapter in adapters for name in adapter.modules})
    for name in names:
        _common_shape(name, [m.spec for _, m, _ in _present(adapters, values, name)])

    report: dict[str, Any] = {
        "weights": values,
        "adapters": [_describe_adapter(i, a, w) for i, (a, w) in enumerate(zip(adapters, values, strict=True))],
        "interference": None,
        "energy": _energy_report(adapters, values, names, rank_curve),
    }
    if len(adapters) > 1:
        report["interference"] = _interference(adapters, values, names, sign_samples, seed)
    return report


def _describe_adapter(index: int, adapter: Adapter, weight: float) -> dict[str, Any]:
    modules: dict[str, Any] = {}
    squared = 0.0
    for name in sorted(adapter.modules):
        module = adapter.modules[name]
        S = factor_spectrum(module)
        norm = float(S.norm())
        squared += norm**2
        modules[name] = {
            "kind": module.spec.kind,
            "shape": list(module.spec.base_shape),
            "r": module.spec.r,
            "scaling": module.spec.scaling,
            "frobenius_norm": norm,
            "effective_rank": effective_rank(S),
            "numerical_rank": _numerical_rank(S),
            "spectrum": S.tolist(),
        }
    ranks = [m.spec.r for m in adapter.modules.values()]
    effective = [m["effective_rank"] for m in modules.values()]
    return {
        "index": index,
        "digest": adapter.digest,
        "weight": weight,
        "num_modules": len(modules),
        "num_parameters": adapter.num_parameters,
        "size_bytes": _factor_bytes(adapter),
        "ranks": {"min": min(ranks), "max": max(ranks)},
        "mean_effective_rank": sum(effective) / len(effective),
        "frobenius_norm": math.sqrt(squared),
        "modules": modules,
    }


def _interference(
    adapters: Sequence[Adapter], weights: list[float], names: list[str], samples: int, seed: int
) -> dict[str, Any]:
    """Pairwise cosine and sign conflict of the weighted deltas, per shared module and over the model."""
    n = len(adapters)
    pairs: dict[tuple[int, int], dict[str, Any]] = {
        (i, j): {"modules": {}, "inner": 0.0} for i in range(n) for j in range(i + 1, n)
    }
    squared = [0.0] * n  # each weighted adapter's squared norm over all its modules
    for name in names:
        present = _present(adapters, weights, name)
        factors = {i: _flat(m) for i, m, _ in present}
        weighted = {i: (w * factors[i][0], factors[i][1]) for i, _, w in present}
        norms = {i: math.sqrt(max(factor_inner(weighted[i], weighted[i]), 0.0)) for i in weighted}
        for i in norms:
            squared[i] += norms[i] ** 2
        if len(present) < 2:
            continue
        order = [i for i, _, _ in present]
        entries, exact = sample_entries([weighted[i] for i in order], samples, derive_seed(seed, name, 0))
        row = dict(zip(order, entries, strict=True))
        for a_pos, i in enumerate(order):
            for j in order[a_pos + 1 :]:
                inner = factor_inner(weighted[i], weighted[j])
                denominator = norms[i] * norms[j]
                conflict, stderr = _conflict(row[i], row[j], exact)
                pairs[(i, j)]["inner"] += inner
                pairs[(i, j)]["modules"][name] = {
                    "cosine": inner / denominator if denominator > 0 else None,
                    "sign_conflict": conflict,
                    "sign_conflict_stderr": stderr,
                    "exact": exact,
                    "entries": weighted[i][1].shape[0] * weighted[i][0].shape[1],
                }
    out = []
    for (i, j), pair in pairs.items():
        modules = pair["modules"]
        cosines = [m["cosine"] for m in modules.values() if m["cosine"] is not None]
        total = sum(m["entries"] for m in modules.values())
        denominator = math.sqrt(squared[i] * squared[j])
        out.append(
            {
                "adapters": [i, j],
                "shared_modules": len(modules),
                "cosine": pair["inner"] / denominator if denominator > 0 else None,
                "mean_cosine": sum(cosines) / len(cosines) if cosines else None,
                "sign_conflict": sum(m["sign_conflict"] * m["entries"] for m in modules.values()) / total
                if total
                else None,
                "sign_conflict_stderr": math.sqrt(
                    sum((m["sign_conflict_stderr"] * m["entries"]) ** 2 for m in modules.values())
                )
                / total
                if total
                else None,
                "modules": modules,
            }
        )
    return {"sign_samples": samples, "seed": seed, "pairs": out}


def _energy_report(adapters: Sequence[Adapter], weights: list[float], names: list[str], curves: bool) -> dict[str, Any]:
    """Energy kept versus rank by the exact weighted sum: per module, and for one rank used by every module.

    A rank k shared by all modules keeps ``sum_m E_m(k) / sum_m E_m(∞)`` of the model's energy,
    where ``E_m(k)`` is the sum of module m's k largest squared singular values: that is the
    curve to read ``svd --rank`` from (``svd --energy`` picks each module's k from its own curve).
    """
    modules: dict[str, Any] = {}
    powers: list[torch.Tensor] = []
    for name in names:
        present = _present(adapters, weights, name)
        S = _stacked([_flat(m) for _, m, _ in present], [w for _, _, w in present])
        power = S.double() ** 2
        powers.append(power)
        curve = _energy_curve(S)
        entry: dict[str, Any] = {
            "adapters": [i for i, _, _ in present],
            "input_rank": sum(m.spec.r for _, m, _ in present),
            "numerical_rank": _numerical_rank(S),
            "frobenius_norm": float(S.norm()),
            "ranks_for_energy": {_energy_key(e): min(choose_rank(S, None, e, 0), S.numel()) for e in ENERGY_THRESHOLDS},
        }
        if curves:
            entry["curve"] = curve.tolist()
        modules[name] = entry
    longest = max((p.numel() for p in powers), default=0)
    kept = torch.zeros(longest, dtype=torch.float64)
    for power in powers:
        cumulative = torch.cumsum(power, 0)
        kept[: power.numel()] += cumulative
        if power.numel() < longest:
            kept[power.numel() :] += cumulative[-1]
    total = float(kept[-1]) if longest else 0.0
    overall = kept / total if total > 0 else torch.zeros_like(kept)
    summary: dict[str, Any] = {
        "max_rank": longest,
        "frobenius_norm": math.sqrt(total),
        "ranks_for_energy": {_energy_key(e): _rank_for(overall, e) for e in ENERGY_THRESHOLDS},
    }
    if curves:
        summary["curve"] = overall.tolist()
    return {"thresholds": list(ENERGY_THRESHOLDS), "modules": modules, "overall": summary}


# --- compose --dry-run ------------------------------------------------------------------------------------------


def _dtype_code(dtype: torch.dtype) -> str:
    from adapterkit.lora import TORCH_DTYPES

    return TORCH_DTYPES[dtype]


def plan_compose(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    strategy: str = "linear",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    plugins: Plugins | None = None,
    **params: Any,
) -> dict[str, Any]:
    """What ``compose`` with the same arguments would produce and cost, without composing; JSON-able.

    Raises what ``compose`` raises before its first module (weights, strategy, parameters,
    bases, module shapes), and the empty-blend error where the plan can tell. Output ranks per module:

    * ``linear``: the sum of the parents' ranks (the factors are stacked);
    * ``svd``: ``rank``, else the smallest k keeping ``energy``, else the parents' largest rank,
      from the spectrum of the exact sum (QR of the stacked factors + SVD of the small core,
      computed with the calls and dtype ``compose`` uses, so the k is the one it picks); the
      predicted ``truncation_error`` is the one ``compose`` records in the lineage;
    * strategies that truncate a dense delta (``ties``, ``dare_*``, ``magnitude_prune``):
      ``rank``, else the parents' largest rank, capped at ``min(out, in)``; with ``energy`` the
      rank depends on the dense delta itself, so it is ``None`` (``rank_max`` bounds it);
    * any other strategy: ``None``.

    Estimates use R = sum of the parents' ranks, k = output rank, m x n = out x (in * kernel), N
    parents and e = bytes per element of the compute dtype:

    * ``linear``: 2Rn FLOPs (folding scaling and weight into A); working set 2(m + n)R e;
    * ``svd``: 2Rn + 2(m + n)R² (two Householder QRs) + 24R³ (core product and its SVD with
      vectors) + 2(m + n)Rk (forming the output factors); working set ((m + n)(2R + k) + 4R²) e;
    * dense: 2mnR (forming the deltas block by block; twice for ``ties`` and ``magnitude_prune``,
      whose thresholds take a pass of their own) + 10Nmn (trimming, dropping, sign election,
      disjoint mean) + 2(m + n)R² + 24R³ (the exact sum's directions, which start the sketch) +
      the truncation: an exact SVD, 4 max(m, n) L² + 22 L³ with L = min(m, n), with ``energy`` or
      when the sketch would span half of L, else a sketch of q = k + 16 columns refined by subspace
      iterations until they stop paying (counted as the usual two), 12mnq + 12(m + n)q²;
      working set (mn + (m + n)L or (m + n)q + (N + 4) b) e, b being the entries in one block of
      rows (128K on CPU).

    ``module_peak_bytes`` is the largest module's working set; ``peak_bytes`` adds the parents'
    factors and the result's factors, which compose holds throughout. These are estimates for
    choosing between settings, not measurements.
    """
    from adapterkit.devices import resolve_device
    from adapterkit.weighting import check_finite_factors, check_weight_range

    values = check_weights(adapters, weights, "compose")
    chosen, resolved = resolve_strategy(strategy, params, plugins)
    device_type = resolve_device(device).type
    base_model = check_compatible(adapters, force=force)
    labels = [adapter_label(adapter, i) for i, adapter in enumerate(adapters)]
    check_finite_factors(adapters, labels)

    factor_dtypes = {m.A.dtype for a in adapters for m in a.modules.values()}
    out_dtype = dtype or (factor_dtypes.pop() if len(factor_dtypes) == 1 else torch.float32)
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    identity = chosen.name == "linear" and len(adapters) == 1 and values[0] == 1.0
    if not identity:
        check_weight_range(adapters, values, labels, min(compute, out_dtype, key=lambda d: torch.finfo(d).max))
    if identity:
        out_dtype = None  # the parent itself, factors untouched
    notes: list[str] = []
    if identity:
        notes.append("one adapter with weight 1: the result is the parent itself, bit for bit")
    kind = chosen.name if chosen.name in _FACTOR_STRATEGIES else "dense" if "rank" in chosen.params else "other"
    if kind == "other":
        notes.append(f"strategy {strategy!r} is not one whose output rank can be predicted; ranks and costs unknown")
    rank, energy = resolved.get("rank"), resolved.get("energy")
    esize = torch.empty((), dtype=compute).element_size()
    #: ||delta|| of each module's result and sum_i |w_i| ||D_i|| of its parents, where the plan can tell (linear, svd).
    norms: dict[str, float] = {}
    scales: dict[str, float] = {}

    modules: dict[str, Any] = {}
    sizes: dict[str, tuple[int, int]] = {}  # (out, in * kernel): an output factor pair holds rank * (out + in) values
    names = sorted({name for adapter in adapters for name in adapter.modules})
    for name in names:
        present = _present(adapters, values, name)
        shape = _common_shape(name, [m.spec for _, m, _ in present])
        m = shape.out_features
        n = shape.in_features * math.prod(shape.kernel)
        sizes[name] = (m, n)
        ranks = [module.spec.r for _, module, _ in present]
        R, N, L = sum(ranks), len(present), min(m, n)
        entry: dict[str, Any] = {
            "shape": list(shape.base_shape),
            "adapters": [i for i, _, _ in present],
            "input_ranks": ranks,
            "input_rank": R,
        }
        if kind in ("linear", "svd"):
            factors = [
                (module.A.to(dtype=compute).flatten(1) * module.spec.scaling, module.B.to(dtype=compute).flatten(1))
                for _, module, _ in present
            ]
            scales[name] = sum(abs(w) * delta_norm(A, B) for (A, B), (_, _, w) in zip(factors, present, strict=True))
        if kind == "linear":
            k = ranks[0] if identity else R
            norms[name] = scales[name] if identity else float(_stacked(factors, [w for _, _, w in present]).norm())
            entry.update(rank=k, rank_max=k, truncation_error=None)
            entry.update(flops=0 if identity else 2 * R * n, peak_bytes=0 if identity else 2 * (m + n) * R * esize)
        elif kind == "svd":
            S = _stacked(factors, [w for _, _, w in present])
            k = choose_rank(S, rank, energy, max(ranks))
            power = S.double() ** 2
            total = float(power.sum())
            norms[name] = math.sqrt(float(power[:k].sum()))
            entry.update(
                rank=k,
                rank_max=S.numel(),
                truncation_error=math.sqrt(float(power[k:].sum()) / total) if total > 0 else 0.0,
                flops=2 * R * n + 2 * (m + n) * R**2 + 24 * R**3 + 2 * (m + n) * R * k,
                peak_bytes=((m + n) * (2 * R + k) + 4 * R**2) * esize,
            )
        elif kind == "dense":
            k = None if energy is not None else max(0, min(rank if rank is not None else max(ranks), L))
            q = sketch_width((m, n), rank, energy, max(ranks))
            if q is None:
                truncation, workspace = 4 * max(m, n) * L**2 + 22 * L**3, m * n + (m + n) * L
            else:
                truncation, workspace = 12 * m * n * q + 12 * (m + n) * q**2, (m + n) * q
            passes = 2 if chosen.name in _THRESHOLDED else 1  # trimming selects each parent's threshold first
            entry.update(
                rank=k,
                rank_max=L,
                flops=passes * 2 * m * n * R + 10 * N * m * n + 2 * (m + n) * R**2 + 24 * R**3 + truncation,
                peak_bytes=(m * n + workspace + (N + 4) * min(m * n, block_entries(device_type))) * esize,
            )
        else:
            entry.update(rank=None, rank_max=None, flops=None, peak_bytes=None)
        modules[name] = entry

    known = [e["rank"] for e in modules.values() if e["rank"] is not None]
    dropped = sorted(name for name, e in modules.items() if e["rank"] == 0)
    if norms:  # the dense strategies' results depend on the dense deltas: compose itself tells
        check_not_empty(norms, scales, torch.float64 if identity else compute, strategy)
    unknown = len(known) < len(modules)
    kept = [k for k in known if k > 0]
    output_parameters: int | None = None
    output_bytes: int | None = None
    if identity:
        output_parameters, output_bytes = adapters[0].num_parameters, _factor_bytes(adapters[0])
    elif not unknown:
        assert out_dtype is not None
        output_parameters = sum(e["rank"] * sum(sizes[name]) for name, e in modules.items())
        output_bytes = output_parameters * torch.empty((), dtype=out_dtype).element_size()
    input_bytes = sum(_factor_bytes(a) for a in adapters)
    flops = None if any(e["flops"] is None for e in modules.values()) else sum(e["flops"] for e in modules.values())
    module_peak = None if kind == "other" else max((e["peak_bytes"] for e in modules.values()), default=0)
    return {
        "strategy": strategy,
        "parameters": {key: value for key, value in resolved.items() if value is not None},
        "weights": values,
        "device": str(device) if device is not None else "cpu",
        "dtype": _dtype_code(out_dtype) if out_dtype is not None else None,
        "compute_dtype": _dtype_code(compute),
        "base_model": base_model,
        "num_modules": len(modules) - len(dropped),
        "dropped_modules": dropped,
        "ranks": {"min": min(kept), "max": max(kept)} if kept else None,
        "ranks_known": not unknown,
        "output_parameters": output_parameters,
        "output_bytes": output_bytes,
        "input_bytes": input_bytes,
        "flops": flops,
        "module_peak_bytes": module_peak,
        "peak_bytes": None if module_peak is None or output_bytes is None else input_bytes + output_bytes + module_peak,
        "notes": notes,
        "modules": modules,
    }


# --- merge --dry-run --------------------------------------------------------------------------------------------


def plan_merge_summary(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None,
    base_dir: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """What ``merge`` with the same arguments would write and cost, from :func:`~adapterkit.merging.plan_merge`.

    Raises exactly what ``merge`` raises before writing (it runs the same plan). Keys shared with
    ``MergeReport.to_json`` mean the same: ``merged_tensors`` is the sorted list of base tensors
    that receive a delta and ``bytes_written`` the output shards' size (headers included).

    ``flops`` is the sum over merged tensors of ``2 * rows * cols * r`` per contribution with a
    non-zero weight (one ``addmm_`` each; the plan leaves zero-weight contributions out). ``peak_bytes``
    follows merge's streaming: it holds the adapters' factors, one tensor's factors converted to
    the compute dtype (float32, float64 for a float64 base or output), and reusable buffers sized
    by the largest row block (``shard_writer._BLOCK_ELEMENTS`` elements or one whole row, whichever is
    larger): a raw input block and a compute block per worker thread, and ``shard_writer._WRITE_DEPTH``
    plus one per worker output blocks in flight. The number of workers depends on the machine's
    cores; the estimate takes the most a CPU merge uses (``shard_writer._MAX_WORKERS``; 1 on a GPU), so
    it does not change from machine to machine. Whole tensors are never held, so ``largest_tensor``
    is there for reference only.
    """
    from adapterkit.merge_plan import plan_merge
    from adapterkit.merging import _device
    from adapterkit.safetensors_io import DTYPE_SIZES
    from adapterkit.shard_writer import _BLOCK_ELEMENTS, _MAX_WORKERS, _WRITE_DEPTH, _shard_header

    plan = plan_merge(adapters, weights, base_dir, dtype=dtype, force=force)
    touched: dict[str, Any] = {}
    converted = copied = 0
    headers = 0
    flops = 0
    update_peak = in_peak = writer_peak = 0
    work_peak: dict[str, int] = {}
    largest: dict[str, Any] | None = None
    for path, header in plan.shards.items():
        order = sorted(header.tensors.values(), key=lambda info: (info.begin, info.end))
        headers += len(_shard_header(order, plan))
        for info in order:
            out_code = plan.out_dtype(info)
            if largest is None or info.numel > largest["numel"]:
                largest = {"name": info.name, "shape": list(info.shape), "numel": info.numel, "bytes": info.nbytes}
            contributions = plan.targets.get(info.name)
            if not contributions and out_code == info.dtype:
                copied += 1
                continue
            compute = "F64" if "F64" in (info.dtype, out_code) else "F32"
            if contributions:
                rows = info.shape[0]
                cols = info.numel // max(rows, 1)
            else:
                converted += 1
                rows, cols = info.numel, 1
            block = min(rows, max(1, _BLOCK_ELEMENTS // max(cols, 1))) * cols
            # buffers are allocated at a minimum size, but only the bytes a block fills are ever touched
            in_peak = max(in_peak, block * DTYPE_SIZES[info.dtype])
            writer_peak = max(writer_peak, block * DTYPE_SIZES[out_code])
            if contributions:
                work_peak[compute] = max(work_peak.get(compute, 0), block * DTYPE_SIZES[compute])
                tensor_flops = sum(2 * rows * cols * c.module.spec.r for c in contributions)
                update_peak = max(
                    update_peak, sum((rows + cols) * c.module.spec.r * DTYPE_SIZES[compute] for c in contributions)
                )
                flops += tensor_flops
                touched[info.name] = {
                    "shard": path.name,
                    "shape": list(info.shape),
                    "dtype": info.dtype,
                    "out_dtype": out_code,
                    "flops": tensor_flops,
                    "contributions": [
                        {"adapter": c.adapter, "module": c.module.name, "r": c.module.spec.r, "factor": c.factor}
                        for c in contributions
                    ],
                }
    adapter_bytes = sum(_factor_bytes(a) for a in adapters)
    workers = _MAX_WORKERS if _device(device).type == "cpu" else 1
    buffers = workers * (in_peak + sum(work_peak.values())) + (_WRITE_DEPTH + workers) * writer_peak
    if largest is not None:
        largest["float32_bytes"] = largest.pop("numel") * 4
    return {
        "base_dir": str(plan.base_dir),
        "base_structure_digest": plan.base_structure_digest,
        "adapters": [{"digest": a.digest, "weight": w} for a, w in zip(adapters, plan.weights, strict=True)],
        "dtype": plan.dtype,
        "shards": len(plan.shards),
        "tensors": sum(len(header.tensors) for header in plan.shards.values()),
        "merged_tensors": sorted(plan.targets),
        "converted_tensors": converted,
        "copied_tensors": copied,
        "output_bytes": plan.total_bytes,
        "bytes_written": plan.total_bytes + headers,
        "copied_files": [path.name for path in plan.copy_files],
        "skipped_files": plan.skipped_files,
        "warnings": plan.warnings,
        "flops": flops,
        "adapter_bytes": adapter_bytes,
        "peak_bytes": adapter_bytes + update_peak + buffers,
        "largest_tensor": largest,
        "touched": touched,
    }
