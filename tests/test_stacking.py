"""attach(): several adapters live on one model through PEFT, weighted, giving the merged model's logits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    assert_one_line,
    load_peft,
    logits,
    max_abs_diff,
    save_base,
    save_lora,
    tiny_gpt2,
    tiny_llama,
)

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


# --- what else an adapter carries: PEFT runs it, adapterkit refuses what PEFT cannot stack ----------------------


def by_hand(base: Any, folders: list[Path], active: list[str], load: list[int] | None = None) -> Any:
    """The reference: PEFT itself, the folders loaded as ``active[i]`` (in ``load`` order) and set active together."""
    from peft import PeftModel

    load = list(range(len(folders))) if load is None else load
    first, *rest = load
    model = PeftModel.from_pretrained(copy.deepcopy(base), folders[first], adapter_name=active[first])
    for index in rest:
        model.load_adapter(folders[index], adapter_name=active[index])
    model.base_model.set_adapter(active)
    return model.eval()


def scaled(folder: Path, weight: float, dest: Path) -> Path:
    """A copy of a PEFT folder whose lora_B (weight and bias) is multiplied by ``weight``: that adapter at ``weight``,
    made without touching PEFT's scaling, so it checks attach's weighting independently."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    tensors = load_file(folder / "adapter_model.safetensors")
    for key in tensors:
        if ".lora_B." in key or key.endswith(".lora_embedding_B"):
            tensors[key] = tensors[key] * weight
    save_file(tensors, dest / "adapter_model.safetensors")
    return dest


def apart(model: Any, base: Any) -> float:
    """How far an adapter moves the logits: a test where it does not would prove nothing."""
    return max_abs_diff(logits(model), logits(base))


@pytest.fixture(scope="module")
def extras(setup: tuple[Any, Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapters with each kind of extra tensor (all perturbed by make_lora, so dropping one shows)."""
    model, _, _ = setup
    root = tmp_path_factory.mktemp("extras")
    specs: dict[str, dict[str, Any]] = {
        "dora": dict(seed=4, use_dora=True, target_modules=["q_proj", "o_proj"]),
        "dora2": dict(seed=5, use_dora=True, target_modules=["q_proj", "k_proj"]),
        "lora_bias": dict(seed=6, lora_bias=True, target_modules=["q_proj", "down_proj"]),
        "head": dict(seed=7, modules_to_save=["lm_head"]),
        "head2": dict(seed=8, modules_to_save=["lm_head"]),
        "norm": dict(seed=9, modules_to_save=["model.norm"]),
        "lora_on_head": dict(seed=10, target_modules=["q_proj", "lm_head"]),
        "tokens": dict(seed=11, trainable_token_indices={"embed_tokens": [1, 2, 3]}),
        "tokens2": dict(seed=12, trainable_token_indices={"embed_tokens": [5, 6]}),
        "lora_on_embedding": dict(seed=13, target_modules=["embed_tokens", "q_proj"]),
    }
    return {name: save_lora(model, root / name, **spec) for name, spec in specs.items()}


def test_dora_stacks_at_weight_1_in_the_order_given(
    setup: tuple[Any, Path, list[Path]], extras: dict[str, Path], tmp_path: Path
) -> None:
    """A DoRA layer rescales the running result, so the order counts: attach keeps it, and weights the others."""
    model, _, loras = setup
    dora, dora2 = extras["dora"], extras["dora2"]
    alone = attach(copy.deepcopy(model), [read_adapter(dora)])
    assert max_abs_diff(logits(alone), logits(load_peft(model, dora))) <= 1e-6
    plain = scaled(loras[0], 0.5, tmp_path / "half")
    first = logits(attach(copy.deepcopy(model), [read_adapter(loras[0]), read_adapter(dora)], [0.5, 1.0]))
    assert max_abs_diff(first, logits(by_hand(model, [plain, dora], ["a", "b"]))) <= 1e-5
    last = logits(attach(copy.deepcopy(model), [read_adapter(dora), read_adapter(loras[0])], [1.0, 0.5]))
    assert max_abs_diff(last, logits(by_hand(model, [dora, plain], ["a", "b"]))) <= 1e-5
    assert max_abs_diff(first, last) > 1e-3  # the order matters, and each matches PEFT's in that order
    both = attach(copy.deepcopy(model), [read_adapter(dora), read_adapter(dora2)])
    reference = by_hand(model, [dora, dora2], ["a", "b"])
    assert max_abs_diff(logits(both), logits(reference)) <= 1e-5
    assert max_abs_diff(logits(reference), logits(reference.merge_and_unload())) <= 1e-5  # PEFT's merge agrees


def test_dora_stack_gives_the_merged_models_logits(
    setup: tuple[Any, Path, list[Path]], extras: dict[str, Path], tmp_path: Path
) -> None:
    """merge applies a DoRA module as PEFT's forward does (norms on the base plus its own change), in order."""
    model, base, loras = setup
    adapters = [read_adapter(extras["dora"]), read_adapter(loras[0]), read_adapter(extras["dora2"])]
    weights = [1.0, -0.5, 1.0]
    stacked = attach(copy.deepcopy(model), adapters, weights)
    assert max_abs_diff(logits(stacked), merged_logits(adapters, weights, base, tmp_path / "out")) <= 1e-5


def test_dora_is_not_weighted(setup: tuple[Any, Path, list[Path]], extras: dict[str, Path]) -> None:
    model, _, loras = setup
    dora = read_adapter(extras["dora"])
    for adapters, weights in (([dora], [0.5]), ([read_adapter(loras[0]), dora], [1.0, 2.0])):
        with pytest.raises(
            UnsupportedAdapterError,
            match=r"'use_dora'\): it attaches at weight 1 only, since .* norm outright.*; got weight",
        ) as info:
            attach(copy.deepcopy(model), adapters, weights)
        assert_one_line(str(info.value))


def test_lora_bias_is_weighted_with_its_factors(
    setup: tuple[Any, Path, list[Path]], extras: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT adds lora_B(lora_A(x)) * scaling, bias included: scaling by w gives w * s * (B A x + b)."""
    model, _, loras = setup
    folder = extras["lora_bias"]
    adapter = read_adapter(folder)
    one = attach(copy.deepcopy(model), [adapter], [-0.7])
    expected = load_peft(model, scaled(folder, -0.7, tmp_path / "scaled"))
    assert apart(expected, model) > 1e-3
    assert max_abs_diff(logits(one), logits(expected)) <= 1e-5
    layer = one.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    bias = adapter.extra_tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.bias"]
    module = adapter.modules["model.layers.0.mlp.down_proj"]
    wanted = -0.7 * module.scaling * (x @ module.A.T @ module.B.T + bias)
    with torch.no_grad():
        assert max_abs_diff(layer(x) - layer.base_layer(x), wanted) <= 1e-5
    stacked = attach(copy.deepcopy(model), [adapter, read_adapter(loras[1])], [0.3, -0.5])
    reference = by_hand(
        model, [scaled(folder, 0.3, tmp_path / "b3"), scaled(loras[1], -0.5, tmp_path / "l5")], ["a", "b"]
    )
    assert max_abs_diff(logits(stacked), logits(reference)) <= 1e-5


def test_modules_to_save_stack_one_copy_per_module(
    setup: tuple[Any, Path, list[Path]], extras: dict[str, Path], tmp_path: Path
) -> None:
    model, _, loras = setup
    head, norm = extras["head"], extras["norm"]
    assert max_abs_diff(logits(attach(copy.deepcopy(model), [read_adapter(head)])), logits(load_peft(model, head))) == 0
    plain = scaled(loras[0], 0.5, tmp_path / "half")
    for order in ([0, 1], [1, 0]):
        folders = [[head, plain][i] for i in order]
        adapters = [[read_adapter(head), read_adapter(loras[0])][i] for i in order]
        weights = [[1.0, 0.5][i] for i in order]
        stacked = attach(copy.deepcopy(model), adapters, weights)
        assert max_abs_diff(logits(stacked), logits(by_hand(model, folders, ["a", "b"]))) <= 1e-5
    both = attach(copy.deepcopy(model), [read_adapter(head), read_adapter(norm)])
    reference = by_hand(model, [head, norm], ["a", "b"])
    assert apart(reference, load_peft(model, head)) > 1e-3  # the second copy is in use too
    assert max_abs_diff(logits(both), logits(reference)) <= 1e-5


def test_modules_to_save_refusals(setup: tuple[Any, Path, list[Path]], extras: dict[str, Path]) -> None:
    model, _, _ = setup
    head = read_adapter(extras["head"])
    cases = [
        (
            [head],
            [0.5],
            r"adapter 1 carries a modules_to_save copy of 'lm_head': it attaches at weight 1 only, since it replaces",
        ),
        (
            [head, read_adapter(extras["head2"])],
            [1.0, 1.0],
            "PEFT runs one modules_to_save copy of a module at a time",
        ),
        (
            [read_adapter(extras["lora_on_head"]), head],
            [1.0, 1.0],
            r"adapter 1 puts a LoRA on 'lm_head', which adapter 2 replaces .* PEFT cannot wrap one module for both",
        ),
    ]
    for adapters, weights, message in cases:
        with pytest.raises(UnsupportedAdapterError, match=message) as info:
            attach(copy.deepcopy(model), adapters, weights)
        assert_one_line(str(info.value))


def test_trainable_tokens_stack_with_plain_loras(
    setup: tuple[Any, Path, list[Path]], extras: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT 0.21 cannot load an adapter after one with trainable tokens; attach loads that one last."""
    from peft import PeftModel

    model, _, loras = setup
    tokens = extras["tokens"]
    alone = attach(copy.deepcopy(model), [read_adapter(tokens)])
    assert max_abs_diff(logits(alone), logits(load_peft(model, tokens))) == 0
    with pytest.raises(KeyError):  # the PEFT quirk worked around
        PeftModel.from_pretrained(copy.deepcopy(model), tokens, adapter_name="t").load_adapter(loras[0], "l")
    stacked = attach(copy.deepcopy(model), [read_adapter(tokens), read_adapter(loras[0])], [1.0, -0.5])
    assert stacked.base_model.active_adapters == ["adapter_0", "adapter_1"]
    reference = by_hand(model, [tokens, scaled(loras[0], -0.5, tmp_path / "l")], ["t", "l"], load=[1, 0])
    assert max_abs_diff(logits(stacked), logits(reference)) <= 1e-5
    with pytest.raises(UnsupportedAdapterError, match="PEFT cannot load another adapter after them"):
        attach(alone, [read_adapter(loras[0])])


def test_trainable_tokens_refusals(setup: tuple[Any, Path, list[Path]], extras: dict[str, Path]) -> None:
    model, _, _ = setup
    tokens = read_adapter(extras["tokens"])
    cases = [
        ([tokens], [2.0], r"trainable tokens of 'model.embed_tokens': it attaches at weight 1 only, .*; got weight 2$"),
        ([tokens, read_adapter(extras["tokens2"])], [1.0, 1.0], "one adapter's trainable tokens at a time"),
        (
            [read_adapter(extras["lora_on_embedding"]), tokens],
            [1.0, 1.0],
            "adapter 1 puts a LoRA on 'model.embed_tokens', which adapter 2 replaces with trainable tokens",
        ),
    ]
    for adapters, weights, message in cases:
        with pytest.raises(UnsupportedAdapterError, match=message):
            attach(copy.deepcopy(model), adapters, weights)


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path]]:
    """A Llama with attention biases, an adapter training them all (bias="all") and plain or lora_only ones."""
    from helpers import make_lora

    model = tiny_llama(attention_bias=True)
    root = tmp_path_factory.mktemp("biased")
    folders = {}
    for name, spec in {
        "all": dict(seed=1, bias="all"),
        "plain": dict(seed=2, target_modules=["k_proj", "o_proj"]),
        "lora_only": dict(seed=3, bias="lora_only", target_modules=["k_proj"]),
    }.items():
        peft_model = make_lora(model, **spec)
        with torch.no_grad():
            for key, param in peft_model.named_parameters():
                if key.endswith(".bias") and "lora_" not in key:
                    param.add_(torch.randn_like(param) * 0.1)
        peft_model.save_pretrained(root / name)
        folders[name] = root / name
    return model, folders


def test_trained_biases_stack_with_plain_loras(biased: tuple[Any, dict[str, Path]], tmp_path: Path) -> None:
    """PEFT drops a trained bias of a module another adapter already wraps; attach loads the biased adapter first."""
    model, folders = biased
    trained, plain = folders["all"], folders["plain"]
    alone = attach(copy.deepcopy(model), [read_adapter(trained)])
    assert max_abs_diff(logits(alone), logits(load_peft(model, trained))) == 0
    stacked = attach(copy.deepcopy(model), [read_adapter(plain), read_adapter(trained)], [0.5, 1.0])
    half = scaled(plain, 0.5, tmp_path / "half")
    reference = by_hand(model, [half, trained], ["p", "t"], load=[1, 0])
    assert max_abs_diff(logits(stacked), logits(reference)) <= 1e-5
    from peft import PeftModel

    # PEFT's own merge as a second opinion: the plain LoRA merged into the base, the biased adapter loaded on it.
    merged = PeftModel.from_pretrained(load_peft(model, half).merge_and_unload(), trained).eval()
    assert max_abs_diff(logits(stacked), logits(merged)) <= 1e-5
    assert apart(by_hand(model, [half, trained], ["p", "t"]), merged) > 1e-3  # loaded the other way: biases lost


def test_trained_bias_refusals(biased: tuple[Any, dict[str, Path]]) -> None:
    model, folders = biased
    trained = read_adapter(folders["all"])
    with pytest.raises(
        UnsupportedAdapterError, match=r"adapter 1 carries a trained bias of '.*': it attaches at weight 1 only"
    ):
        attach(copy.deepcopy(model), [trained], [0.5])
    with pytest.raises(UnsupportedAdapterError, match="adapters 1 and 2 both set field 'bias': PEFT loads"):
        attach(copy.deepcopy(model), [trained, read_adapter(folders["lora_only"])])
    wrapped = attach(copy.deepcopy(model), [read_adapter(folders["plain"])])
    with pytest.raises(UnsupportedAdapterError, match=r"trains the bias of '.*k_proj', which another adapter"):
        attach(wrapped, [trained])


def test_other_delta_changing_fields_still_run_alone_only(setup: tuple[Any, Path, list[Path]]) -> None:
    model, _, loras = setup
    adapter = read_adapter(loras[0])
    pissa = Adapter(config={**adapter.config, "init_lora_weights": "pissa"}, modules=adapter.modules)
    with pytest.raises(UnsupportedAdapterError, match="'init_lora_weights': its change is not scaling"):
        attach(copy.deepcopy(model), [pissa], [0.5])
