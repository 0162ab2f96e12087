"""The in-memory adapter against PEFT: same rank, alpha and scaling per module, same weight change.

PEFT decides each module's numbers when it builds the LoRA layers; adapterkit recomputes them from
the saved config and the factor shapes. If the two ever disagree, a composition or a merge silently
changes the model, so every check here compares with what PEFT put on its own layers.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import (
    LLAMA_LORA_CASES,
    assert_one_line,
    lora_layers,
    make_lora,
    max_abs_diff,
    tiny_conv_net,
    tiny_gpt2,
    tiny_llama,
)

from adapterkit.adapter.config import (
    DELTA_CHANGING_FIELDS,
    ModuleSpec,
    carried_features,
    delta_blockers,
    describe_modules,
    parse_key,
    resolve_rank_alpha,
    scaling_for,
    validate_lora_config,
)
from adapterkit.adapter.model import Adapter
from adapterkit.errors import AdapterFormatError, UnsupportedAdapterError
from adapterkit.formats.peft import read_adapter

DELTA_TOLERANCE = 1e-6
#: Cases whose weight change is not scaling * B @ A: their deltas are refused (tested below), not compared.
_NON_PLAIN = {"dora", "lora-bias"}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _adapter_and_layers(base, tmp_path, **lora_kwargs):
    """PEFT's model, and adapterkit's reading of what that model saved."""
    peft_model = make_lora(base, **lora_kwargs)
    peft_model.save_pretrained(tmp_path / "adapter")
    return read_adapter(tmp_path / "adapter"), lora_layers(peft_model)


def _assert_matches_peft(adapter: Adapter, layers: dict, *, check_delta: bool = True) -> None:
    assert layers, "PEFT made no LoRA layers: the test setup is wrong"
    assert set(adapter.modules) == set(layers), "adapterkit and PEFT disagree on which modules carry LoRA"
    for name, layer in layers.items():
        spec = adapter.modules[name].spec
        assert spec.r == layer.r["default"], name
        assert spec.alpha == layer.lora_alpha["default"], name
        assert spec.scaling == layer.scaling["default"], name  # same formula, so bit-identical
        if check_delta:
            expected = layer.get_delta_weight("default").detach()
            actual = adapter.delta(name)
            assert actual.shape == layer.get_base_layer().weight.shape, name
            assert tuple(actual.shape) == spec.base_shape, name
            assert max_abs_diff(actual, expected) <= DELTA_TOLERANCE, name
            assert expected.abs().max() > 0, f"{name}: PEFT's delta is zero, so the comparison proves nothing"


@pytest.mark.parametrize("case", sorted(LLAMA_LORA_CASES))
def test_llama_resolution_and_delta_match_peft(case, llama, tmp_path):
    """r, alpha, scaling (rank_pattern/alpha_pattern/rsLoRA included) and every delta equal PEFT's."""
    adapter, layers = _adapter_and_layers(llama, tmp_path, **LLAMA_LORA_CASES[case])
    _assert_matches_peft(adapter, layers, check_delta=case not in _NON_PLAIN)


def test_patterns_resolve_to_several_ranks(llama, tmp_path):
    """Guards the pattern cases themselves: they must really give modules different ranks and alphas."""
    adapter, _ = _adapter_and_layers(llama, tmp_path, **LLAMA_LORA_CASES["patterns-list-target"])
    ranks = {name: m.spec.r for name, m in adapter.modules.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4  # first matching key wins over a later, longer one
    assert ranks["model.layers.1.self_attn.v_proj"] == 12
    assert ranks["model.layers.0.self_attn.v_proj"] == 2
    assert ranks["model.layers.0.mlp.down_proj"] == 6
    assert ranks["model.layers.0.self_attn.k_proj"] == 8  # no key: the config's r
    assert adapter.modules["model.layers.0.self_attn.k_proj"].spec.alpha == 40
    assert adapter.modules["model.layers.1.self_attn.k_proj"].spec.alpha == 16


def test_gpt2_fan_in_fan_out_delta_matches_peft(tmp_path):
    """GPT-2's Conv1D stores its weight as (in, out): the delta must come out transposed, like PEFT's."""
    adapter, layers = _adapter_and_layers(
        tiny_gpt2(), tmp_path, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    _assert_matches_peft(adapter, layers)
    spec = adapter.modules["transformer.h.0.attn.c_attn"].spec
    assert spec.fan_in_fan_out and spec.base_shape == (32, 96)


def test_embedding_delta_matches_peft(llama, tmp_path):
    adapter, layers = _adapter_and_layers(llama, tmp_path, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    _assert_matches_peft(adapter, layers)
    spec = adapter.modules["model.embed_tokens"].spec
    assert spec.kind == "embedding" and spec.base_shape == (128, 32)


def test_conv_deltas_match_peft_on_a_custom_model(tmp_path):
    """Conv2d 3x3, Conv2d 1x1 (PEFT's special case), Conv1d and Linear on a plain nn.Module."""
    adapter, layers = _adapter_and_layers(
        tiny_conv_net(),
        tmp_path,
        r=4,
        lora_alpha=6,
        target_modules=["conv", "pointwise", "temporal", "head"],
        rank_pattern={"pointwise": 2},
    )
    _assert_matches_peft(adapter, layers)
    kinds = {name: (m.spec.kind, m.spec.kernel) for name, m in adapter.modules.items()}
    assert kinds == {
        "conv": ("conv2d", (3, 3)),
        "pointwise": ("conv2d", (1, 1)),
        "temporal": ("conv1d", (3,)),
        "head": ("linear", ()),
    }


def test_delta_in_another_dtype(llama, tmp_path):
    adapter, layers = _adapter_and_layers(llama, tmp_path)
    name = next(iter(layers))
    wide = adapter.delta(name, torch.float64)
    assert wide.dtype == torch.float64
    assert max_abs_diff(wide, adapter.delta(name)) <= 1e-6


def test_unknown_module_is_a_key_error(llama, tmp_path):
    adapter, _ = _adapter_and_layers(llama, tmp_path)
    with pytest.raises(KeyError, match="no LoRA module"):
        adapter.delta("model.layers.9.self_attn.q_proj")


# --- what the delta cannot be ----------------------------------------------------------------------------------


def test_dora_delta_is_refused_naming_use_dora(llama, tmp_path):
    """DoRA rescales W + s*B@A column by column, so s*B@A is not its weight change: refuse, don't guess."""
    adapter, layers = _adapter_and_layers(llama, tmp_path, **LLAMA_LORA_CASES["dora"])
    assert adapter.modules  # it loads, factors and all
    magnitudes = [key for key in adapter.extra_tensors if key.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == len(layers)
    assert "use_dora" in adapter.carried
    for name in layers:
        with pytest.raises(UnsupportedAdapterError, match="use_dora") as info:
            adapter.delta(name)
        assert_one_line(str(info.value))


def test_lora_bias_delta_is_refused(llama, tmp_path):
    adapter, layers = _adapter_and_layers(llama, tmp_path, **LLAMA_LORA_CASES["lora-bias"])
    assert any(key.endswith("lora_B.bias") for key in adapter.extra_tensors)
    with pytest.raises(UnsupportedAdapterError, match="lora_bias"):
        adapter.delta(next(iter(layers)))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_init_delta_is_refused(init, llama, tmp_path):
    """PEFT re-runs a PiSSA/OLoRA init when it loads the adapter, rewriting the base weights, so the change
    to the original base is not s*B@A. The adapter still loads (and round-trips), but its delta is refused."""
    adapter, layers = _adapter_and_layers(llama, tmp_path, r=4, lora_alpha=8, init_lora_weights=init)
    assert adapter.config["init_lora_weights"] == init
    assert "init_lora_weights" in adapter.carried
    with pytest.raises(UnsupportedAdapterError, match="init_lora_weights"):
        adapter.delta(next(iter(layers)))


@pytest.mark.parametrize(
    ("config", "blockers"),
    [
        ({"init_lora_weights": True}, []),
        ({"init_lora_weights": False}, []),
        ({"init_lora_weights": "gaussian"}, []),
        ({"init_lora_weights": "eva"}, []),
        ({"init_lora_weights": "orthogonal"}, []),
        ({"init_lora_weights": "pissa_niter_4"}, ["init_lora_weights"]),
        ({"init_lora_weights": "corda"}, ["init_lora_weights"]),
        ({"init_lora_weights": "loftq"}, ["init_lora_weights"]),
        ({"init_lora_weights": "lora_ga"}, ["init_lora_weights"]),
        ({"use_dora": False, "lora_bias": False, "use_qalora": False}, []),
        ({"use_dora": True, "use_qalora": True}, ["use_dora", "use_qalora"]),
    ],
)
def test_delta_blockers(config, blockers):
    assert delta_blockers(config) == blockers
    assert set(blockers) <= set(carried_features(config))


def test_every_delta_changing_field_blocks(tmp_path):
    tensors = {
        "base_model.model.lin.lora_A.weight": torch.ones(2, 3),
        "base_model.model.lin.lora_B.weight": torch.ones(4, 2),
    }
    for field in DELTA_CHANGING_FIELDS:
        adapter = Adapter.from_state_dict({"peft_type": "LORA", "r": 2, field: True}, tensors)
        with pytest.raises(UnsupportedAdapterError, match=field):
            adapter.delta("lin")
    plain = Adapter.from_state_dict({"peft_type": "LORA", "r": 2, "lora_alpha": 4}, tensors)
    assert torch.equal(plain.delta("lin"), torch.full((4, 3), 4.0))  # 2 * (ones(4,2) @ ones(2,3)) = 2 * 2


def test_refused_delta_names_the_adapter_by_its_store_digest():
    """A stored adapter is named by its digest (as merge and inspect name it); one from a folder has none to give."""
    tensors = {
        "base_model.model.lin.lora_A.weight": torch.ones(2, 3),
        "base_model.model.lin.lora_B.weight": torch.ones(4, 2),
    }
    adapter = Adapter.from_state_dict({"peft_type": "LORA", "r": 2, "use_dora": True}, tensors)
    with pytest.raises(UnsupportedAdapterError, match=r"^the weight change of this adapter is not scaling \* B @ A"):
        adapter.delta("lin")
    adapter.digest = "sha256:" + "0123456789ab" * 5 + "cdef"
    with pytest.raises(UnsupportedAdapterError) as info:
        adapter.delta("lin")
    assert str(info.value) == (
        "the weight change of adapter sha256:0123456789ab is not scaling * B @ A (field 'use_dora' is True); "
        "a DoRA module's change depends on the base weight's norms (m * (W + sBA) / norm(W + sBA) - W), so it is "
        "not a low-rank delta that can be blended; to compose it, merge it into the base (adapterkit merge) and "
        "extract a plain LoRA from the result (adapterkit extract --base BASE --tuned MERGED)"
    )


@pytest.mark.parametrize(
    ("field", "ending"),
    [
        ("lora_bias", "it can be stored, exported, attached and merged, but not composed"),
        ("use_qalora", "it can be stored and exported, but not composed or merged"),
    ],
)
def test_refused_delta_says_what_else_the_adapter_can_do(field, ending):
    """merge applies lora_bias (and DoRA) now: the refusal must not send the user away from it."""
    tensors = {
        "base_model.model.lin.lora_A.weight": torch.ones(2, 3),
        "base_model.model.lin.lora_B.weight": torch.ones(4, 2),
    }
    adapter = Adapter.from_state_dict({"peft_type": "LORA", "r": 2, field: True}, tensors)
    with pytest.raises(UnsupportedAdapterError) as info:
        adapter.delta("lin")
    assert str(info.value).endswith(ending)
    assert_one_line(str(info.value))


# --- rank/alpha resolution against PEFT's own function ---------------------------------------------------------

_MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.10.self_attn.v_proj",
    "model.layers.0.mlp.down_proj",
    "transformer.h.0.attn.c_attn",
    "q_proj",
    "encoder.block.3.layer.0.SelfAttention.q",
    "model.layers.0.self_attn.qq_proj",
]
_PATTERNS = [
    {},
    {"q_proj": 4},
    {"proj": 4},
    {".*proj": 3, "q_proj": 5},
    {r"layers\.1\..*": 2, r"model\.layers\.1\.self_attn\.q_proj": 9},
    {r"model\.layers\.1\.self_attn\.q_proj": 9, r"layers\.1\..*": 2},
    {r"layers\.\d\.self_attn\.(q|v)_proj": 6},
    {"q": 7, "c_attn": 1},
    {r"^model\.layers\.0\..*": 11},
]


@pytest.mark.parametrize("pattern", _PATTERNS, ids=[str(i) for i in range(len(_PATTERNS))])
def test_resolve_rank_alpha_mirrors_peft_get_pattern_key(pattern):
    from peft.utils.other import get_pattern_key

    config = {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": pattern,
        "alpha_pattern": {k: v * 10 for k, v in pattern.items()},
    }
    for module in _MODULES:
        key = get_pattern_key(pattern.keys(), module)  # what LoraModel._create_and_replace does
        expected = (pattern.get(key, 8), {k: v * 10 for k, v in pattern.items()}.get(key, 16))
        assert resolve_rank_alpha(config, module) == expected, (pattern, module)


def test_scaling_formula():
    assert scaling_for(16, 32, False) == 2.0
    assert scaling_for(16, 32, True) == 8.0
    assert scaling_for(8, 16, True) == 16 / math.sqrt(8)


# --- config checks: each refusal names its field, on one line -------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"r": 0}, "'r'"),
        ({"r": "8"}, "'r'"),
        ({"r": True}, "'r'"),
        ({"r": None}, "'r'"),
        ({"lora_alpha": "16"}, "'lora_alpha'"),
        ({"lora_alpha": float("inf")}, "'lora_alpha'"),
        ({"use_rslora": "yes"}, "'use_rslora'"),
        ({"rank_pattern": ["q_proj"]}, "'rank_pattern'"),
        ({"rank_pattern": {"q_proj": 0}}, "'rank_pattern'"),
        ({"rank_pattern": {"q_proj": [True, False]}}, "'rank_pattern'"),
        ({"rank_pattern": {"q_proj": 2.5}}, "'rank_pattern'"),
        ({"alpha_pattern": {"q_proj": "x"}}, "'alpha_pattern'"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, "'alpha_pattern'"),
        ({"rank_pattern": {"q_proj(": 4}}, "'rank_pattern'"),
        ({"rank_pattern": {"line\nbreak(": 4}}, "'rank_pattern'"),
        ({"fan_in_fan_out": "yes"}, "'fan_in_fan_out'"),
        ({"peft_type": None}, "'peft_type'"),
        ({"peft_type": "NOT_A_TYPE"}, "'peft_type'"),
        ({"peft_type": {"deep": ["x" * 500]}}, "'peft_type'"),
    ],
)
def test_invalid_config_fields_are_named(patch, field):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    config.update(patch)
    with pytest.raises(AdapterFormatError) as info:
        validate_lora_config(config, "some/adapter_config.json")
    message = str(info.value)
    assert_one_line(message)
    assert message.startswith("some/adapter_config.json: ")
    assert field in message
    assert len(message) < 300


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "LOKR", "ADALORA", "PREFIX_TUNING", "PROMPT_TUNING"])
def test_non_lora_types_are_unsupported(peft_type):
    with pytest.raises(UnsupportedAdapterError, match="'peft_type'"):
        validate_lora_config({"peft_type": peft_type, "r": 8}, "x.json")


def test_target_parameters_is_unsupported():
    with pytest.raises(UnsupportedAdapterError, match="'target_parameters'"):
        validate_lora_config({"peft_type": "LORA", "target_parameters": ["experts.gate_up_proj"]}, "x.json")


def test_defaults_when_fields_are_missing():
    """A hand-written config may leave out r and lora_alpha: PEFT's defaults (8, 8) apply."""
    validate_lora_config({"peft_type": "LORA"}, "x.json")
    assert resolve_rank_alpha({"rank_pattern": None, "alpha_pattern": None}, "a.q_proj") == (8, 8)


# --- pairing factors into modules -----------------------------------------------------------------------------


def test_parse_key():
    assert parse_key("base_model.model.a.b.lora_A.weight") == ("a.b", "A", False)
    assert parse_key("base_model.model.emb.lora_embedding_B") == ("emb", "B", True)
    assert parse_key("a.b.lora_B.weight") == ("a.b", "B", False)
    assert parse_key("base_model.model.classifier.weight") is None
    assert parse_key("base_model.model.q.lora_magnitude_vector") is None


def test_describe_modules_pairs_and_sorts():
    shapes = {
        "base_model.model.z.lora_A.weight": ("F16", (4, 10)),
        "base_model.model.z.lora_B.weight": ("F16", (12, 4)),
        "base_model.model.a.lora_A.weight": ("F16", (4, 6)),
        "base_model.model.a.lora_B.weight": ("F16", (7, 4)),
        "base_model.model.classifier.weight": ("F32", (2, 6)),
    }
    config = {"r": 4, "lora_alpha": 8, "fan_in_fan_out": True}
    specs, extras, prefix = describe_modules(config, shapes, "w.safetensors")
    assert [s.name for s in specs] == ["a", "z"]
    assert extras == ["base_model.model.classifier.weight"]
    assert prefix == "base_model.model."
    assert specs[1] == ModuleSpec("z", "linear", 4, 8, 2.0, 10, 12, (), True, "F16")
    assert ModuleSpec.from_json(specs[1].to_json()) == specs[1]
    assert specs[1].num_parameters == 4 * 10 + 12 * 4


@pytest.mark.parametrize(
    ("shapes", "words"),
    [
        ({"base_model.model.m.lora_A.weight": ("F32", (4, 6))}, ["'m'", "no lora_B"]),
        ({"base_model.model.m.lora_B.weight": ("F32", (6, 4))}, ["'m'", "no lora_A"]),
        (
            {"base_model.model.m.lora_A.weight": ("F32", (2, 6)), "base_model.model.m.lora_B.weight": ("F32", (6, 2))},
            ["'m'", "r=4", "rank_pattern"],
        ),
        (
            {"base_model.model.m.lora_A.weight": ("F32", (4, 6)), "base_model.model.m.lora_B.weight": ("F16", (6, 4))},
            ["'m'", "F32", "F16"],
        ),
        (
            {
                "base_model.model.m.lora_A.weight": ("F32", (4, 6, 3)),
                "base_model.model.m.lora_B.weight": ("F32", (6, 4)),
            },
            ["'m'", "not a LoRA pair"],
        ),
        (
            {"base_model.model.m.lora_A.weight": ("F32", (4,)), "base_model.model.m.lora_B.weight": ("F32", (6, 4))},
            ["'m'", "not a LoRA pair"],
        ),
        (
            {"base_model.model.m.lora_A.weight": ("F32", (4, 6)), "n.lora_B.weight": ("F32", (6, 4))},
            ["mixes keys"],
        ),
        ({"classifier.weight": ("F32", (2, 2))}, ["no LoRA weights"]),
    ],
)
def test_describe_modules_refusals(shapes, words):
    with pytest.raises(AdapterFormatError) as info:
        describe_modules({"r": 4}, shapes, "dir/adapter_model.safetensors")
    message = str(info.value)
    assert_one_line(message)
    assert message.startswith("dir/adapter_model.safetensors: ")
    for word in words:
        assert word in message


def test_from_state_dict_refuses_unstorable_dtype():
    tensors = {
        "base_model.model.m.lora_A.weight": torch.ones(2, 3, dtype=torch.complex64),
        "base_model.model.m.lora_B.weight": torch.ones(3, 2, dtype=torch.complex64),
    }
    with pytest.raises(AdapterFormatError, match=re.escape("lora_A.weight")):
        Adapter.from_state_dict({"peft_type": "LORA", "r": 2}, tensors)


def test_state_dict_gives_back_every_tensor(llama, tmp_path):
    from safetensors.torch import load_file

    adapter, _ = _adapter_and_layers(llama, tmp_path, **LLAMA_LORA_CASES["modules-to-save"])
    original = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    mine = adapter.state_dict()
    assert set(mine) == set(original)
    assert all(torch.equal(mine[key], original[key]) for key in original)
    assert adapter.num_parameters == sum(t.numel() for key, t in original.items() if "lora_A" in key or "lora_B" in key)
