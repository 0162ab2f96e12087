"""attach(): several adapters live on one model through PEFT, weighted, giving the merged model's logits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_peft, logits, max_abs_diff, save_base, save_lora, tiny_gpt2, tiny_llama

from adapterkit.adapter.model import Adapter
from adapterkit.errors import CompositionError, InvalidInputError, UnsupportedAdapterError
from adapterkit.formats.peft import read_adapter
from adapterkit.merging.stacking import attach
from adapterkit.merging.streamed import merge


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[Path]]:
    root = tmp_path_factory.mktemp("stacking")
    model = tiny_llama()
    save_base(model, root / "base", max_shard_size="20KB")
    loras = [
        save_lora(model, root / "a", seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        save_lora(
            model, root / "b", seed=2, r=4, lora_alpha=7, use_rslora=True, target_modules=["q_proj", "down_proj"]
        ),
        save_lora(model, root / "c", seed=3, r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"]),
    ]
    return model, root / "base", loras


def merged_logits(adapters: list[Adapter], weights: list[float] | None, base: Path, out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    merge(adapters, weights, base, out)
    return logits(AutoModelForCausalLM.from_pretrained(out).eval())


def test_attach_gives_the_merged_models_logits(setup: tuple[Any, Path, list[Path]], tmp_path: Path) -> None:
    model, base, loras = setup
    adapters = [read_adapter(path) for path in loras]
    weights = [0.7, -0.3, 1.5]
    stacked = attach(copy.deepcopy(model), adapters, weights)
    assert stacked.base_model.active_adapters == ["adapter_0", "adapter_1", "adapter_2"]
    assert max_abs_diff(logits(stacked), merged_logits(adapters, weights, base, tmp_path / "out")) <= 1e-5


def test_one_adapter_equals_peft_loading_it(setup: tuple[Any, Path, list[Path]]) -> None:
    model, _, loras = setup
    stacked = attach(copy.deepcopy(model), [read_adapter(loras[1])])
    assert max_abs_diff(logits(stacked), logits(load_peft(model, loras[1]))) <= 1e-6


def test_each_layer_scales_by_weight_times_peft_scaling(setup: tuple[Any, Path, list[Path]]) -> None:
    from peft.tuners.lora import LoraLayer

    model, _, loras = setup
    adapters = [read_adapter(path) for path in loras[:2]]
    stacked = attach(copy.deepcopy(model), adapters, [0.5, -2.0])
    seen = 0
    for name, module in stacked.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            for key, adapter, weight in (("adapter_0", adapters[0], 0.5), ("adapter_1", adapters[1], -2.0)):
                if name in adapter.modules:
                    assert module.scaling[key] == pytest.approx(weight * adapter.modules[name].scaling)
                    seen += 1
    assert seen == sum(len(a.modules) for a in adapters)
    zero = attach(copy.deepcopy(model), adapters[:1], [0.0])
    assert max_abs_diff(logits(zero), logits(model)) == 0


def test_fan_in_fan_out_layers_stack(tmp_path: Path) -> None:
    model = tiny_gpt2()
    save_base(model, tmp_path / "base", max_shard_size="20KB")
    spec = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    adapters = [read_adapter(save_lora(model, tmp_path / f"l{i}", seed=i, **spec)) for i in (1, 2)]
    stacked = attach(copy.deepcopy(model), adapters, [0.5, 0.25], adapter_names=["first", "second"])
    expected = merged_logits(adapters, [0.5, 0.25], tmp_path / "base", tmp_path / "out")
    assert max_abs_diff(logits(stacked), expected) <= 1e-5


def test_adapters_are_frozen_and_can_be_switched_off(setup: tuple[Any, Path, list[Path]]) -> None:
    model, _, loras = setup
    stacked = attach(copy.deepcopy(model), [read_adapter(p) for p in loras[:2]], [0.5, 0.5])
    assert not any(p.requires_grad for p in stacked.parameters())
    with stacked.disable_adapter():
        assert max_abs_diff(logits(stacked), logits(model)) == 0


def test_attach_adds_to_an_existing_peft_model(setup: tuple[Any, Path, list[Path]], tmp_path: Path) -> None:
    model, base, loras = setup
    first = attach(copy.deepcopy(model), [read_adapter(loras[0])], adapter_names=["one"])
    both = attach(first, [read_adapter(loras[1])], [-0.5])
    assert both is first
    assert both.base_model.active_adapters == ["adapter_0"]  # the new one is active, "one" stays loaded
    assert set(both.peft_config) == {"one", "adapter_0"}
    both.base_model.set_adapter(["one", "adapter_0"])
    expected = merged_logits([read_adapter(loras[0]), read_adapter(loras[1])], [1.0, -0.5], base, tmp_path / "out")
    assert max_abs_diff(logits(both), expected) <= 1e-5


def test_bad_requests_are_refused(setup: tuple[Any, Path, list[Path]]) -> None:
    model, _, loras = setup
    adapter = read_adapter(loras[0])
    with pytest.raises(CompositionError, match="at least one"):
        attach(copy.deepcopy(model), [])
    with pytest.raises(CompositionError, match="2 weights for 1"):
        attach(copy.deepcopy(model), [adapter], [1.0, 2.0])
    with pytest.raises(CompositionError, match="finite"):
        attach(copy.deepcopy(model), [adapter], [float("inf")])
    with pytest.raises(InvalidInputError, match="2 adapter names for 1"):
        attach(copy.deepcopy(model), [adapter], adapter_names=["a", "b"])
    with pytest.raises(InvalidInputError, match="letters, digits"):
        attach(copy.deepcopy(model), [adapter], adapter_names=["a.b"])
    with pytest.raises(InvalidInputError, match="distinct"):
        attach(copy.deepcopy(model), [adapter, adapter], adapter_names=["a", "a"])
    existing = attach(copy.deepcopy(model), [adapter], adapter_names=["taken"])
    with pytest.raises(InvalidInputError, match="already has an adapter named 'taken'"):
        attach(existing, [adapter], adapter_names=["taken"])


def test_dora_runs_alone_but_is_not_weighted(setup: tuple[Any, Path, list[Path]], tmp_path: Path) -> None:
    model, _, loras = setup
    folder = save_lora(model, tmp_path / "dora", use_dora=True)
    dora = read_adapter(folder)
    alone = attach(copy.deepcopy(model), [dora])
    assert max_abs_diff(logits(alone), logits(load_peft(model, folder))) <= 1e-6
    with pytest.raises(UnsupportedAdapterError, match="'use_dora'"):
        attach(copy.deepcopy(model), [dora], [0.5])
    with pytest.raises(UnsupportedAdapterError, match="'use_dora'"):
        attach(copy.deepcopy(model), [read_adapter(loras[0]), dora])
