"""The dense strategies at sizes where they work block by block, against whole-matrix references.

The tiny adapters of test_composition take the direct paths (one block, exact selection, exact
SVD); these modules are large enough for several row blocks, a bracketed threshold selection and
the sketched truncation.
"""

from __future__ import annotations

import pytest
import torch

from adapterkit.strategies import _dense
from adapterkit.strategies._dense import DareMask, magnitude_thresholds
from adapterkit.strategies.base import ModuleInput
from adapterkit.strategies.dare import dare_linear, dare_ties
from adapterkit.strategies.lowrank import ELECT_ON, derive_seed
from adapterkit.strategies.prune import magnitude_prune
from adapterkit.strategies.ties import ties

OUT, IN, R = 600, 700, 8  # 420,000 entries: 7 row blocks, above the direct-selection size
WEIGHTS = [0.7, -0.3, 0.45]


def module(dtype: torch.dtype = torch.float64, seed: int = 0) -> ModuleInput:
    generator = torch.Generator().manual_seed(seed)
    factors = [
        (torch.randn(R, IN, generator=generator, dtype=dtype), torch.randn(OUT, R, generator=generator, dtype=dtype))
        for _ in WEIGHTS
    ]
    return ModuleInput(name="layers.0.q_proj", factors=factors, weights=WEIGHTS, ranks=[R] * len(WEIGHTS))


def deltas(m: ModuleInput) -> list[torch.Tensor]:
    return [B @ A for A, B in m.factors]


def trimmed(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep = round(density * delta.numel())
    threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return delta * (delta.abs() >= threshold)


def ties_reference(
    parts: list[torch.Tensor], weights: list[float], method: str, elect_on: str = "weighted"
) -> torch.Tensor:
    """TIES' election and disjoint mean: on ``w_i D_i'`` (the paper, mergekit), or on ``D_i'`` (PEFT)."""
    voters = [w * p for w, p in zip(weights, parts, strict=True)] if elect_on == "weighted" else parts
    votes = torch.stack(voters).sum(0) if method == "total" else torch.stack([v.sign() for v in voters]).sum(0)
    sign = votes.sign()
    if method == "frequency":
        sign[sign == 0] = 1  # a tied count goes to +1; a zero total elects nothing
    agree = [(v.sign() == sign) & (v != 0) for v in voters]
    total = sum(torch.where(a, w * p, 0.0) for a, w, p in zip(agree, weights, parts, strict=True))
    return total / torch.stack(agree).sum(0).clamp(min=1)


def dense(result: object) -> torch.Tensor:
    return result.B @ result.A  # type: ignore[attr-defined]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("shape", [(40, 50), (600, 700)])
def test_threshold_is_exactly_the_kth_magnitude(shape: tuple[int, int]) -> None:
    """Integer factors make B @ A exact however it is blocked, and full of ties at every magnitude."""
    generator = torch.Generator().manual_seed(1)
    A = torch.randint(-3, 4, (4, shape[1]), generator=generator).float()
    B = torch.randint(-3, 4, (shape[0], 4), generator=generator).float()
    magnitudes = (B @ A).abs().flatten()
    n = magnitudes.numel()
    for density in (0.01, 0.3, 0.5, 0.97):
        expected = magnitudes.kthvalue(n - round(density * n) + 1).values
        assert magnitude_thresholds([(A, B)], density) == [float(expected)], density


def test_threshold_falls_back_when_the_sample_brackets_wrongly(monkeypatch: pytest.MonkeyPatch) -> None:
    A, B = module(torch.float32).factors[0]
    expected = float((B @ A).abs().flatten().kthvalue(OUT * IN // 2 + 1).values)
    monkeypatch.setattr(_dense, "_bracket", lambda *args: (10.0, 11.0))  # far above the median
    assert magnitude_thresholds([(A, B)], 0.5) == [expected]


@pytest.mark.parametrize("elect_on", ["weighted", "unweighted"])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_equals_the_whole_matrix_reference(method: str, elect_on: str) -> None:
    m = module()
    expected = ties_reference([trimmed(d, 0.4) for d in deltas(m)], WEIGHTS, method, elect_on)
    # a full-rank "truncation" keeps everything
    full = ties(m, density=0.4, majority_sign_method=method, elect_on=elect_on, rank=OUT)
    assert rel(dense(full), expected) <= 1e-10
    flipped = ELECT_ON[1 - ELECT_ON.index(elect_on)]
    other = ties_reference([trimmed(d, 0.4) for d in deltas(m)], WEIGHTS, method, flipped)
    assert rel(other, expected) > 0.1  # the two elections differ here (WEIGHTS has a negative weight)


@pytest.mark.parametrize("strategy", [ties, dare_ties])
def test_a_negatively_weighted_parent_votes_with_its_weighted_sign(strategy: object) -> None:
    """Issue 13's example: D_A = +1 at w = +1 and D_B = +0.2 at w = -1 give 1.0 (the TIES paper, mergekit).

    PEFT's election on the unweighted deltas elects + and then adds B against it: (1 - 0.2) / 2 = 0.4.
    """
    ones_a, ones_b = torch.ones(1, 6, dtype=torch.float64), torch.ones(5, 1, dtype=torch.float64)
    m = ModuleInput(name="m", factors=[(ones_a, ones_b), (0.2 * ones_a, ones_b)], weights=[1.0, -1.0], ranks=[1, 1])
    params = {"density": 1.0, "rank": 5} | ({"seed": 0} if strategy is dare_ties else {})
    weighted = dense(strategy(m, **params))  # type: ignore[operator]
    assert torch.allclose(weighted, torch.full((5, 6), 1.0, dtype=torch.float64), rtol=0, atol=1e-12)
    peft = dense(strategy(m, elect_on="unweighted", **params))  # type: ignore[operator]
    assert torch.allclose(peft, torch.full((5, 6), 0.4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_magnitude_prune_equals_the_whole_matrix_reference() -> None:
    m = module()
    expected = sum(w * trimmed(d, 0.3) for w, d in zip(WEIGHTS, deltas(m), strict=True))
    assert rel(dense(magnitude_prune(m, density=0.3, rank=OUT)), expected) <= 1e-10


@pytest.mark.parametrize("strategy", [dare_linear, dare_ties])
def test_dare_equals_the_whole_matrix_reference(strategy: object) -> None:
    m = module()
    density, seed = 0.35, 5
    dropped = [
        d * DareMask(derive_seed(seed, m.name, i), d.shape, density, d.device)(slice(0, OUT), d.dtype) / density
        for i, d in enumerate(deltas(m))
    ]
    if strategy is dare_linear:
        expected = sum(w * d for w, d in zip(WEIGHTS, dropped, strict=True))
    else:
        expected = ties_reference(dropped, WEIGHTS, "total", "weighted")
    result = strategy(m, density=density, seed=seed, rank=OUT)  # type: ignore[operator]
    assert rel(dense(result), expected) <= 1e-10


@pytest.mark.parametrize("rank", [12, 40])  # below and above the parents' total rank (24)
@pytest.mark.parametrize("strategy", [ties, dare_ties, magnitude_prune])
def test_sketched_truncation_is_near_optimal_and_reports_its_error(strategy: object, rank: int) -> None:
    m = module(torch.float32)
    check_near_optimal(m, strategy, rank)


def test_a_blend_whose_exact_sum_cancels_is_still_truncated_near_optimally() -> None:
    """Two parents with opposite changes: the start (their exact sum's directions) carries nothing.

    A ``frequency`` election, whose tied counts go to +1, keeps ``|D|`` where ``total`` keeps nothing.
    """
    A, B = module(torch.float32).factors[0]
    m = ModuleInput(name="m", factors=[(A, B), (A, -B)], weights=[1.0, 1.0], ranks=[R, R])
    check_near_optimal(m, ties, 32, majority_sign_method="frequency")
    assert not dense(ties(m, density=0.5, rank=32)).any()  # the total cancels: nothing is elected


def check_near_optimal(m: ModuleInput, strategy: object, rank: int, **params: object) -> None:
    merged = dense(strategy(m, density=0.5, rank=OUT, **params)).double()  # type: ignore[operator]
    spectrum = torch.linalg.svdvals(merged)
    optimal = float(spectrum[rank:].square().sum().sqrt() / spectrum.square().sum().sqrt())
    result = strategy(m, density=0.5, rank=rank, **params)  # type: ignore[operator]
    measured = rel(dense(result), merged)
    assert result.A.shape == (rank, IN)
    assert measured <= 1.01 * optimal
    assert result.truncation_error == pytest.approx(measured, rel=1e-4)


def test_dare_masks_are_fair_and_independent_of_how_the_matrix_is_cut() -> None:
    shape = (500, 800)
    for density in (0.1, 0.5, 0.9):
        mask = DareMask(derive_seed(3, "m", 0), shape, density, torch.device("cpu"))
        whole = mask(slice(0, shape[0]), torch.float32)
        assert set(whole.unique().tolist()) <= {0.0, 1.0}
        n = whole.numel()
        assert abs(float(whole.mean()) - density) <= 5 * (density * (1 - density) / n) ** 0.5, density
        pieces = torch.cat([mask(slice(start, start + 37), torch.float32) for start in range(0, shape[0], 37)])
        assert torch.equal(whole, pieces)
    first = DareMask(1, shape, 0.5, torch.device("cpu"))(slice(0, 500), torch.float32)
    second = DareMask(2, shape, 0.5, torch.device("cpu"))(slice(0, 500), torch.float32)
    agreement = float((first == second).float().mean())
    assert abs(agreement - 0.5) <= 5 * (0.25 / first.numel()) ** 0.5  # independent keys, independent masks
    neighbours = float((first[:, 1:] == first[:, :-1]).float().mean())
    assert abs(neighbours - 0.5) <= 5 * (0.25 / first.numel()) ** 0.5


def test_called_directly_a_strategy_still_refuses_an_unknown_sign_method() -> None:
    """compose checks parameters first; a caller of the pure function gets the same refusal."""
    with pytest.raises(ValueError, match="'majority_sign_method' must be one of 'total', 'frequency', got 'mean'"):
        ties(module(), majority_sign_method="mean")
    with pytest.raises(ValueError, match="'elect_on' must be one of 'weighted', 'unweighted', got 'peft'"):
        dare_ties(module(), elect_on="peft")
