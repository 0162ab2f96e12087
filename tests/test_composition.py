"""compose(): exactness against dense maths and PEFT, lineage, compatibility checks, determinism."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import MIXED_LORA_SPECS, logits, save_lora, tiny_llama

from adapterkit import compose
from adapterkit.adapter.model import Adapter, LoraModule
from adapterkit.errors import CompositionError, IncompatibleAdaptersError, UnknownStrategyError, UnsupportedAdapterError
from adapterkit.formats.peft import read_adapter, write_adapter

WEIGHTS = [0.7, -0.3, 0.45]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def parents(base: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> list[Adapter]:
    """Three adapters that differ in rank, alpha, rslora, patterns and target modules."""
    root = tmp_path_factory.mktemp("parents")
    specs = MIXED_LORA_SPECS
    return [read_adapter(save_lora(base, root / f"p{i}", seed=i + 1, **spec)) for i, spec in enumerate(specs)]


def exact_sum(adapters: list[Adapter], weights: list[float], name: str) -> torch.Tensor:
    total = None
    for adapter, weight in zip(adapters, weights, strict=True):
        if name in adapter.modules:
            delta = weight * adapter.delta(name, torch.float64)
            total = delta if total is None else total + delta
    assert total is not None
    return total


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_linear_is_the_exact_weighted_sum(parents: list[Adapter], dtype: torch.dtype, tolerance: float) -> None:
    blended = compose(parents, WEIGHTS, "linear", dtype=dtype)
    names = {n for p in parents for n in p.modules}
    assert set(blended.modules) == names  # modules missing from a parent contribute zero, none dropped
    for name in names:
        assert rel(blended.delta(name, torch.float64), exact_sum(parents, WEIGHTS, name)) <= tolerance, name
        assert blended.modules[name].spec.r == sum(p.modules[name].spec.r for p in parents if name in p.modules)


def test_one_adapter_with_weight_one_is_reproduced_exactly(parents: list[Adapter]) -> None:
    blended = compose([parents[1]], [1.0], "linear")
    for name, module in parents[1].modules.items():
        assert torch.equal(blended.delta(name), module.delta())


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_is_the_best_rank_k_approximation(parents: list[Adapter], rank: int) -> None:
    blended = compose(parents, WEIGHTS, "svd", rank=rank, dtype=torch.float64)
    errors = blended.metadata["lineage"]["truncation_error"]
    for name, module in blended.modules.items():
        exact = exact_sum(parents, WEIGHTS, name)
        U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
        k = min(rank, int((S[0] * 1e-12 < S).sum()))
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        total_rank = sum(p.modules[name].spec.r for p in parents if name in p.modules)
        assert module.spec.r == min(rank, total_rank)  # the exact sum has rank <= sum of the parents' ranks
        assert rel(blended.delta(name, torch.float64), best) <= 1e-5, name
        optimal_error = float(S[k:].norm() / S.norm())
        assert errors[name] == pytest.approx(optimal_error, abs=1e-6)


def test_svd_energy_picks_rank_per_module(parents: list[Adapter]) -> None:
    blended = compose(parents, WEIGHTS, "svd", energy=0.9, dtype=torch.float64)
    for name, module in blended.modules.items():
        S = torch.linalg.svdvals(exact_sum(parents, WEIGHTS, name))
        kept = torch.cumsum(S**2, 0) / (S**2).sum()
        assert module.spec.r == int((kept < 0.9).sum()) + 1, name


def test_svd_is_never_worse_than_peft(base: torch.nn.Module, tmp_path: Path) -> None:
    from peft import PeftModel

    folders = [save_lora(base, tmp_path / f"a{i}", seed=i, r=8, lora_alpha=16) for i in range(3)]
    model = PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="a0")
    for i in (1, 2):
        model.load_adapter(folders[i], adapter_name=f"a{i}")
    model.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, "peft_svd", combination_type="svd", svd_rank=4)
    ours = compose([read_adapter(f) for f in folders], WEIGHTS, "svd", rank=4)
    exact_parents = [read_adapter(f) for f in folders]
    for name, module in ours.modules.items():
        exact = exact_sum(exact_parents, WEIGHTS, name)
        peft_delta = model.base_model.model.get_submodule(name).get_delta_weight("peft_svd")
        assert rel(module.delta(), exact) <= rel(peft_delta, exact) + 1e-6, name


@pytest.mark.parametrize("strategy", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_dense_strategies_truncate_optimally(parents: list[Adapter], strategy: str) -> None:
    """The rank-4 result is the best rank-4 approximation of the strategy's own dense result (Eckart-Young),
    and the recorded error is its actual relative error. The dense result is the same blend at full rank (which
    test_mergekit_oracle.py checks against mergekit)."""
    params = {"density": 0.6, "dtype": torch.float64} | ({"seed": 2} if strategy.startswith("dare") else {})
    full = compose(parents, WEIGHTS, strategy, rank=256, **params)  # keeps every singular value
    blended = compose(parents, WEIGHTS, strategy, rank=4, **params)
    errors = blended.metadata["lineage"]["truncation_error"]
    assert set(errors) == set(blended.modules) == set(full.modules)
    for name, module in blended.modules.items():
        dense = full.delta(name, torch.float64)
        spectrum = torch.linalg.svdvals(dense)
        optimal = float(spectrum[4:].norm() / spectrum.norm())
        actual = rel(module.delta(dtype=torch.float64), dense)
        assert module.spec.r == min(4, *dense.shape)
        assert actual <= optimal * (1 + 1e-9) + 1e-12, (name, actual, optimal)
        assert errors[name] == pytest.approx(actual, rel=1e-6, abs=1e-12), name
        assert optimal > 0.01, name  # rank 4 loses something here: the comparison means something


def test_ties_matches_the_dense_reference(parents: list[Adapter]) -> None:
    """TIES on dense deltas: trim, elect the sign of the weighted trimmed sum, mean of the agreeing weighted entries."""
    density = 0.5
    blended = compose(parents[:2], WEIGHTS[:2], "ties", density=density, rank=64, dtype=torch.float64)
    for name, module in blended.modules.items():
        deltas = [p.delta(name, torch.float64) for p in parents[:2] if name in p.modules]
        weights = [w for p, w in zip(parents[:2], WEIGHTS[:2], strict=True) if name in p.modules]
        trimmed = []
        for d in deltas:
            keep = round(density * d.numel())
            threshold = d.abs().flatten().kthvalue(d.numel() - keep + 1).values
            trimmed.append(d * (d.abs() >= threshold))
        voters = [w * t for w, t in zip(weights, trimmed, strict=True)]
        sign = torch.stack(voters).sum(0).sign()
        sign[sign == 0] = 1
        agree = [(v.sign() == sign) & (v != 0) for v in voters]
        total = sum(torch.where(a, v, 0.0) for a, v in zip(agree, voters, strict=True))
        expected = total / torch.stack(agree).sum(0).clamp(min=1)
        assert rel(module.delta(dtype=torch.float64), expected) <= 1e-6, name


def test_dare_is_seeded(parents: list[Adapter]) -> None:
    first = compose(parents, WEIGHTS, "dare_ties", density=0.5, seed=7)
    again = compose(parents, WEIGHTS, "dare_ties", density=0.5, seed=7)
    other = compose(parents, WEIGHTS, "dare_ties", density=0.5, seed=8)
    name = next(iter(first.modules))
    assert torch.equal(first.modules[name].A, again.modules[name].A)
    assert not torch.equal(first.delta(name), other.delta(name))


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_dare_masks_are_keyed_by_the_parents_position_in_the_call(parents: list[Adapter], strategy: str) -> None:
    """A parent's mask for a module must not depend on whether the parents before it have that module.

    ``x`` lacks the module, ``z`` has it with B = 0 (a zero change): both are parent 0, so the second
    parent's mask, hence the blend, must be the same. Keyed by the position among the parents that have
    the module (the old rule), the second parent's mask would be key 0 in one blend and key 1 in the other.
    """
    x, y = parents[0], parents[1]
    name = next(n for n in y.modules if n not in x.modules)
    z = copy.copy(x)
    module = y.modules[name]
    z.modules = {**x.modules, name: LoraModule(module.spec, module.A, torch.zeros_like(module.B))}
    params = {"density": 0.5, "seed": 3, "dtype": torch.float64}
    lacking = compose([x, y], [0.6, 0.9], strategy, **params)
    zero = compose([z, y], [0.6, 0.9], strategy, **params)
    assert rel(lacking.delta(name, torch.float64), zero.delta(name, torch.float64)) <= 1e-12
    as_first = compose([y, x], [0.9, 0.6], strategy, **params)  # the same parent at position 0: another mask
    assert rel(as_first.delta(name, torch.float64), zero.delta(name, torch.float64)) > 0.1


def test_peft_loads_the_blend_with_the_same_deltas(
    base: torch.nn.Module, parents: list[Adapter], tmp_path: Path
) -> None:
    from peft import PeftModel

    for strategy, params in [("linear", {}), ("svd", {"rank": 3}), ("ties", {"density": 0.5})]:
        blended = compose(parents, WEIGHTS, strategy, **params)
        folder = write_adapter(blended, tmp_path / strategy)
        model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        for name in blended.modules:
            layer = model.base_model.model.get_submodule(name)
            assert torch.allclose(layer.get_delta_weight("default"), blended.delta(name), atol=1e-6), (strategy, name)
        merged = copy.deepcopy(base)
        with torch.no_grad():
            for name in blended.modules:
                merged.get_submodule(name).weight += blended.delta(name)
        assert (logits(model) - logits(merged)).abs().max() <= 1e-5


def test_lineage_names_parents_weights_and_parameters(parents: list[Adapter]) -> None:
    import adapterkit

    blended = compose(parents[:2], [0.5, -1.0], "svd", rank=2)
    lineage = blended.metadata["lineage"]
    assert lineage["strategy"] == "svd" and lineage["parameters"] == {"rank": 2}
    assert [p["weight"] for p in lineage["parents"]] == [0.5, -1.0]
    assert all(p["digest"].startswith("sha256:") for p in lineage["parents"])
    assert lineage["adapterkit_version"] == adapterkit.__version__
    assert set(lineage["truncation_error"]) == set(blended.modules)


def test_different_bases_are_refused_unless_forced(parents: list[Adapter]) -> None:
    other = copy.copy(parents[1])
    other.config = {**parents[1].config, "base_model_name_or_path": "org/another-model"}
    first = copy.copy(parents[0])
    first.config = {**parents[0].config, "base_model_name_or_path": "org/tiny-llama"}
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        compose([first, other], [1, 1])
    assert compose([first, other], [1, 1], force=True).modules


def test_fingerprints_decide_over_names(parents: list[Adapter]) -> None:
    a, b = copy.copy(parents[0]), copy.copy(parents[1])
    a.metadata = {"base_model": {"name": "x", "revision": None, "structure_digest": "sha256:" + "a" * 64}}
    b.metadata = {"base_model": {"name": "x", "revision": None, "structure_digest": "sha256:" + "b" * 64}}
    with pytest.raises(IncompatibleAdaptersError, match="fingerprints"):
        compose([a, b], [1, 1])


def test_mismatched_module_shapes_are_refused(parents: list[Adapter], tmp_path: Path) -> None:
    wide = tiny_llama(hidden_size=48)
    other = read_adapter(save_lora(wide, tmp_path / "wide", seed=3))
    with pytest.raises(IncompatibleAdaptersError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        compose([parents[0], other], [1, 1], force=True)


def test_bad_requests_get_clear_errors(parents: list[Adapter]) -> None:
    with pytest.raises(UnknownStrategyError, match="available: dare_linear, dare_ties, linear"):
        compose(parents, WEIGHTS, "average")
    with pytest.raises(CompositionError, match="takes no parameter 'density'"):
        compose(parents, WEIGHTS, "svd", density=0.5)
    with pytest.raises(CompositionError, match="2 weights for 3 adapters"):
        compose(parents, [1, 1])
    with pytest.raises(CompositionError, match=r"^strategy 'svd': parameter 'rank' must be at least 1, got 0$"):
        compose(parents, WEIGHTS, "svd", rank=0)
    for strategy, params, message in [
        ("ties", {"density": 0.0}, r"'density' must be in \(0, 1\], got 0.0"),
        ("dare_linear", {"density": 1.5}, r"'density' must be in \(0, 1\], got 1.5"),
        ("magnitude_prune", {"energy": -1.0}, r"'energy' must be in \(0, 1\], got -1.0"),
        ("dare_ties", {"majority_sign_method": "mean"}, "must be one of 'total', 'frequency', got 'mean'"),
    ]:
        with pytest.raises(CompositionError, match=message):  # refused before any module: no module name in it
            compose(parents, WEIGHTS, strategy, **params)
    with pytest.raises(CompositionError, match="finite"):
        compose(parents, [1, float("nan"), 1])


def test_dora_parents_are_refused_with_the_way_to_a_plain_lora(
    base: torch.nn.Module, parents: list[Adapter], tmp_path: Path
) -> None:
    """DoRA's change depends on the base's norms: no delta to blend, so compose says why and how to get one."""
    dora = read_adapter(save_lora(base, tmp_path / "dora", seed=1, use_dora=True, modules_to_save=["lm_head"]))
    for adapters in ([dora], [parents[0], dora]):
        with pytest.raises(UnsupportedAdapterError, match="sets 'use_dora': a DoRA module's change depends") as info:
            compose(adapters)
        message = str(info.value)
        assert "not a low-rank delta that can be blended" in message
        assert "adapterkit merge" in message and "adapterkit extract --base BASE --tuned MERGED" in message
        assert "\n" not in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_cuda_matches_cpu(parents: list[Adapter]) -> None:
    on_cpu = compose(parents, WEIGHTS, "linear")
    on_gpu = compose(parents, WEIGHTS, "linear", device="cuda")
    for name in on_cpu.modules:
        assert torch.equal(on_cpu.modules[name].A, on_gpu.modules[name].A)
        assert torch.equal(on_cpu.modules[name].B, on_gpu.modules[name].B)
    svd_cpu = compose(parents, WEIGHTS, "svd", rank=4, dtype=torch.float64)
    svd_gpu = compose(parents, WEIGHTS, "svd", rank=4, dtype=torch.float64, device="cuda")
    for name in svd_cpu.modules:
        assert rel(svd_gpu.delta(name, torch.float64), svd_cpu.delta(name, torch.float64)) <= 1e-9


def test_same_inputs_and_seed_give_the_same_digest(parents: list[Adapter], tmp_path: Path) -> None:
    from adapterkit import Store

    store = Store(tmp_path / "store")
    first = store.put(compose(parents, WEIGHTS, "dare_ties", density=0.5, seed=11), "blend:first")
    second = store.put(compose(parents, WEIGHTS, "dare_ties", density=0.5, seed=11), "blend:second")
    other = store.put(compose(parents, WEIGHTS, "dare_ties", density=0.5, seed=12), "blend:other")
    assert first.digest == second.digest and second.new_bytes == 0
    assert other.digest != first.digest
    lineage = store.show("blend:first")["lineage"]
    assert lineage["parameters"] == {
        "density": 0.5,
        "seed": 11,
        "majority_sign_method": "total",
        "elect_on": "weighted",
    }


def test_a_stored_blend_loads_back_with_the_same_deltas(parents: list[Adapter], tmp_path: Path) -> None:
    from adapterkit import Store

    store = Store(tmp_path / "store")
    blended = compose(parents, WEIGHTS, "svd", rank=5)
    store.put(blended, "blend")
    loaded = store.get("blend")
    assert loaded.metadata["lineage"]["strategy"] == "svd"
    for name in blended.modules:
        assert torch.equal(loaded.delta(name), blended.delta(name))


def test_saved_base_tensors_ride_along_when_parents_agree(parents: list[Adapter]) -> None:
    """PEFT saves the embedding's own weight next to an embedding LoRA; a blend must keep it."""
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in parents[2].extra_tensors
    blended = compose(parents, WEIGHTS, "svd", rank=2)
    assert torch.equal(blended.extra_tensors[key], parents[2].extra_tensors[key])
    other = copy.copy(parents[0])
    other.extra_tensors = {key: parents[2].extra_tensors[key] + 1}
    with pytest.raises(CompositionError, match="different values for 'base_model"):
        compose([parents[2], other], [1, 1])


def test_dense_truncation_leaves_the_callers_random_state_alone(parents: list[Adapter]) -> None:
    import adapterkit.strategies.lowrank as lowrank

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lowrank.truncate_dense(torch.randn(300, 400, generator=torch.Generator().manual_seed(1)), 4, None, 4)
    assert torch.equal(torch.rand(3), expected)
