"""``inspect``: what adapters hold, how they interfere, and how much of a blend each rank keeps.

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

A DoRA adapter (``use_dora``) is described too, but its ``s * B @ A`` is only the *directional
update*: each output feature of ``W + s * B @ A`` is rescaled to the norm its magnitude vector
gives, so the weight change is ``m * (W + sBA) / ||W + sBA|| - W``, which depends on the base.
Its modules' spectra are those of the directional update, beside each magnitude vector's
length, range, mean and L2 norm. Interference and energy are left out whenever a DoRA adapter is
among those inspected, with the reason in ``not_computed``: both describe a weighted *sum of
deltas* (what ``compose`` would blend), which a DoRA adapter does not have, and figures computed
on the directional parts alone would read as that answer while missing the rescaling of ``W``,
often the larger part of the change (``compose`` refuses DoRA for the same reason).

Every function returns plain dicts of numbers, strings and lists (JSON-able as they are), so the
CLI only prints them. Pure tensor maths.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from adapterkit.adapter.config import delta_blockers
from adapterkit.adapter.extras import classify_extras
from adapterkit.adapter.model import check_weights
from adapterkit.base_identity import BaseIdentity, reconcile
from adapterkit.composition.engine import adapter_digest, adapter_label, check_compatible, common_shape
from adapterkit.errors import CompositionError, UnsupportedAdapterError
from adapterkit.strategies.lowrank import choose_rank, derive_seed, stacked_svd

if TYPE_CHECKING:
    from adapterkit.adapter.model import Adapter, LoraModule

__all__ = [
    "DEFAULT_SIGN_SAMPLES",
    "ENERGY_THRESHOLDS",
    "NUMERICAL_RANK_TOLERANCE",
    "effective_rank",
    "factor_inner",
    "factor_spectrum",
    "inspect",
    "sample_entries",
]

#: Energy fractions whose ranks the summary reports (keys of ``ranks_for_energy``).
ENERGY_THRESHOLDS: tuple[float, ...] = (0.9, 0.95, 0.99)
#: Singular values above this fraction of the largest count towards ``numerical_rank``.
NUMERICAL_RANK_TOLERANCE = 1e-6
#: Entries sampled per module for the sign-conflict estimate (standard error at most 0.5 / sqrt(n) ~ 0.008).
DEFAULT_SIGN_SAMPLES = 4096


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
    """Refuse adapters whose weight change is not ``scaling * B @ A`` (DoRA excepted): every number would be wrong."""
    for adapter in adapters:
        blocking = [field for field in delta_blockers(adapter.config) if field != "use_dora"]
        if blocking:
            raise UnsupportedAdapterError(
                f"adapter {adapter_digest(adapter)[:19]} sets {blocking[0]!r}: its weight change is not "
                "scaling * B @ A, so it cannot be inspected"
            )


def _is_dora(adapter: Adapter) -> bool:
    return bool(adapter.config.get("use_dora"))


#: Why interference and energy are left out when a DoRA adapter is inspected (see the module docstring).
_NOT_A_DELTA = (
    "{label} is DoRA (field 'use_dora'): its change rescales W + s*B@A to learnt norms, so it is not a "
    "delta that sums with others or that svd compresses"
)


def _magnitudes(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Module name -> its DoRA magnitude vector (``lora_magnitude_vector``)."""
    found = classify_extras(adapter.extra_tensors, adapter.config, adapter.key_prefix)
    return {e.module: adapter.extra_tensors[e.key] for e in found if e.kind == "dora_magnitude"}


def _magnitude_stats(vector: torch.Tensor) -> dict[str, Any]:
    """Length, range, mean and L2 norm of a magnitude vector: the norms DoRA gives each output feature."""
    values = vector.double().flatten()
    return {
        "length": values.numel(),
        "min": float(values.min()) if values.numel() else None,
        "mean": float(values.mean()) if values.numel() else None,
        "max": float(values.max()) if values.numel() else None,
        "norm": float(values.norm()),
    }


def _present(adapters: Sequence[Adapter], weights: Sequence[float], name: str) -> list[tuple[int, LoraModule, float]]:
    return [
        (i, a.modules[name], w) for i, (a, w) in enumerate(zip(adapters, weights, strict=True)) if name in a.modules
    ]


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
    same shape for a module they share), since the interference numbers predict a blend. With a
    DoRA adapter among them, only the base and shapes are checked, and ``interference`` and
    ``energy`` are None, with ``not_computed`` saying why (see the module docstring).

    Definitions (``D`` is a module's ``scaling * B @ A``, the *directional update* of a DoRA
    module; per-adapter numbers ignore the weight, interference and energy use the weighted ``w * D``):

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
    * ``update``: ``"delta"`` when ``D`` is the module's weight change, ``"directional"`` for DoRA,
      whose modules also have ``magnitude``: the magnitude vector's ``length``, ``min``, ``mean``,
      ``max`` and L2 ``norm``.

    Shape: ``{"weights", "adapters": [{"index", "digest", "weight", "update", "num_modules",
    "num_parameters", "size_bytes", "ranks": {"min", "max"}, "mean_effective_rank",
    "frobenius_norm", "modules": {name: {"kind", "shape", "r", "scaling", "frobenius_norm",
    "effective_rank", "numerical_rank", "spectrum", ["magnitude"]}}}], "not_computed": None |
    str, "interference": None | {"sign_samples",
    "seed", "pairs": [{"adapters": [i, j], "shared_modules", "cosine", "mean_cosine",
    "sign_conflict", "sign_conflict_stderr", "modules": {name: {"cosine", "sign_conflict",
    "sign_conflict_stderr", "exact", "entries"}}}]}, "energy": {"thresholds", "modules": {name:
    {"adapters", "input_rank", "numerical_rank", "frobenius_norm", "ranks_for_energy": {"0.9",
    "0.95", "0.99"}, ["curve"]}}, "overall": {"max_rank", "frobenius_norm", "ranks_for_energy",
    ["curve"]}} | None}``, curves only with ``rank_curve``.
    """
    values = check_weights(adapters, weights, "inspect")
    if sign_samples < 1:
        raise CompositionError(f"sign_samples must be at least 1, got {sign_samples}")
    _check_deltas(adapters)
    labels = [adapter_label(adapter, i) for i, adapter in enumerate(adapters)]
    dora = next((label for adapter, label in zip(adapters, labels, strict=True) if _is_dora(adapter)), None)
    if len(adapters) > 1 and dora is None:
        check_compatible(adapters, force=force)
    elif len(adapters) > 1:  # no blend is described: the adapters need only be for one base
        sides = [BaseIdentity.of_adapter(adapter, label) for adapter, label in zip(adapters, labels, strict=True)]
        for doubt in reconcile(sides, force=force, verb="inspect")[1]:
            warnings.warn(f"adapterkit: {doubt}", stacklevel=2)
    from adapterkit.weighting import check_finite_factors, check_weight_range

    check_finite_factors(adapters, labels)
    # The report squares singular values in float64; weights compose could use in float32 keep them finite.
    check_weight_range(adapters, values, labels, torch.float32)
    names = sorted({name for adapter in adapters for name in adapter.modules})
    for name in names:
        common_shape(name, [m.spec for _, m, _ in _present(adapters, values, name)])

    report: dict[str, Any] = {
        "weights": values,
        "adapters": [_describe_adapter(i, a, w) for i, (a, w) in enumerate(zip(adapters, values, strict=True))],
        "not_computed": None if dora is None else _NOT_A_DELTA.format(label=dora),
        "interference": None,
        "energy": None if dora is not None else _energy_report(adapters, values, names, rank_curve),
    }
    if len(adapters) > 1 and dora is None:
        report["interference"] = _interference(adapters, values, names, sign_samples, seed)
    return report


def _describe_adapter(index: int, adapter: Adapter, weight: float) -> dict[str, Any]:
    magnitudes = _magnitudes(adapter) if _is_dora(adapter) else {}
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
        if name in magnitudes:
            modules[name]["magnitude"] = _magnitude_stats(magnitudes[name])
    ranks = [m.spec.r for m in adapter.modules.values()]
    effective = [m["effective_rank"] for m in modules.values()]
    return {
        "index": index,
        "digest": adapter.digest,
        "weight": weight,
        "update": "directional" if _is_dora(adapter) else "delta",
        "num_modules": len(modules),
        "num_parameters": adapter.num_parameters,
        "size_bytes": adapter.factor_bytes,
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
