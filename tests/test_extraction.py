"""``extract``: a LoRA adapter from a (base, fine-tuned) pair of tiny real models.

The fine-tuned models are made here: a base from a ``transformers`` config, and a copy whose
weights get known changes (low-rank products, noise, a changed norm). Dense ``torch.linalg.svd``
of each change gives the optimal error any rank-k factorization can reach; PEFT loading the result
gives the logits; ``mergekit-extract-lora`` on the same pair is the peer.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from helpers import load_peft, logits, max_abs_diff, save_base, tiny_gpt2, tiny_llama

import adapterkit
from adapterkit import Store
from adapterkit.cli import cli
from adapterkit.errors import ExtractionError, InvalidInputError
from adapterkit.extraction import extract, plan_extraction
from adapterkit.extraction.lowrank import Spectrum, allocate_budget, energy_rank, top_singular, uses_exact_svd
from adapterkit.formats.peft import read_adapter, write_adapter

Changes = dict[str, torch.Tensor]


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def perturb(model: Any, change: Callable[[str, torch.Tensor], torch.Tensor | None]) -> tuple[Any, Changes]:
    """A copy of ``model`` with ``change(name, weight)`` added to each weight it returns a tensor for."""
    tuned = copy.deepcopy(model)
    changes: Changes = {}
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            delta = change(name, param)
            if delta is not None:
                param.add_(delta)
                changes[name] = delta
    return tuned, changes


def low_rank(shape: tuple[int, ...], rank: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    out_dim, in_dim = shape
    return torch.randn(out_dim, rank, generator=generator) @ torch.randn(rank, in_dim, generator=generator) * scale


def is_projection(name: str, param: torch.Tensor) -> bool:
    return param.ndim == 2 and ".layers." in name


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    """The error of the best rank-``rank`` approximation of ``delta``, relative to it (dense SVD, float64)."""
    S = torch.linalg.svdvals(delta.double())
    return math.sqrt(float(S[rank:].square().sum() / S.square().sum()))


def achieved_error(adapter: Any, module: str, delta: torch.Tensor) -> float:
    """``||delta - adapter's change|| / ||delta||``, computed from the factors (not trusting the lineage)."""
    return float((delta.double() - adapter.delta(module).double()).norm() / delta.double().norm())


def module_of(tensor: str) -> str:
    return tensor.removesuffix(".weight")


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path, Path, Changes]:
    """A tiny Llama and a fine-tune of it: every projection + a rank-4 change + small noise, the final norm changed.

    The tuned model is sharded differently from the base (four shards against one).
    """
    root = tmp_path_factory.mktemp("extract-llama")
    base = tiny_llama(0, hidden_size=64, intermediate_size=128)
    generator = torch.Generator().manual_seed(1)

    def change(name: str, param: torch.Tensor) -> torch.Tensor | None:
        if is_projection(name, param):
            return low_rank(param.shape, 4, 0.02, generator) + 1e-4 * torch.randn(param.shape, generator=generator)
        if name == "model.norm.weight":
            return 0.05 * torch.randn(param.shape, generator=generator)
        return None

    tuned, changes = perturb(base, change)
    save_base(base, root / "base")
    save_base(tuned, root / "tuned", max_shard_size="100KB")
    return base, tuned, root / "base", root / "tuned", changes


#: The wide pair's changed 2-D tensors that are not projections: the input embedding (a transposed LoRA) and the head.
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
EVERYTHING = ["all-linear", "embed_tokens", "lm_head"]


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Changes]:
    """Wider projections (64 to 256 features) and embeddings whose changes have a decaying spectrum.

    Rank 4 truncates them for real; the changed embeddings are left out unless targeted.
    """
    root = tmp_path_factory.mktemp("extract-wide")
    base = tiny_llama(0, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(2)

    def change(name: str, param: torch.Tensor) -> torch.Tensor | None:
        if not is_projection(name, param) and name not in EMBEDDINGS:
            return None
        out_dim, in_dim = param.shape
        rank = min(out_dim, in_dim)
        U = torch.linalg.qr(torch.randn(out_dim, rank, generator=generator)).Q
        V = torch.linalg.qr(torch.randn(in_dim, rank, generator=generator)).Q
        spectrum = 0.05 * torch.exp(-torch.arange(rank, dtype=torch.float32) / 3.0) + 1e-3
        return (U * spectrum) @ V.T

    tuned, changes = perturb(base, change)
    save_base(base, root / "base")
    save_base(tuned, root / "tuned")
    return root / "base", root / "tuned", changes


# --- the maths ----------------------------------------------------------------------------------------------


def test_recovers_a_known_low_rank_change(llama_pair: tuple[Any, Any, Path, Path, Changes]) -> None:
    _, _, base_dir, tuned_dir, changes = llama_pair
    adapter = extract(base_dir, tuned_dir, rank=4)
    projections = {module_of(n): d for n, d in changes.items() if n != "model.norm.weight"}
    assert set(adapter.modules) == set(projections)
    for module, delta in projections.items():
        assert adapter.modules[module].spec.r == 4
        # the noise is 1e-4 per entry against a change of ~0.02 * 2 per entry: the rank-4 part is recovered to ~1%
        assert achieved_error(adapter, module, delta) < 2e-2, module
        assert achieved_error(adapter, module, delta) == pytest.approx(optimal_error(delta, 4), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("rank", [4, 12])
def test_randomized_path_reaches_the_optimal_error(wide_pair: tuple[Path, Path, Changes], rank: int) -> None:
    base_dir, tuned_dir, changes = wide_pair
    adapter = extract(base_dir, tuned_dir, rank=rank, targets=EVERYTHING)
    assert adapter.modules["model.embed_tokens"].spec.kind == "embedding"  # factored transposed
    recorded = adapter.metadata["lineage"]["truncation_error"]
    for name, delta in changes.items():
        module = module_of(name)
        assert not uses_exact_svd(tuple(delta.shape), rank), "this test is about the randomized path"
        best = optimal_error(delta, rank)
        assert best > 1e-3  # a real truncation, not a rounding-level one
        assert achieved_error(adapter, module, delta) == pytest.approx(best, rel=1e-3)
        assert recorded[module] == pytest.approx(best, rel=1e-3)
        assert adapter.metadata["lineage"]["kept_energy"][module] == pytest.approx(1 - best**2, rel=1e-3)


def test_exact_path_reaches_the_optimal_error(wide_pair: tuple[Path, Path, Changes]) -> None:
    base_dir, tuned_dir, changes = wide_pair
    rank = 40
    adapter = extract(base_dir, tuned_dir, rank=rank, targets=["k_proj", "v_proj"])  # 128 -> 64: exact for rank 40
    assert set(adapter.modules) == {module_of(n) for n in changes if "k_proj" in n or "v_proj" in n}
    for module in adapter.modules:
        delta = changes[module + ".weight"]
        assert uses_exact_svd(tuple(delta.shape), rank)
        best = optimal_error(delta, rank)
        assert achieved_error(adapter, module, delta) == pytest.approx(best, rel=1e-5)
        assert adapter.metadata["lineage"]["truncation_error"][module] == pytest.approx(best, rel=1e-5)


def test_top_singular_grows_from_a_start_and_matches_dense_svd() -> None:
    generator = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(300, 200, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(200, 200, generator=generator)).Q
    S = 1 / (1 + torch.arange(200, dtype=torch.float32)) ** 0.7
    D = (U * S) @ V.T
    first = top_singular(D, 8)
    grown = top_singular(D, 24, start=first.Vh.T)
    assert not first.complete and not grown.complete
    dense = torch.linalg.svdvals(D)
    assert torch.allclose(grown.S, dense[:24], rtol=1e-3)
    assert torch.allclose(first.S, dense[:8], rtol=1e-3)


def test_energy_picks_the_smallest_rank_keeping_the_fraction(wide_pair: tuple[Path, Path, Changes]) -> None:
    base_dir, tuned_dir, changes = wide_pair
    fraction = 0.95
    adapter = extract(base_dir, tuned_dir, energy=fraction, targets=EVERYTHING)
    kept = adapter.metadata["lineage"]["kept_energy"]
    for name, delta in changes.items():
        module = module_of(name)
        power = torch.linalg.svdvals(delta.double()).square()
        share = torch.cumsum(power, 0) / power.sum()
        expected = int(torch.searchsorted(share, torch.tensor(fraction, dtype=torch.float64))) + 1
        assert adapter.modules[module].spec.r == expected, module
        assert kept[module] >= fraction * (1 - 1e-6)
    ranks = {adapter.modules[m].spec.r for m in adapter.modules}
    assert len(ranks) > 1 or adapter.config["rank_pattern"] == {}  # per-module ranks reach PEFT via rank_pattern


def _best_allocation(gains: dict[str, list[float]], costs: dict[str, int], budget: int) -> float:
    """The most energy any ranks within ``budget`` keep, by trying every combination (tiny cases only)."""
    names = list(gains)
    best = 0.0
    for ranks in itertools.product(*(range(len(gains[n]) + 1) for n in names)):
        if sum(r * costs[n] for n, r in zip(names, ranks, strict=True)) <= budget:
            best = max(best, sum(sum(gains[n][:r]) for n, r in zip(names, ranks, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_budget_allocation_is_optimal_when_costs_are_equal(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    gains = {f"m{i}": sorted(torch.rand(5, generator=generator).square().tolist(), reverse=True) for i in range(3)}
    costs = dict.fromkeys(gains, 10)
    budget = int(torch.randint(10, 160, (1,), generator=generator))
    ranks, left = allocate_budget(gains, costs, budget)
    spent = sum(ranks[n] * costs[n] for n in gains)
    assert spent + left == budget and left >= 0
    assert sum(sum(gains[n][: ranks[n]]) for n in gains) == pytest.approx(_best_allocation(gains, costs, budget))


def test_budget_allocation_is_near_optimal_with_mixed_costs() -> None:
    """With different costs, greedy by energy per parameter is optimal up to the last item that no longer fits."""
    generator = torch.Generator().manual_seed(7)
    for _ in range(30):
        gains = {f"m{i}": sorted(torch.rand(4, generator=generator).square().tolist(), reverse=True) for i in range(3)}
        costs = {name: int(c) for name, c in zip(gains, torch.randint(5, 20, (3,), generator=generator), strict=True)}
        budget = int(torch.randint(5, 120, (1,), generator=generator))
        ranks, _ = allocate_budget(gains, costs, budget)
        got = sum(sum(gains[n][: ranks[n]]) for n in gains)
        largest_item = max(v for values in gains.values() for v in values)
        assert got <= _best_allocation(gains, costs, budget) + 1e-12
        assert got >= _best_allocation(gains, costs, budget) - largest_item


@pytest.fixture(scope="module")
def uneven_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Changes]:
    """Modules whose changes differ in spectrum: q_proj has a large rank-12 change, the rest small rank-2 ones."""
    root = tmp_path_factory.mktemp("extract-uneven")
    base = tiny_llama(0, hidden_size=128, intermediate_size=256)
    generator = torch.Generator().manual_seed(5)

    def change(name: str, param: torch.Tensor) -> torch.Tensor | None:
        if not is_projection(name, param):
            return None
        if "q_proj" in name:
            return low_rank(param.shape, 12, 0.05, generator)
        return low_rank(param.shape, 2, 0.002, generator) + 1e-5 * torch.randn(param.shape, generator=generator)

    tuned, changes = perturb(base, change)
    save_base(base, root / "base")
    save_base(tuned, root / "tuned")
    return root / "base", root / "tuned", changes


def test_budget_keeps_more_energy_than_a_uniform_rank_of_the_same_size(
    uneven_pair: tuple[Path, Path, Changes],
) -> None:
    base_dir, tuned_dir, changes = uneven_pair
    uniform = extract(base_dir, tuned_dir, rank=4)
    budgeted = extract(base_dir, tuned_dir, budget=uniform.num_parameters)
    assert budgeted.num_parameters <= uniform.num_parameters

    def kept(adapter: Any) -> float:
        energies = {module_of(n): float(d.double().square().sum()) for n, d in changes.items()}
        shares = adapter.metadata["lineage"]["kept_energy"]
        return sum(energies[m] * shares.get(m, 0.0) for m in energies)

    total = sum(float(d.double().square().sum()) for d in changes.values())
    assert kept(budgeted) > kept(uniform) + 0.01 * total  # q_proj's large change is worth the ranks
    ranks = {m: module.spec.r for m, module in budgeted.modules.items()}
    assert all(ranks[m] >= 12 for m in ranks if "q_proj" in m)
    # the lineage's kept energy is the factors' own: check it on each module from the factors
    for name, delta in changes.items():
        module = module_of(name)
        if module in budgeted.modules:
            error = achieved_error(budgeted, module, delta)
            assert budgeted.metadata["lineage"]["truncation_error"][module] == pytest.approx(error, rel=1e-3, abs=1e-6)


def test_budget_grows_modules_beyond_the_first_pass(uneven_pair: tuple[Path, Path, Changes]) -> None:
    """A budget worth rank 1 each: the first pass keeps 8 triplets per module, q_proj needs 12 and gets them."""
    base_dir, tuned_dir, changes = uneven_pair
    plan = plan_extraction(base_dir, tuned_dir, rank=1)
    cost_q = next(m.cost for m in plan.modules if "q_proj" in m.name)
    budget = 2 * 12 * cost_q  # both q_proj at rank 12, nothing left for the others
    adapter = extract(base_dir, tuned_dir, budget=budget)
    assert {m: module.spec.r for m, module in adapter.modules.items()} == {
        m: 12 for m in (module_of(n) for n in changes) if "q_proj" in m
    }
    assert adapter.num_parameters <= budget


# --- PEFT loads the result ----------------------------------------------------------------------------------


def test_peft_logits_at_full_rank_equal_the_tuned_model(
    llama_pair: tuple[Any, Any, Path, Path, Changes], tmp_path: Path
) -> None:
    base, tuned, base_dir, tuned_dir, _ = llama_pair
    adapter = extract(base_dir, tuned_dir, rank=128, keep_changed=True)
    assert adapter.config["modules_to_save"] == ["model.norm"]
    assert set(adapter.metadata["lineage"]["left_out"]) == set()
    write_adapter(adapter, tmp_path / "full")
    loaded = load_peft(base, tmp_path / "full")
    expected, before = logits(tuned), logits(base)
    assert max_abs_diff(logits(loaded), expected) < 1e-5 * before.abs().max().item()
    assert max_abs_diff(before, expected) > 0.1  # the fine-tune moved the logits


def test_merging_a_full_rank_extraction_with_its_carried_tensors_gives_the_tuned_weights(
    llama_pair: tuple[Any, Any, Path, Path, Changes], tmp_path: Path
) -> None:
    """extract then merge closes the loop: the modules_to_save copy (the final norm) is merged back too."""
    from safetensors.torch import load_file

    _, tuned, base_dir, tuned_dir, changes = llama_pair
    adapter = extract(base_dir, tuned_dir, rank=128, keep_changed=True)
    adapterkit.merge([adapter], None, base_dir, tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    expected = weights(tuned)
    assert torch.equal(merged["model.norm.weight"], expected["model.norm.weight"])  # carried in full: exact
    for name in changes:
        scale = expected[name].abs().max().item()
        assert max_abs_diff(merged[name], expected[name]) < 1e-5 * scale, name


def test_peft_logits_at_low_rank_within_what_the_rank_allows(
    llama_pair: tuple[Any, Any, Path, Path, Changes], tmp_path: Path
) -> None:
    base, tuned, base_dir, tuned_dir, changes = llama_pair
    adapter = extract(base_dir, tuned_dir, rank=4, targets=["all-linear"])
    left_out = adapter.metadata["lineage"]["left_out"]
    norm_change = changes["model.norm.weight"]
    expected_change = float(norm_change.norm() / weights(base)["model.norm.weight"].norm())
    assert left_out == {"model.norm.weight": pytest.approx(expected_change, rel=1e-5)}
    write_adapter(adapter, tmp_path / "r4")
    loaded = load_peft(base, tmp_path / "r4")
    # the norm's change is left out: compare with the tuned model without it
    reference, _ = perturb(base, lambda n, p: changes.get(n) if n != "model.norm.weight" else None)
    gap = max_abs_diff(logits(base), logits(reference))
    assert max_abs_diff(logits(loaded), logits(reference)) < 0.05 * gap  # rank 4 leaves only the noise out
    assert max_abs_diff(logits(loaded), logits(tuned)) > max_abs_diff(logits(loaded), logits(reference))


def test_tied_embeddings_are_extracted_once_for_both_sides(tmp_path: Path) -> None:
    base = tiny_llama(0, tie_word_embeddings=True)
    generator = torch.Generator().manual_seed(4)
    tuned, _ = perturb(
        base, lambda n, p: low_rank(p.shape, 3, 0.05, generator) if "embed_tokens" in n or "q_proj" in n else None
    )
    save_base(base, tmp_path / "base")
    save_base(tuned, tmp_path / "tuned")
    plan = plan_extraction(tmp_path / "base", tmp_path / "tuned", rank=4)
    assert plan.tied == "model.embed_tokens.weight"
    default = extract(tmp_path / "base", tmp_path / "tuned", rank=4)
    assert list(default.metadata["lineage"]["left_out"]) == ["model.embed_tokens.weight"]
    adapter = extract(tmp_path / "base", tmp_path / "tuned", rank=4, targets=["q_proj", "lm_head"])
    assert "model.embed_tokens" in adapter.modules and adapter.modules["model.embed_tokens"].spec.kind == "embedding"
    assert adapter.config["ensure_weight_tying"] is True
    assert adapter.metadata["lineage"]["left_out"] == {}
    write_adapter(adapter, tmp_path / "out")
    loaded = load_peft(base, tmp_path / "out")
    assert max_abs_diff(logits(loaded), logits(tuned)) < 1e-4


def test_gpt2_conv1d_layers_round_trip_through_peft(tmp_path: Path) -> None:
    base = tiny_gpt2(0)
    generator = torch.Generator().manual_seed(6)
    tuned, _ = perturb(base, lambda n, p: low_rank(p.shape, 3, 0.05, generator) if ".h." in n and p.ndim == 2 else None)
    save_base(base, tmp_path / "base")
    save_base(tuned, tmp_path / "tuned")
    adapter = extract(tmp_path / "base", tmp_path / "tuned", rank=3)
    assert adapter.config["fan_in_fan_out"] is True
    assert all(module.spec.fan_in_fan_out for module in adapter.modules.values())
    write_adapter(adapter, tmp_path / "out")
    loaded = load_peft(base, tmp_path / "out")
    assert max_abs_diff(logits(loaded), logits(tuned)) < 1e-4
    assert max_abs_diff(logits(base), logits(tuned)) > 1e-2


# --- inputs: sharding, dtypes, structure --------------------------------------------------------------------


def test_dtypes_and_sharding_may_differ_between_the_models(tmp_path: Path) -> None:
    base = tiny_llama(0).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(8)
    tuned, _ = perturb(
        base.float(), lambda n, p: low_rank(p.shape, 2, 0.05, generator) if is_projection(n, p) else None
    )
    save_base(base, tmp_path / "base")
    save_base(tuned, tmp_path / "tuned", max_shard_size="50KB")
    assert len(list((tmp_path / "tuned").glob("*.safetensors"))) > 1
    adapter = extract(tmp_path / "base", tmp_path / "tuned", rank=32)
    base_weights, tuned_weights = weights(base), weights(tuned)
    for module in adapter.modules:
        exact = tuned_weights[module + ".weight"].float() - base_weights[module + ".weight"].float()
        assert achieved_error(adapter, module, exact) < 1e-5
    # the norms are equal in value (bf16 widened to fp32): not reported as changed
    assert adapter.metadata["lineage"]["left_out"] == {}


@pytest.mark.parametrize("budget", [False, True])
def test_factors_in_bf16_report_the_error_of_the_rounded_factors(
    llama_pair: tuple[Any, Any, Path, Path, Changes], budget: bool
) -> None:
    """Rank 4 of a rank-4 change plus small noise: bf16's rounding of the factors is most of the error."""
    _, _, base_dir, tuned_dir, changes = llama_pair
    rank = {"budget": extract(base_dir, tuned_dir, rank=4).num_parameters} if budget else {"rank": 4}
    adapter = extract(base_dir, tuned_dir, dtype="bf16", **rank)
    in_float32 = extract(base_dir, tuned_dir, **rank)
    recorded = adapter.metadata["lineage"]["truncation_error"]
    rounding_shows = 0
    for name, delta in changes.items():
        module = module_of(name)
        if module not in adapter.modules:
            continue
        assert adapter.modules[module].A.dtype == torch.bfloat16
        achieved = achieved_error(adapter, module, delta)
        assert recorded[module] == pytest.approx(achieved, rel=1e-4)
        rounding_shows += achieved > 1.05 * in_float32.metadata["lineage"]["truncation_error"][module]
    assert rounding_shows  # the test can tell the rounded factors' error from the float32 one


def test_structure_mismatch_names_the_tensor(tmp_path: Path, llama_pair: tuple[Any, Any, Path, Path, Changes]) -> None:
    _, _, base_dir, _, _ = llama_pair
    save_base(tiny_llama(0, hidden_size=64, intermediate_size=96), tmp_path / "other")
    with pytest.raises(ExtractionError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' is \[64, 128\]"):
        extract(base_dir, tmp_path / "other", rank=2)
    save_base(tiny_llama(0, hidden_size=64, intermediate_size=128, num_hidden_layers=3), tmp_path / "deeper")
    with pytest.raises(ExtractionError, match=r"tensor 'model\.layers\.2\..*' is in .*deeper but not in"):
        extract(base_dir, tmp_path / "deeper", rank=2)


def test_non_finite_values_are_refused(tmp_path: Path) -> None:
    base = tiny_llama(0)
    tuned, _ = perturb(
        base, lambda n, p: torch.full_like(p, math.nan) if n.endswith("0.self_attn.q_proj.weight") else None
    )
    save_base(base, tmp_path / "base")
    save_base(tuned, tmp_path / "tuned")
    with pytest.raises(ExtractionError, match=r"tuned.*q_proj\.weight' holds NaN"):
        extract(tmp_path / "base", tmp_path / "tuned", rank=2)
    with pytest.raises(ExtractionError, match=r"tuned.*q_proj\.weight' holds NaN"):
        extract(tmp_path / "base", tmp_path / "tuned", rank=2, targets=["v_proj"])  # compared, not factored


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of rank, energy or budget"),
        ({"rank": 2, "energy": 0.9}, "got rank, energy"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"energy": 1.5}, r"energy must be a fraction in \(0, 1\]"),
        ({"budget": 10}, "budget 10 is less than one rank of any target costs"),
        ({"rank": 2, "targets": ["nope"]}, "target 'nope' matches no weight"),
        ({"rank": 2, "targets": ["norm"]}, r"model\.norm\.weight, which is \[64\]: only 2-D weights"),
        ({"rank": 2, "targets": []}, "targets is empty"),
    ],
)
def test_bad_requests_are_refused_before_reading(
    llama_pair: tuple[Any, Any, Path, Path, Changes], kwargs: dict[str, Any], message: str
) -> None:
    _, _, base_dir, tuned_dir, _ = llama_pair
    with pytest.raises(ExtractionError, match=message):
        extract(base_dir, tuned_dir, **kwargs)


def test_bad_dtype_and_device(llama_pair: tuple[Any, Any, Path, Path, Changes]) -> None:
    _, _, base_dir, tuned_dir, _ = llama_pair
    with pytest.raises(InvalidInputError, match="dtype 'int8' cannot hold adapter factors"):
        extract(base_dir, tuned_dir, rank=2, dtype="int8")
    with pytest.raises(InvalidInputError, match="not a torch device"):
        extract(base_dir, tuned_dir, rank=2, device="nonsense")


def test_nothing_to_extract(tmp_path: Path) -> None:
    base = tiny_llama(0)
    tuned, _ = perturb(base, lambda n, p: torch.ones_like(p) if n == "model.norm.weight" else None)
    save_base(base, tmp_path / "base")
    save_base(tuned, tmp_path / "tuned")
    with pytest.raises(ExtractionError, match=r"changes none of the targeted weights .*; it changes only model\.norm"):
        extract(tmp_path / "base", tmp_path / "tuned", rank=2)


def test_the_reader_sketches_what_the_factoring_would(wide_pair: tuple[Path, Path, Changes]) -> None:
    """The first product of the randomized SVD, formed block by block while reading, is ``M @ Ω`` exactly."""
    from adapterkit.extraction.extractor import _Extraction
    from adapterkit.extraction.lowrank import gaussian_sketch, sketch_width
    from adapterkit.extraction.pair import ModelPair

    base_dir, tuned_dir, _ = wide_pair
    plan = plan_extraction(base_dir, tuned_dir, rank=4, targets=EVERYTHING)
    with ModelPair(plan.base_tensors, plan.tuned_tensors) as pair:
        run = _Extraction(plan, pair, torch.device("cpu"))
        kinds = set()
        for module in plan.modules:
            sketch, fill = run.sketcher(module, torch.float32)
            assert sketch is not None and fill is not None
            delta, _ = pair.delta(module.tensor, rows_done=fill)
            M = delta.T if module.transposed else delta
            omega = gaussian_sketch(module.in_features, sketch_width(tuple(M.shape), 4), torch.float32)
            assert torch.allclose(sketch, M @ omega, rtol=1e-4, atol=1e-6), module.name
            kinds.add(module.transposed)
    assert kinds == {False, True}


def test_dry_run_plan_reads_no_weight(llama_pair: tuple[Any, Any, Path, Path, Changes], monkeypatch: Any) -> None:
    _, _, base_dir, tuned_dir, _ = llama_pair

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a weight was read")

    monkeypatch.setattr("adapterkit.extraction.pair.ModelPair.read", refuse)
    plan = plan_extraction(base_dir, tuned_dir, rank=4)
    assert len(plan.modules) == 14 and plan.rank_range == (4, 4)
    assert plan.parameter_range == (4 * sum(m.cost for m in plan.modules),) * 2
    budget = plan_extraction(base_dir, tuned_dir, budget=10_000)
    assert budget.rank_range[0] == 0 and budget.parameter_range[1] == 10_000
    result = CliRunner().invoke(
        cli, ["extract", "--base", str(base_dir), "--tuned", str(tuned_dir), "--rank", "4", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("plan: extract 14 modules at rank 4\n")


# --- lineage, store, round trip -----------------------------------------------------------------------------


def test_lineage_and_store(llama_pair: tuple[Any, Any, Path, Path, Changes], tmp_path: Path) -> None:
    _, _, base_dir, tuned_dir, _ = llama_pair
    adapter = extract(base_dir, tuned_dir, rank=4, content_digest=True)
    lineage = adapter.metadata["lineage"]
    assert lineage["strategy"] == "extract" and lineage["parents"] == []
    assert lineage["parameters"] == {"rank": 4, "targets": None, "keep_changed": False, "dtype": "F32"}
    assert lineage["source"] == {
        "name": str(tuned_dir),
        "structure_digest": adapterkit.fingerprint(tuned_dir).structure_digest,
        "content_digest": adapterkit.fingerprint(tuned_dir, content=True).content_digest,
    }
    assert adapter.metadata["base_model"]["structure_digest"] == adapterkit.fingerprint(base_dir).structure_digest
    _, _, _, _, changes = llama_pair
    for name, delta in changes.items():
        if name != "model.norm.weight":
            assert lineage["change_norm"][module_of(name)] == pytest.approx(float(delta.norm()), rel=1e-4)
    store = Store(tmp_path / "store")
    first = store.put(adapter, "me/extracted")
    again = store.put(extract(base_dir, tuned_dir, rank=4, content_digest=True), "me/extracted:again")
    assert first.digest == again.digest  # deterministic: same pair, same parameters, same digest
    stored = store.get("me/extracted")
    assert stored.metadata["lineage"]["truncation_error"] == lineage["truncation_error"]


def test_merge_then_extract_recovers_the_adapter(peft_folders: Any, tmp_path: Path) -> None:
    """Merging an adapter into its base and extracting it back gives its change to rounding (the DoRA recipe)."""
    store = Store(tmp_path / "store")
    store.add(peft_folders.lora, "lora", base=peft_folders.base)
    original = store.get("lora")
    adapterkit.merge([original], None, peft_folders.base, tmp_path / "merged")
    adapter = extract(peft_folders.base, tmp_path / "merged", rank=8)
    assert set(adapter.modules) == set(original.modules)
    assert sorted(adapter.metadata["lineage"]["unchanged"]) == sorted(
        m
        for m in (module_of(n) for n in adapterkit.fingerprint(peft_folders.base).tensors)
        if ".layers." in m and ("_proj" in m) and m not in original.modules
    )
    for name in original.modules:
        expected = original.delta(name)
        assert float((adapter.delta(name) - expected).norm() / expected.norm()) < 1e-5
    # and what the extraction wrote, the merge of it gives the same model
    adapterkit.merge([adapter], None, peft_folders.base, tmp_path / "merged-again")
    again = extract(peft_folders.base, tmp_path / "merged-again", rank=8)
    for name in original.modules:
        assert float((again.delta(name) - original.delta(name)).norm() / original.delta(name).norm()) < 1e-5


# --- the peer -----------------------------------------------------------------------------------------------


def _mergekit() -> str | None:
    found = shutil.which("mergekit-extract-lora") or str(Path(sys.executable).parent / "mergekit-extract-lora")
    return found if os.path.exists(found) else None


def test_error_is_at_most_mergekits_for_every_module(wide_pair: tuple[Path, Path, Changes], tmp_path: Path) -> None:
    tool = _mergekit()
    if tool is None:
        pytest.skip("mergekit (mergekit-extract-lora) is not installed")
    base_dir, tuned_dir, changes = wide_pair
    out = tmp_path / "mergekit"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [
            tool,
            "--model",
            str(tuned_dir.resolve()),
            "--base-model",
            str(base_dir.resolve()),
            "--out-path",
            str(out),
            "--max-rank",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    # mergekit writes the adapter, then may exit 1 looking the base up on the Hub for its model card
    assert (out / "adapter_model.safetensors").exists(), done.stderr[-2000:]
    peer = read_adapter(out)
    ours = extract(base_dir, tuned_dir, rank=4)
    assert set(ours.modules) <= set(peer.modules)
    assert set(ours.metadata["lineage"]["left_out"]) == set(EMBEDDINGS)
    for name, delta in changes.items():
        if name in EMBEDDINGS:
            continue  # mergekit copies embeddings whole (modules_to_save); ours reports them left out
        module = module_of(name)
        theirs = achieved_error(peer, module, delta)
        mine = achieved_error(ours, module, delta)
        assert mine <= theirs * (1 + 1e-6), (module, mine, theirs)
    # mergekit also carries every norm and the unchanged embeddings in full; ours carries only factors
    assert set(json.loads((out / "adapter_config.json").read_text())["modules_to_save"]) >= {"embed_tokens", "lm_head"}
    assert ours.extra_tensors == {}


# --- the command line ---------------------------------------------------------------------------------------


def test_cli_extract_tag_out_and_json(llama_pair: tuple[Any, Any, Path, Path, Changes], tmp_path: Path) -> None:
    base, tuned, base_dir, tuned_dir, _ = llama_pair
    store = tmp_path / "store"
    runner = CliRunner()
    args = ["--store", str(store), "extract", "--base", str(base_dir), "--tuned", str(tuned_dir)]
    result = runner.invoke(cli, [*args, "--rank", "4", "--tag", "me/ft", "--out", str(tmp_path / "folder")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("me/ft:latest sha256:") and ", wrote " in lines[0]
    assert "(extract at rank 4: 14 modules, ranks 4, 8,192 parameters)" in lines[0]
    assert lines[1].startswith("error: max ")
    assert lines[2].startswith("left out: model.norm.weight changed by ")
    loaded = load_peft(base, tmp_path / "folder")
    assert max_abs_diff(logits(loaded), logits(tuned)) < max_abs_diff(logits(base), logits(tuned))
    result = runner.invoke(cli, [*args, "--budget", "5k", "--tag", "me/ft:budget", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["ref"] == "me/ft:budget" and document["digest"].startswith("sha256:")
    assert document["num_parameters"] <= 5000
    assert document["lineage"]["parameters"]["budget"] == 5000
    shown = runner.invoke(cli, ["--store", str(store), "show", "me/ft"])
    assert f"lineage:     extract from {tuned_dir} (sha256:" in shown.output


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--rank", "2"], 2, "Missing option '--tag' or '--out'"),
        (["--rank", "2", "--energy", "0.5", "--tag", "x"], 2, "Give exactly one of --rank, --energy or --budget"),
        (["--budget", "lots", "--tag", "x"], 2, "is not a whole, positive number of parameters"),
        (["--budget", "nan", "--tag", "x"], 2, "is not a whole, positive number of parameters"),
        (["--rank", "2", "--targets", "nope", "--tag", "x"], 1, "Error: target 'nope' matches no weight"),
    ],
)
def test_cli_errors(
    llama_pair: tuple[Any, Any, Path, Path, Changes], tmp_path: Path, extra: list[str], code: int, message: str
) -> None:
    _, _, base_dir, tuned_dir, _ = llama_pair
    args = ["--store", str(tmp_path), "extract", "--base", str(base_dir), "--tuned", str(tuned_dir), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code
    assert message in result.output
    if code == 1:
        assert len(result.output.strip().splitlines()) == 1


def test_cli_refuses_a_non_empty_out_folder(llama_pair: tuple[Any, Any, Path, Path, Changes], tmp_path: Path) -> None:
    _, _, base_dir, tuned_dir, _ = llama_pair
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    args = [
        "extract",
        "--base",
        str(base_dir),
        "--tuned",
        str(tuned_dir),
        "--rank",
        "2",
        "--out",
        str(tmp_path / "taken"),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "already exists and is not an empty directory" in result.output


def test_spectrum_helpers() -> None:
    spectrum = Spectrum(torch.eye(3), torch.tensor([3.0, 2.0, 1.0]), torch.eye(3), energy=14.0, complete=True)
    assert energy_rank(spectrum, 9 / 14) == 1
    assert energy_rank(spectrum, 13 / 14) == 2
    assert energy_rank(spectrum, 1.0) == 3
    partial = Spectrum(torch.eye(3)[:, :1], torch.tensor([3.0]), torch.eye(3)[:1], energy=14.0, complete=False)
    assert energy_rank(partial, 0.9) is None
