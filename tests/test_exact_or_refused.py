"""A blend is exact or refused: extra trainable tensors, non-finite values and empty results.

* compose and attach applied an adapter's trained biases at full weight while its LoRA part got
  the weight asked for; they now refuse, naming the field, as merge does.
* A NaN factor, or a weight whose products overflow the working dtype, is refused before any maths;
  no result with a non-finite value is returned, stored or written (merge included).
* A blend whose every module cancels to zero or rounding noise is refused ("the blend is empty").
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import save_base, save_lora, tiny_gpt2, tiny_llama

from adapterkit import compose, inspect, plan_compose
from adapterkit.adapter.model import Adapter
from adapterkit.composition.engine import EMPTY_TOLERANCE_ULPS, check_not_empty, delta_norm
from adapterkit.errors import CompositionError, NonFiniteError, UnsupportedAdapterError
from adapterkit.formats.peft import read_adapter
from adapterkit.merging.stacking import attach
from adapterkit.merging.streamed import merge

STRATEGIES: list[tuple[str, dict[str, Any]]] = [
    ("linear", {}),
    ("svd", {}),
    ("svd", {"rank": 2}),
    ("ties", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.5}),
    ("dare_linear", {"density": 0.5, "seed": 1}),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("exact")
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    return {
        "llama": llama,
        "gpt2": gpt2,
        "base": save_base(llama, root / "base"),
        "a": read_adapter(save_lora(llama, root / "a", seed=1)),
        "b": read_adapter(save_lora(llama, root / "b", seed=2, r=4)),
        # GPT-2 layers have biases: PEFT saves the trained ones beside the factors.
        "plain": read_adapter(save_lora(gpt2, root / "plain", target_modules=["c_attn"], fan_in_fan_out=True)),
        "biased": read_adapter(
            save_lora(gpt2, root / "biased", target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
        ),
        "lora_only": read_adapter(
            save_lora(gpt2, root / "only", seed=3, target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")
        ),
    }


# --- extra trainable tensors --------------------------------------------------------------------------------------


def test_compose_refuses_trained_biases_naming_the_field(world: dict[str, Any]) -> None:
    biased, lora_only, plain = world["biased"], world["lora_only"], world["plain"]
    assert any(key.endswith(".bias") for key in biased.extra_tensors), "PEFT saved no bias: the test would be empty"
    for parents in ([biased, plain], [plain, lora_only], [biased]):
        for function in (compose, plan_compose):
            with pytest.raises(UnsupportedAdapterError, match=r"field 'bias' is '(all|lora_only)'.*cannot weight it"):
                function(parents, [0.5] * len(parents))
    with pytest.raises(UnsupportedAdapterError, match="field 'bias' is 'all'"):
        compose([biased], [1.0])  # even the identity blend: its config would not say what it carries
    tensor = copy.copy(plain)
    tensor.extra_tensors = {"base_model.model.transformer.wte.weight": torch.zeros(2, 2)}
    with pytest.raises(UnsupportedAdapterError, match=r"carries tensor 'base_model.model.transformer.wte.weight'"):
        compose([tensor, plain], [1.0, 1.0])
    assert compose([plain, plain], [0.5, 0.25]).modules  # nothing extra: blended as before


def test_attach_refuses_trained_biases_at_another_weight(world: dict[str, Any]) -> None:
    """A trained bias replaces the base's: weight 1 only; stacked with plain LoRAs, PEFT runs it (test_stacking.py)."""
    gpt2, biased, plain = world["gpt2"], world["biased"], world["plain"]
    for adapters, weights in (([biased], [0.5]), ([biased, plain], [0.5, 1.0])):
        with pytest.raises(UnsupportedAdapterError, match=r"trained bias.*weight 1 only.*got weight 0.5"):
            attach(copy.deepcopy(gpt2), adapters, weights)
    assert attach(copy.deepcopy(gpt2), [biased]) is not None  # alone at weight 1, PEFT runs it as it loads it
    assert attach(copy.deepcopy(gpt2), [biased, plain]) is not None


# --- non-finite values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_is_exact_when_the_quick_sum_overflows(dtype: torch.dtype) -> None:
    """The checks sum first (a twentieth of isfinite().all()); a sum that overflows must not read as a NaN."""
    from adapterkit.adapter.dtypes import all_finite

    big = torch.finfo(dtype).max
    values = torch.full((1000,), big / 2, dtype=dtype)
    assert not bool(values.sum().isfinite())  # the quick sum overflows: the exact check decides
    assert all_finite(values)
    for bad in (float("nan"), float("inf"), float("-inf")):
        poisoned = torch.zeros(1000, dtype=dtype)
        poisoned[517] = bad
        assert not all_finite(poisoned)
        assert not all_finite(torch.cat([values, poisoned]))
    assert all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.arange(5))


def _poisoned(adapter: Adapter, value: float) -> Adapter:
    poisoned = copy.copy(adapter)
    name = sorted(adapter.modules)[1]
    module = adapter.modules[name]
    B = module.B.clone()
    B[0, 0] = value
    poisoned.modules = {**adapter.modules, name: type(module)(module.spec, module.A, B)}
    return poisoned


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_factors_are_refused_naming_the_module(world: dict[str, Any], value: float) -> None:
    poisoned = _poisoned(world["a"], value)
    name = sorted(world["a"].modules)[1]
    for call in (
        lambda: compose([poisoned, world["b"]], [1.0, 1.0], "svd"),
        lambda: plan_compose([poisoned, world["b"]], [1.0, 1.0], "svd"),
        lambda: inspect([poisoned]),
    ):
        with pytest.raises(NonFiniteError, match=f"adapter 1: module '{name}' holds a non-finite value"):
            call()


@pytest.mark.parametrize(("strategy", "params"), STRATEGIES)
def test_weights_that_overflow_the_working_dtype_are_refused(
    world: dict[str, Any], strategy: str, params: dict[str, Any]
) -> None:
    parents = [world["a"], world["b"]]
    for weights, dtype in (([1e308, 1.0], torch.float32), ([1.0, -1e39], torch.float32), ([1e308, 1.0], None)):
        with pytest.raises(NonFiniteError, match=r"overflow float32 \(.*; the largest finite value is 3.4e\+38\)"):
            compose(parents, weights, strategy, dtype=dtype, **params)
    with pytest.raises(NonFiniteError, match="overflow float64"):
        compose(parents, [1e308, 1.0], strategy, dtype=torch.float64, **params)
    with pytest.raises(NonFiniteError, match="overflow float32"):
        plan_compose(parents, [1e308, 1.0], strategy, **params)


def test_a_weight_that_overflows_the_storage_dtype_is_refused(world: dict[str, Any]) -> None:
    """float32 maths that fits can still overflow a float16 result (PEFT multiplies its factors in float16)."""
    for strategy in ("linear", "svd"):
        with pytest.raises(NonFiniteError, match="overflow float16"):
            compose([world["a"]], [1e6], strategy, dtype=torch.float16)
    assert compose([world["a"]], [2.0], "svd", dtype=torch.float16).modules


def test_merge_refuses_overflowing_weights_before_writing(world: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match="overflow float32"):
        merge([world["a"]], [1e39], world["base"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NonFiniteError, match="holds a non-finite value"):
        merge([_poisoned(world["a"], float("nan"))], None, world["base"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_merge_never_writes_a_non_finite_value(world: dict[str, Any], tmp_path: Path) -> None:
    """Within the bound check but beyond float16 once added to the base: the block check stops the merge."""
    half = save_base(tiny_llama().to(torch.float16), tmp_path / "half")
    with pytest.raises(NonFiniteError, match=r"merging into '.*' gives values beyond the range of float16"):
        merge([world["a"]], [1e7], half, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half"]  # no output, no temporary folder
    big = save_base(tiny_llama(), tmp_path / "big")
    from safetensors.torch import load_file, save_file

    tensors = load_file(big / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1e6  # untouched by the adapter...
    save_file(tensors, big / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"converting 'model.norm.weight' to float16 overflows it"):
        merge([world["a"]], None, big, tmp_path / "out", dtype="fp16")  # ...but converted


# --- empty blends ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "params"), [s for s in STRATEGIES if not s[0].startswith("dare")])
def test_an_adapter_minus_itself_is_an_empty_blend(world: dict[str, Any], strategy: str, params: dict[str, Any]):
    """svd of A - A left rank-8 rounding noise on main (1e-7 of the parents' deltas), stored as an adapter."""
    with pytest.raises(CompositionError, match="the blend is empty: every module's delta is zero or rounding noise"):
        compose([world["a"], world["a"]], [1.0, -1.0], strategy, **params)


def test_zero_weights_and_untrained_adapters_are_empty_blends(world: dict[str, Any]) -> None:
    for strategy, params in STRATEGIES:
        with pytest.raises(CompositionError, match="the blend is empty"):
            compose([world["a"], world["b"]], [0.0, 0.0], strategy, **params)
    untrained = copy.copy(world["a"])
    untrained.modules = {
        name: type(m)(m.spec, m.A, torch.zeros_like(m.B)) for name, m in world["a"].modules.items()
    }  # PEFT's default init: B = 0
    for weights in ([1.0], [0.5]):
        for function in (compose, plan_compose):
            with pytest.raises(CompositionError, match="the blend is empty"):
                function([untrained], weights)


def test_a_real_difference_between_close_adapters_is_not_empty(world: dict[str, Any]) -> None:
    """Two adapters a thousandth apart: their difference is far above rounding, so it is kept."""
    close = copy.copy(world["a"])
    close.modules = {name: type(m)(m.spec, m.A, m.B * (1 + 1e-3)) for name, m in world["a"].modules.items()}
    blended = compose([world["a"], close], [1.0, -1.0], "svd")
    for name, module in blended.modules.items():
        expected = -1e-3 * world["a"].delta(name, torch.float64)
        assert float((module.delta(torch.float64) - expected).norm() / expected.norm()) < 1e-2


def test_the_threshold_is_relative_to_the_parents_and_the_working_dtype() -> None:
    eps = torch.finfo(torch.float32).eps
    check_not_empty({"m": 2.0 * EMPTY_TOLERANCE_ULPS * eps}, {"m": 1.0}, torch.float32, "x")  # above: kept
    with pytest.raises(CompositionError, match=r"threshold is 7.6e-06"):
        check_not_empty({"m": 0.5 * EMPTY_TOLERANCE_ULPS * eps}, {"m": 1.0}, torch.float32, "x")
    check_not_empty({"m": 1e-12, "n": 0.0}, {"m": 1.0, "n": 0.0}, torch.float64, "x")  # 1e-12 is not float64 noise
    with pytest.raises(CompositionError):
        check_not_empty({"m": 0.0}, {"m": 0.0}, torch.float64, "x")
    A, B = torch.randn(4, 16, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    assert delta_norm(A, B) == pytest.approx(float((B @ A).norm()), rel=1e-12)
    stacked = delta_norm(torch.cat([A, -A]), torch.cat([B, B], dim=1))  # B A - B A from stacked factors
    assert stacked < 1e-13 * delta_norm(A, B)


def test_no_warning_or_error_for_an_ordinary_blend(world: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for strategy, params in STRATEGIES:
            assert compose([world["a"], world["b"]], [0.7, -0.3], strategy, **params).modules
