"""inspect / plot / dry-run plans: every number against dense maths or the real operation on tiny adapters."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import MIXED_LORA_SPECS, save_base, save_lora, tiny_conv_net, tiny_gpt2, tiny_llama

from adapterkit import compose, inspect, plan_compose, plan_merge
from adapterkit.adapter.model import Adapter
from adapterkit.analysis.plotting import layer_and_type, plot
from adapterkit.analysis.spectra import ENERGY_THRESHOLDS
from adapterkit.errors import (
    BaseModelError,
    CompositionError,
    IncompatibleAdaptersError,
    InvalidInputError,
    UnknownStrategyError,
    UnsupportedAdapterError,
)
from adapterkit.formats.peft import read_adapter
from adapterkit.merging.streamed import merge

WEIGHTS = [0.7, -0.3, 0.45]
TOL = 1e-5


@pytest.fixture(scope="module")
def llama_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded tiny Llama base and three adapters of mixed ranks, alphas, rslora, patterns and targets."""
    root = tmp_path_factory.mktemp("inspect")
    base = tiny_llama()
    save_base(base, root / "base", max_shard_size="20KB")
    specs = MIXED_LORA_SPECS
    for i, spec in enumerate(specs):
        save_lora(base, root / f"p{i}", seed=i + 1, **spec)
    return root


@pytest.fixture(scope="module")
def parents(llama_root: Path) -> list[Adapter]:
    return [read_adapter(llama_root / f"p{i}") for i in range(3)]


@pytest.fixture(scope="module")
def odd_layouts(tmp_path_factory: pytest.TempPathFactory) -> list[list[Adapter]]:
    """Pairs of adapters on GPT-2 (fan_in_fan_out Conv1D) and on a conv net (3x3, 1x1 and 1-D kernels)."""
    root = tmp_path_factory.mktemp("layouts")
    gpt2, conv = tiny_gpt2(), tiny_conv_net()
    gpt2_kw = dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    conv_kw = dict(target_modules=["conv", "pointwise", "temporal", "head"])
    return [
        [read_adapter(save_lora(gpt2, root / f"g{i}", seed=i, r=4 + 2 * i, lora_alpha=8, **gpt2_kw)) for i in (0, 1)],
        [read_adapter(save_lora(conv, root / f"c{i}", seed=i, r=2 + i, lora_alpha=4, **conv_kw)) for i in (0, 1)],
    ]


def dense(adapter: Adapter, name: str) -> torch.Tensor:
    """The module's delta in float64 as a matrix (a convolution's kernel dimensions flattened into the columns)."""
    delta = adapter.delta(name, torch.float64)
    return delta.reshape(delta.shape[0], -1)


def weighted_dense(adapters: list[Adapter], weights: list[float], name: str) -> list[torch.Tensor]:
    return [w * dense(a, name) for a, w in zip(adapters, weights, strict=True) if name in a.modules]


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()))


# --- inspect: against dense maths --------------------------------------------------------------------------------


def check_adapter_stats(adapters: list[Adapter], report: dict[str, Any]) -> None:
    for adapter, entry in zip(adapters, report["adapters"], strict=True):
        assert entry["num_parameters"] == sum(m.A.numel() + m.B.numel() for m in adapter.modules.values())
        assert entry["size_bytes"] == sum(4 * (m.A.numel() + m.B.numel()) for m in adapter.modules.values())
        assert set(entry["modules"]) == set(adapter.modules)
        squared = 0.0
        for name, module in entry["modules"].items():
            matrix = dense(adapter, name)
            S = torch.linalg.svdvals(matrix)
            spectrum = torch.tensor(module["spectrum"], dtype=torch.float64)
            assert module["r"] == adapter.modules[name].spec.r == len(spectrum)
            assert (spectrum - S[: len(spectrum)]).abs().max() <= TOL * S[0], name
            assert float(S[len(spectrum) :].sum()) <= TOL * S[0]  # nothing beyond rank r
            assert module["frobenius_norm"] == pytest.approx(float(matrix.norm()), rel=TOL)
            p = S[: len(spectrum)] / S[: len(spectrum)].sum()
            assert module["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=TOL)
            assert 1 <= module["effective_rank"] <= module["numerical_rank"] == module["r"]
            squared += float(matrix.norm()) ** 2
        assert entry["frobenius_norm"] == pytest.approx(math.sqrt(squared), rel=TOL)


def check_cosines(adapters: list[Adapter], weights: list[float], report: dict[str, Any]) -> None:
    pairs = report["interference"]["pairs"]
    norms = [  # each weighted adapter as one vector over all its modules
        math.sqrt(sum(float(w * dense(a, n).norm()) ** 2 for n in a.modules))
        for a, w in zip(adapters, weights, strict=True)
    ]
    assert [p["adapters"] for p in pairs] == [[i, j] for i in range(len(adapters)) for j in range(i + 1, len(adapters))]
    for pair in pairs:
        i, j = pair["adapters"]
        shared = sorted(set(adapters[i].modules) & set(adapters[j].modules))
        assert sorted(pair["modules"]) == shared and pair["shared_modules"] == len(shared)
        inner = 0.0
        for name in shared:
            di = weights[i] * dense(adapters[i], name)
            dj = weights[j] * dense(adapters[j], name)
            assert pair["modules"][name]["cosine"] == pytest.approx(cosine(di, dj), abs=TOL), name
            inner += float((di * dj).sum())
        if shared:
            assert pair["cosine"] == pytest.approx(inner / (norms[i] * norms[j]), abs=TOL)
            mean = sum(m["cosine"] for m in pair["modules"].values()) / len(shared)
            assert pair["mean_cosine"] == pytest.approx(mean, abs=1e-12)


def check_energy(adapters: list[Adapter], weights: list[float], report: dict[str, Any]) -> None:
    energy = report["energy"]
    names = sorted({n for a in adapters for n in a.modules})
    assert sorted(energy["modules"]) == names
    powers = []
    for name in names:
        entry = energy["modules"][name]
        exact = sum(weighted_dense(adapters, weights, name))
        S = torch.linalg.svdvals(exact)
        power = S**2
        powers.append(power)
        dense_curve = torch.cumsum(power, 0) / power.sum()
        curve = torch.tensor(entry["curve"], dtype=torch.float64)
        assert entry["input_rank"] == sum(a.modules[name].spec.r for a in adapters if name in a.modules)
        assert len(curve) == min(entry["input_rank"], *exact.shape)
        assert (curve - dense_curve[: len(curve)]).abs().max() <= TOL, name
        assert entry["frobenius_norm"] == pytest.approx(float(exact.norm()), rel=TOL)
        for threshold in ENERGY_THRESHOLDS:
            assert entry["ranks_for_energy"][format(threshold, "g")] == int((dense_curve < threshold).sum()) + 1
    longest = max(len(energy["modules"][n]["curve"]) for n in names)
    kept = sum(torch.stack([torch.cumsum(p, 0)[min(k, len(p)) - 1] for k in range(1, longest + 1)]) for p in powers)
    overall = kept / sum(p.sum() for p in powers)
    curve = torch.tensor(energy["overall"]["curve"], dtype=torch.float64)
    assert energy["overall"]["max_rank"] == longest == len(curve)
    assert (curve - overall).abs().max() <= TOL
    for threshold in ENERGY_THRESHOLDS:
        assert energy["overall"]["ranks_for_energy"][format(threshold, "g")] == int((overall < threshold).sum()) + 1


def test_inspect_matches_dense_maths(parents: list[Adapter]) -> None:
    report = inspect(parents, WEIGHTS, rank_curve=True)
    json.dumps(report, allow_nan=False)  # JSON as it is, no NaN
    assert report["weights"] == WEIGHTS and len(report["adapters"]) == 3
    check_adapter_stats(parents, report)
    check_cosines(parents, WEIGHTS, report)
    check_energy(parents, WEIGHTS, report)


@pytest.mark.parametrize("layout", [0, 1], ids=["gpt2-fan-in-fan-out", "conv-kernels"])
def test_inspect_matches_dense_maths_for_transposed_and_conv_layouts(
    odd_layouts: list[list[Adapter]], layout: int
) -> None:
    adapters, weights = odd_layouts[layout], [1.0, -0.6]
    report = inspect(adapters, weights, rank_curve=True)
    check_adapter_stats(adapters, report)
    check_cosines(adapters, weights, report)
    check_energy(adapters, weights, report)


def test_summary_without_curves_and_one_adapter(parents: list[Adapter]) -> None:
    report = inspect(parents[:1])
    assert report["interference"] is None
    assert "curve" not in report["energy"]["overall"]
    assert all("curve" not in m for m in report["energy"]["modules"].values())
    # one adapter: the energy curve is its own spectrum's, so svd --rank can compress it
    for name, module in report["adapters"][0]["modules"].items():
        S = torch.tensor(module["spectrum"], dtype=torch.float64)
        kept = torch.cumsum(S**2, 0) / (S**2).sum()
        assert report["energy"]["modules"][name]["ranks_for_energy"]["0.9"] == int((kept < 0.9).sum()) + 1


def dense_conflict(adapters: list[Adapter], weights: list[float], i: int, j: int, name: str) -> float:
    di, dj = weights[i] * dense(adapters[i], name), weights[j] * dense(adapters[j], name)
    return float(((di * dj) < 0).double().mean())


def test_sign_conflict_is_exact_for_small_modules(parents: list[Adapter]) -> None:
    report = inspect(parents, WEIGHTS)  # tiny modules hold fewer entries than the default sample: counted exactly
    for pair in report["interference"]["pairs"]:
        i, j = pair["adapters"]
        for name, module in pair["modules"].items():
            assert module["exact"] and module["sign_conflict_stderr"] == 0
            assert module["sign_conflict"] == pytest.approx(dense_conflict(parents, WEIGHTS, i, j, name), abs=1e-12)


def test_sign_conflict_estimate_is_within_its_standard_error(parents: list[Adapter]) -> None:
    """Sampled (256 of 512-2048 entries): each estimate within 4 standard errors of the dense fraction.

    The samples are independent uniform draws, so the estimate is binomial with standard error
    sqrt(p (1 - p) / n); 4 SE bounds the miss with probability > 0.9999 per module, and the seed
    makes the outcome fixed.
    """
    report = inspect(parents, WEIGHTS, sign_samples=256, seed=3)
    assert inspect(parents, WEIGHTS, sign_samples=256, seed=3)["interference"] == report["interference"]
    for pair in report["interference"]["pairs"]:
        i, j = pair["adapters"]
        total = exact_total = 0.0
        for name, module in pair["modules"].items():
            exact = dense_conflict(parents, WEIGHTS, i, j, name)
            assert not module["exact"] and 0 < module["sign_conflict_stderr"] <= 0.5 / math.sqrt(256)
            assert abs(module["sign_conflict"] - exact) <= 4 * module["sign_conflict_stderr"], name
            total += module["entries"]
            exact_total += exact * module["entries"]
        assert abs(pair["sign_conflict"] - exact_total / total) <= 4 * pair["sign_conflict_stderr"]


def synthetic_pair(out: int = 192, inp: int = 256, r: int = 6) -> list[Adapter]:
    """Two correlated adapters large enough for real sampling (49k entries, 4096 samples)."""
    generator = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(r, inp, generator=generator), torch.randn(out, r, generator=generator)
    A2 = A1 + 0.7 * torch.randn(r, inp, generator=generator)
    B2 = B1 + 0.7 * torch.randn(out, r, generator=generator)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["proj"]}
    key = "base_model.model.layers.0.proj.lora_{}.weight"
    return [Adapter.from_state_dict(config, {key.format("A"): A, key.format("B"): B}) for A, B in ((A1, B1), (A2, B2))]


def test_sign_conflict_estimate_on_a_large_module() -> None:
    adapters = synthetic_pair()
    report = inspect(adapters)
    module = report["interference"]["pairs"][0]["modules"]["layers.0.proj"]
    exact = dense_conflict(adapters, [1.0, 1.0], 0, 1, "layers.0.proj")
    assert 0.05 < exact < 0.45  # correlated deltas: a fraction far from both 0 and 1/2
    assert not module["exact"] and module["sign_conflict_stderr"] == pytest.approx(
        math.sqrt(module["sign_conflict"] * (1 - module["sign_conflict"]) / 4096)
    )
    assert abs(module["sign_conflict"] - exact) <= 4 * module["sign_conflict_stderr"]
    assert inspect(adapters, seed=1)["interference"] != report["interference"]  # the seed chooses the entries


def test_zero_deltas_give_zeros_not_nan(parents: list[Adapter]) -> None:
    """A freshly initialised LoRA (B = 0, PEFT's default) has no spectrum and no direction."""
    zero = copy.copy(parents[0])
    zero.modules = {n: copy.copy(m) for n, m in parents[0].modules.items()}
    for module in zero.modules.values():
        module.B = torch.zeros_like(module.B)
    report = inspect([zero, parents[1]], [1.0, 1.0])
    json.dumps(report, allow_nan=False)
    module = report["adapters"][0]["modules"]["model.layers.0.self_attn.v_proj"]
    assert module["frobenius_norm"] == module["effective_rank"] == module["numerical_rank"] == 0
    assert report["energy"]["modules"]["model.layers.0.self_attn.v_proj"]["ranks_for_energy"]["0.9"] == 0
    pair = report["interference"]["pairs"][0]
    assert pair["cosine"] is None and all(m["cosine"] is None for m in pair["modules"].values())


def test_inspect_refuses_what_compose_refuses(parents: list[Adapter]) -> None:
    pissa = copy.copy(parents[0])
    pissa.config = {**parents[0].config, "init_lora_weights": "pissa"}
    with pytest.raises(UnsupportedAdapterError, match="init_lora_weights"):
        inspect([pissa])
    first, other = copy.copy(parents[0]), copy.copy(parents[1])
    first.config = {**parents[0].config, "base_model_name_or_path": "org/a"}
    other.config = {**parents[1].config, "base_model_name_or_path": "org/b"}
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        inspect([first, other])
    assert inspect([first, other], force=True)["interference"]["pairs"]
    with pytest.raises(CompositionError, match="2 weights for 3 adapters"):
        inspect(parents, [1, 2])


# --- DoRA: the directional update and the magnitudes ----------------------------------------------------------


@pytest.fixture(scope="module")
def dora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora(
        tiny_llama(),
        tmp_path_factory.mktemp("dora") / "dora",
        seed=4,
        use_dora=True,
        target_modules=["q_proj", "o_proj"],
    )


def test_inspect_describes_a_dora_adapter(dora_folder: Path) -> None:
    """Per module: the spectrum of s*B@A (the directional update) and the magnitude vector PEFT loads."""
    from helpers import load_peft, lora_layers

    dora = read_adapter(dora_folder)
    report = inspect([dora], rank_curve=True)
    json.dumps(report, allow_nan=False)
    (entry,) = report["adapters"]
    assert entry["update"] == "directional"
    plain = copy.copy(dora)  # the same factors read as a plain LoRA: its delta is the directional update
    plain.config = {k: v for k, v in dora.config.items() if k != "use_dora"}
    check_adapter_stats([plain], report)
    layers = lora_layers(load_peft(tiny_llama(), dora_folder))
    assert set(entry["modules"]) == set(layers) and len(layers) == 4
    for name, module in entry["modules"].items():
        vector = layers[name].lora_magnitude_vector["default"].weight.detach().double()
        stats = module["magnitude"]
        assert stats["length"] == vector.numel() == dora.modules[name].spec.out_features
        assert stats["min"] == pytest.approx(float(vector.min()), rel=1e-12)
        assert stats["max"] == pytest.approx(float(vector.max()), rel=1e-12)
        assert stats["mean"] == pytest.approx(float(vector.mean()), rel=1e-12)
        assert stats["norm"] == pytest.approx(float(vector.norm()), rel=1e-12)
    assert report["interference"] is None and report["energy"] is None
    assert "'use_dora'" in report["not_computed"] and "not a delta that sums" in report["not_computed"]
    with pytest.raises(InvalidInputError, match="nothing to plot: adapter 1 is DoRA"):
        plot(report, Path("never.png"))


def test_inspect_leaves_out_interference_with_a_dora_adapter(parents: list[Adapter], dora_folder: Path) -> None:
    """A DoRA change is not a delta that sums: no cosines or energy of a blend, each adapter still described."""
    dora = read_adapter(dora_folder)
    report = inspect([parents[0], dora], [0.5, 1.0])
    assert [a["update"] for a in report["adapters"]] == ["delta", "directional"]
    assert "magnitude" not in next(iter(report["adapters"][0]["modules"].values()))
    assert report["interference"] is None and report["energy"] is None
    assert report["not_computed"].startswith("adapter 2 is DoRA (field 'use_dora')")
    assert inspect(parents[:2])["not_computed"] is None
    other = copy.copy(dora)
    other.config = {**dora.config, "base_model_name_or_path": "org/other"}
    first = copy.copy(parents[0])
    first.config = {**parents[0].config, "base_model_name_or_path": "org/first"}
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        inspect([first, other])  # still one base, as for any inspect of several adapters


# --- plot -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3])
def test_plot_writes_a_png(parents: list[Adapter], tmp_path: Path, count: int) -> None:
    report = inspect(parents[:count], WEIGHTS[:count], rank_curve=True)
    out = plot(report, tmp_path / "report.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_plot_needs_curves_and_matplotlib(parents: list[Adapter], tmp_path: Path, monkeypatch: Any) -> None:
    with pytest.raises(InvalidInputError, match="rank_curve=True"):
        plot(inspect(parents[:1]), tmp_path / "no.png")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    with pytest.raises(InvalidInputError, match=r"adapterkit\[plot\]"):
        plot(inspect(parents[:1], rank_curve=True), tmp_path / "no.png")
    assert not (tmp_path / "no.png").exists()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.12.self_attn.q_proj", (12, "self_attn.q_proj")),
        ("transformer.h.3.attn.c_attn", (3, "attn.c_attn")),
        ("model.embed_tokens", (None, "model.embed_tokens")),
    ],
)
def test_layer_and_type(name: str, expected: tuple[int | None, str]) -> None:
    assert layer_and_type(name) == expected


# --- compose --dry-run ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "params"),
    [
        ("linear", {}),
        ("svd", {}),
        ("svd", {"rank": 3}),
        ("svd", {"rank": 100}),
        ("svd", {"energy": 0.9}),
        ("svd", {"energy": 0.5}),
        ("ties", {"rank": 3}),
        ("ties", {}),
        ("dare_linear", {"rank": 5, "density": 0.7}),
    ],
)
def test_plan_compose_ranks_equal_what_compose_produces(
    parents: list[Adapter], strategy: str, params: dict[str, Any]
) -> None:
    plan = plan_compose(parents, WEIGHTS, strategy, **params)
    blended = compose(parents, WEIGHTS, strategy, **params)
    json.dumps(plan, allow_nan=False)
    assert {n: e["rank"] for n, e in plan["modules"].items() if e["rank"]} == {
        n: m.spec.r for n, m in blended.modules.items()
    }
    assert plan["num_modules"] == len(blended.modules)
    assert plan["output_parameters"] == blended.num_parameters
    assert plan["output_bytes"] == sum(4 * (m.A.numel() + m.B.numel()) for m in blended.modules.values())
    assert plan["parameters"] == blended.metadata["lineage"]["parameters"]
    assert plan["flops"] > 0 and plan["peak_bytes"] > plan["module_peak_bytes"] > 0
    if strategy == "svd":
        errors = blended.metadata["lineage"]["truncation_error"]
        assert {n: e["truncation_error"] for n, e in plan["modules"].items()} == pytest.approx(errors, abs=1e-12)


def test_plan_compose_leaves_energy_driven_dense_ranks_open(parents: list[Adapter]) -> None:
    plan = plan_compose(parents, WEIGHTS, "ties", energy=0.9)
    assert plan["ranks_known"] is False and plan["output_parameters"] is None
    for name, entry in plan["modules"].items():
        assert entry["rank"] is None and entry["rank_max"] == min(parents_shape(parents, name))
    identity = plan_compose(parents[:1], [1.0])  # compose returns the parent itself
    assert identity["flops"] == 0 and identity["output_bytes"] == sum(
        4 * (m.A.numel() + m.B.numel()) for m in parents[0].modules.values()
    )
    assert {n: e["rank"] for n, e in identity["modules"].items()} == {
        n: m.spec.r for n, m in parents[0].modules.items()
    }


def parents_shape(parents: list[Adapter], name: str) -> tuple[int, int]:
    spec = next(p.modules[name].spec for p in parents if name in p.modules)
    return spec.out_features, spec.in_features


@pytest.mark.parametrize(
    ("error", "args", "params"),
    [
        (UnknownStrategyError, ("nope",), {}),
        (CompositionError, ("svd",), {"rank": 0}),
        (CompositionError, ("svd",), {"energy": 1.5}),
        (CompositionError, ("svd",), {"rnak": 3}),
        (CompositionError, ("linear",), {"rank": 3}),
    ],
)
def test_plan_compose_raises_what_compose_raises(
    parents: list[Adapter], error: type[Exception], args: tuple[str, ...], params: dict[str, Any]
) -> None:
    with pytest.raises(error) as real:
        compose(parents, WEIGHTS, *args, **params)
    with pytest.raises(error) as planned:
        plan_compose(parents, WEIGHTS, *args, **params)
    assert str(planned.value) == str(real.value)


def test_plan_compose_refuses_different_bases_and_empty_blends(parents: list[Adapter]) -> None:
    first, other = copy.copy(parents[0]), copy.copy(parents[1])
    first.config = {**parents[0].config, "base_model_name_or_path": "org/a"}
    other.config = {**parents[1].config, "base_model_name_or_path": "org/b"}
    for function in (compose, plan_compose):
        with pytest.raises(IncompatibleAdaptersError, match="different base models"):
            function([first, other], [1, 1])
        with pytest.raises(CompositionError, match="the blend is empty"):
            function(parents, [0.0, 0.0, 0.0], "svd", energy=0.9)


# --- merge --dry-run --------------------------------------------------------------------------------------------


def test_plan_merge_matches_the_merge_report(parents: list[Adapter], llama_root: Path, tmp_path: Path) -> None:
    adapters, weights = parents[:2], WEIGHTS[:2]
    summary = plan_merge(adapters, weights, llama_root / "base")
    json.dumps(summary, allow_nan=False)
    report = merge(adapters, weights, llama_root / "base", tmp_path / "out").to_json()
    for key in ("merged_tensors", "shards", "tensors", "bytes_written", "copied_files", "skipped_files", "warnings"):
        assert summary[key] == report[key], key
    assert sorted(summary["touched"]) == report["merged_tensors"]
    expected = 0
    for adapter, weight in zip(adapters, weights, strict=True):
        for module in adapter.modules.values():
            expected += 2 * module.spec.out_features * module.spec.in_features * module.spec.r
            entry = summary["touched"][f"{module.name}.weight"]
            assert {"op": "lora", "adapter": adapters.index(adapter), "module": module.name, "r": module.spec.r,
                    "factor": weight * module.spec.scaling} in entry["contributions"]  # fmt: skip
    assert summary["flops"] == expected
    assert summary["peak_bytes"] > summary["adapter_bytes"] > 0
    assert summary["copied_tensors"] + len(summary["touched"]) == summary["tensors"]


def test_plan_merge_converts_and_refuses_like_merge(parents: list[Adapter], llama_root: Path, tmp_path: Path) -> None:
    summary = plan_merge(parents[:1], [1.0], llama_root / "base", dtype="bf16")
    report = merge(parents[:1], [1.0], llama_root / "base", tmp_path / "out", dtype="bf16").to_json()
    assert summary["bytes_written"] == report["bytes_written"] and summary["dtype"] == "BF16"
    assert summary["converted_tensors"] + len(summary["touched"]) == summary["tensors"]
    wrong = copy.copy(parents[0])
    wrong.metadata = {"base_model": {"name": "x", "structure_digest": "sha256:" + "0" * 64}}
    with pytest.raises(BaseModelError, match="fingerprints differ"):
        plan_merge([wrong], None, llama_root / "base")
    with pytest.raises(CompositionError, match="weights"):
        plan_merge(parents[:2], [1.0], llama_root / "base")
