"""merge() of what PEFT trains beyond ``s * B @ A`` (issue 18), with PEFT's ``merge_and_unload`` as the oracle.

DoRA, ``modules_to_save`` (a classifier head, ``lm_head``, embeddings of a resized vocabulary), trained biases
(``bias="lora_only"`` / ``"all"``), ``lora_bias`` and trainable tokens. Each case builds a tiny real model and a PEFT
adapter whose every trained part is moved away from its initial value (``make_lora`` in tests/helpers.py), merges it
with adapterkit and compares the folder, tensor by tensor, with the checkpoint PEFT's merged model saves
(``merge_and_unload().save_pretrained``: what a PEFT user would ship): the same names, shapes and dtypes, the tensors
PEFT leaves alone bit for bit, the others within float32 rounding; then the logits of the model transformers loads
from the folder against those of PEFT's unmerged and merged models.

What a merge cannot reproduce is refused before anything is written: DoRA, trained biases and trainable tokens at a
weight other than 1 (none of them is linear in the weight), ``lora_bias`` on a layer with no bias, an embedding resized
without the untied output layer, a trainable token beyond the base's vocabulary.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    load_peft,
    logits,
    max_abs_diff,
    save_base,
    save_lora,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
)

from adapterkit.errors import UnsupportedAdapterError
from adapterkit.formats.peft import read_adapter
from adapterkit.merging.streamed import merge

#: float32 merges: PEFT computes in float32, adapterkit may round differently (float64 maths, another summation
#: order); a few float32 ulps of the tensor's scale separate them, far below any real difference (>= 1e-3 here).
#: Measured with the engine of commit 4925184: most tensors bit-identical to PEFT's, the worst at 3% of this bound.
RTOL, ATOL = 1e-5, 1e-6
#: logits: at most this fraction of the largest logit apart (measured: PEFT's own merged vs unmerged model up to
#: 5.1e-7, adapterkit's vs either up to 4.7e-7)
LOGITS_RTOL = 1e-5

LLAMA_DORA = dict(use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
PLAIN = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"])
TOKENS = [3, 17, 42]
#: what a PLAIN and a LLAMA_DORA adapter change together
STACKED = {
    f"model.layers.{i}.{m}.weight"
    for i in (0, 1)
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
}


@dataclass(frozen=True)
class Base:
    """A base model folder and the in-memory model it was saved from (PEFT's oracle runs on copies of it)."""

    model: Any
    path: Path


@dataclass(frozen=True)
class Oracle:
    """What PEFT makes of a base and its adapters."""

    tensors: dict[str, torch.Tensor]  #: the checkpoint PEFT's merged model saves
    config: dict[str, Any]  #: and its config.json
    unmerged: torch.Tensor  #: logits of PEFT's model running the adapters unmerged
    merged: torch.Tensor  #: logits of PEFT's merged model


def _base(root: Path, model: Any) -> Base:
    return Base(model, save_base(model, root / "base"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return _base(tmp_path_factory.mktemp("llama"), tiny_llama())


@pytest.fixture(scope="module")
def llama_bias(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """Llama with biases on q, k, v and o: trained biases and lora_bias have something to change."""
    return _base(tmp_path_factory.mktemp("llama-bias"), tiny_llama(attention_bias=True))


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """Llama whose lm_head is its embedding: transformers stores the one tensor once."""
    return _base(tmp_path_factory.mktemp("tied"), tiny_llama(tie_word_embeddings=True))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """GPT-2: Conv1D layers store (in, out) weights (fan_in_fan_out), and every layer has a bias."""
    return _base(tmp_path_factory.mktemp("gpt2"), tiny_gpt2())


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return _base(tmp_path_factory.mktemp("bert"), tiny_bert_classifier())


# --- the oracle and the comparison ---------------------------------------------------------------------------------


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def load_model(folder: Path, dtype: torch.dtype | None = None) -> Any:
    """The model transformers loads from ``folder``, by the architecture its config.json names."""
    import transformers

    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(folder, **({"dtype": dtype} if dtype else {})).eval()


def oracle(peft_model: Any, folder: Path) -> Oracle:
    """Run ``peft_model`` unmerged, then ``merge_and_unload`` it and save the merged model into ``folder``.

    The merged model is saved and read back rather than taken from its state_dict: save_pretrained stores a tied
    weight once and names tensors as the checkpoint does, exactly like the base folder merge reads.
    """
    peft_model.eval()
    unmerged = logits(peft_model)
    merged_model = peft_model.merge_and_unload().eval()
    merged = logits(merged_model)
    merged_model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert max_abs_diff(merged, unmerged) <= LOGITS_RTOL * unmerged.abs().max().item()  # PEFT agrees with itself
    return Oracle(tensors_of(folder), config, unmerged, merged)


def peft_single(base: Base, folder: Path, root: Path) -> Oracle:
    return oracle(load_peft(base.model, folder), root / "peft")


def peft_stack(model: Any, folders: Sequence[Path], weights: Sequence[float] | None = None) -> Any:
    """PEFT's own multi-adapter model: each adapter loaded under its own name, all active, in the order given
    (``merge_and_unload`` merges them one after another in that order), and a weight other than 1 applied by
    scaling that adapter's ``scaling`` in every LoRA layer, as adapterkit/merging/stacking.py does (for lora_bias
    that scales lora_B's bias too: PEFT's forward multiplies ``lora_B(lora_A(x))``, bias included, by it)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"a{i}" for i in range(len(folders))]
    peft = PeftModel.from_pretrained(copy.deepcopy(model), folders[0], adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:], strict=True):
        peft.load_adapter(folder, adapter_name=name)
    peft.base_model.set_adapter(names)
    assert peft.base_model.active_adapters == names
    for module in peft.modules():
        if isinstance(module, LoraLayer):
            for name, weight in zip(names, weights or [1.0] * len(names), strict=True):
                if name in module.scaling:
                    module.scaling[name] *= weight
    return peft.eval()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))
    )


def bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers (8 significant bits) at ``x``, elementwise, as float64."""
    _, exponent = torch.frexp(x.double().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), (exponent - 8).clamp(min=-133))


def assert_equals_peft(out: Path, base: Path, expected: Oracle, *, bf16: bool = False) -> set[str]:
    """Every tensor of ``out`` against PEFT's checkpoint; returns the names PEFT changed (or resized).

    Unchanged tensors must be bit-identical; changed ones within float32 rounding of PEFT's, or with ``bf16`` within
    one bfloat16 step (``|ours - peft| <= spacing at max(|ours|, |peft|)``) of it.
    """
    ours, before = tensors_of(out), tensors_of(base)
    assert sorted(ours) == sorted(expected.tensors)
    changed = set()
    for key, theirs in expected.tensors.items():
        mine = ours[key]
        assert (mine.dtype, mine.shape) == (theirs.dtype, theirs.shape), key
        old = before.get(key)
        if old is not None and same_bits(old, theirs):
            assert same_bits(mine, theirs), f"{key}: PEFT leaves it as it is, merge changed it"
            continue
        changed.add(key)
        if bf16:
            step = bf16_step(torch.maximum(mine.double().abs(), theirs.double().abs()))
            excess = ((mine.double() - theirs.double()).abs() / step).max().item()
            assert excess <= 1.0, f"{key}: {excess:.2f} bf16 steps from PEFT's"
        else:
            assert torch.allclose(mine, theirs, rtol=RTOL, atol=ATOL), f"{key}: {max_abs_diff(mine, theirs):.3g}"
    return changed


def assert_logits_match(out: Path, expected: Oracle) -> None:
    """The merged folder runs as PEFT's model runs, unmerged and merged."""
    ours = logits(load_model(out))
    bound = LOGITS_RTOL * expected.unmerged.abs().max().item()
    assert max_abs_diff(ours, expected.merged) <= bound
    assert max_abs_diff(ours, expected.unmerged) <= bound


def assert_refused(match: str, folders: Sequence[Path], weights: Sequence[float] | None, base: Path, out: Path) -> str:
    """An UnsupportedAdapterError matching ``match``, one line, raised before anything is written."""
    adapters = [read_adapter(folder) for folder in folders]
    before = sorted(os.listdir(out.parent))
    with pytest.raises(UnsupportedAdapterError, match=match) as info:
        merge(adapters, weights, base, out)
    assert sorted(os.listdir(out.parent)) == before  # no out_dir, no temporary folder
    message = str(info.value)
    assert message and "\n" not in message
    return message


def weight_keys(*modules: str) -> set[str]:
    return {f"{module}.weight" for module in modules}


def layers(*names: str, count: int = 2, prefix: str = "model.layers") -> list[str]:
    """``names`` (like ``self_attn.q_proj``) in every layer."""
    return [f"{prefix}.{i}.{name}" for i in range(count) for name in names]


# --- DoRA ---------------------------------------------------------------------------------------------------------

DORA_CASES: dict[str, tuple[str, dict[str, Any], set[str]]] = {
    "llama-linear": (
        "llama",
        LLAMA_DORA,
        weight_keys(*layers("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")),
    ),
    # PEFT saves the embedding's base weight beside a DoRA (or LoRA) embedding: equal to the base's, it changes nothing
    "llama-embedding": (
        "llama",
        dict(use_dora=True, target_modules=["embed_tokens", "q_proj"]),
        weight_keys("model.embed_tokens", *layers("self_attn.q_proj")),
    ),
    # Conv1D: the weight is (in, out), so DoRA's norms run over the other dimension
    "gpt2-conv1d": (
        "gpt2",
        dict(use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True),
        weight_keys(*layers("attn.c_attn", prefix="transformer.h")),
    ),
}


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_dora_equals_peft_merge_and_unload(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """DoRA at weight 1: ``m / ||W + s B A|| * (W + s B A)``, one norm per output feature: a row of a linear
    weight, a column of one stored transposed (an embedding, a ``fan_in_fan_out`` Conv1D)."""
    fixture, kwargs, targets = DORA_CASES[case]
    base: Base = request.getfixturevalue(fixture)
    folder = save_lora(base.model, tmp_path / "dora", **kwargs)
    expected = peft_single(base, folder, tmp_path)
    merge([read_adapter(folder)], None, base.path, tmp_path / "out")
    assert assert_equals_peft(tmp_path / "out", base.path, expected) == targets
    assert_logits_match(tmp_path / "out", expected)


@pytest.mark.parametrize("weight", [0.5, -1.0, 2.0])
def test_dora_at_a_weight_other_than_1_is_refused(llama: Base, tmp_path: Path, weight: float) -> None:
    """DoRA's magnitude rescales the whole weight: there is no 'half a DoRA adapter' to bake in."""
    folder = save_lora(llama.model, tmp_path / "dora", **LLAMA_DORA)
    message = assert_refused("DoRA", [folder], [weight], llama.path, tmp_path / "out")
    assert "weight 1" in message


def test_dora_and_a_plain_lora_merge_in_the_order_given_as_peft_does(llama: Base, tmp_path: Path) -> None:
    """Several adapters merge as PEFT merges its active adapters: one after another, in order, each DoRA norm taken
    on the unmerged base weight plus that adapter's own delta (peft/tuners/lora/variants.py merge_unsafe,
    ``_unmerged_base_weight``). The DoRA factor scales whatever is in the weight when its turn comes, so:

    * [lora, dora]: ``m / ||W + dD|| * (W + dL + dD)``;
    * [dora, lora]: ``m / ||W + dD|| * (W + dD) + dL``.

    PEFT's unmerged forward has the same order dependence (its DoRA forward rescales the result accumulated so far
    as the base output) and its merged model matches its unmerged one in both orders (1.8e-7 and 1.6e-7 apart, on
    logits up to 0.35). What decides is the order of ``set_adapter``, not of loading (measured: loading the plain
    LoRA first but activating [dora, lora] gives exactly the [dora, lora] model). The two orders differ: logits by
    0.040, the q_proj and down_proj weights (shared by both adapters) by 0.10 to 0.15 (max |W| 0.46 to 0.61); the
    k_proj and v_proj ones, each changed by one adapter only, are equal. Measured with peft 0.21.2 on these seeds.
    """
    plain = save_lora(llama.model, tmp_path / "plain", seed=3, **PLAIN)
    dora = save_lora(llama.model, tmp_path / "dora", seed=2, **LLAMA_DORA)
    results = {}
    for order in ((plain, dora), (dora, plain)):
        tag = "-".join(folder.name for folder in order)
        expected = oracle(peft_stack(llama.model, order), tmp_path / f"peft-{tag}")
        merge([read_adapter(folder) for folder in order], None, llama.path, tmp_path / f"out-{tag}")
        assert assert_equals_peft(tmp_path / f"out-{tag}", llama.path, expected) == STACKED
        assert_logits_match(tmp_path / f"out-{tag}", expected)
        results[tag] = expected
    first, second = results.values()
    assert max_abs_diff(first.merged, second.merged) > 1e-2  # the order matters, so the test checks it


@pytest.mark.parametrize("dora_first", [False, True], ids=["lora-dora", "dora-lora"])
def test_a_weighted_plain_lora_with_a_dora_at_weight_1(llama: Base, tmp_path: Path, dora_first: bool) -> None:
    """A plain LoRA's weight scales its delta (which the DoRA factor then rescales too when the LoRA comes first):
    PEFT with that adapter's scaling multiplied by the weight in every layer (what adapterkit's attach does)."""
    plain = save_lora(llama.model, tmp_path / "plain", seed=3, **PLAIN)
    dora = save_lora(llama.model, tmp_path / "dora", seed=2, **LLAMA_DORA)
    folders, weights = ([dora, plain], [1.0, 0.5]) if dora_first else ([plain, dora], [0.5, 1.0])
    expected = oracle(peft_stack(llama.model, folders, weights), tmp_path / "peft")
    full = oracle(peft_stack(llama.model, folders), tmp_path / "peft-full")
    assert max_abs_diff(expected.merged, full.merged) > 1e-2  # the weight matters
    merge([read_adapter(folder) for folder in folders], weights, llama.path, tmp_path / "out")
    assert assert_equals_peft(tmp_path / "out", llama.path, expected) == STACKED
    assert_logits_match(tmp_path / "out", expected)


# --- modules_to_save ----------------------------------------------------------------------------------------------


def test_a_classifier_head_in_modules_to_save_replaces_the_base_head(bert: Base, tmp_path: Path) -> None:
    """task_type="SEQ_CLS" puts the classifier in modules_to_save: PEFT saves it whole as ``classifier.weight`` /
    ``classifier.bias`` (no ``modules_to_save.default`` in the key); the merged model has that head."""
    folder = save_lora(bert.model, tmp_path / "cls", target_modules=["query", "value"], task_type="SEQ_CLS")
    assert "classifier" in json.loads((folder / "adapter_config.json").read_text())["modules_to_save"]
    expected = peft_single(bert, folder, tmp_path)
    merge([read_adapter(folder)], None, bert.path, tmp_path / "out")
    changed = assert_equals_peft(tmp_path / "out", bert.path, expected)
    assert changed == {"classifier.weight", "classifier.bias"} | weight_keys(
        *layers("attention.self.query", "attention.self.value", prefix="bert.encoder.layer")
    )
    assert_logits_match(tmp_path / "out", expected)


def test_an_lm_head_in_modules_to_save_replaces_the_output_layer(llama: Base, tmp_path: Path) -> None:
    folder = save_lora(llama.model, tmp_path / "head", modules_to_save=["lm_head"])
    expected = peft_single(llama, folder, tmp_path)
    merge([read_adapter(folder)], None, llama.path, tmp_path / "out")
    changed = assert_equals_peft(tmp_path / "out", llama.path, expected)
    assert changed == {"lm_head.weight"} | weight_keys(*layers("self_attn.q_proj", "self_attn.v_proj"))
    assert_logits_match(tmp_path / "out", expected)


def test_a_resized_vocabulary_grows_the_embedding_the_output_layer_and_the_config(llama: Base, tmp_path: Path) -> None:
    """The user resized the base (128 -> 136 tokens) and trained with embed_tokens and lm_head in modules_to_save:
    the adapter holds both whole, so merging it into the original, unresized base gives the resized model: both
    tensors of 136 rows, config.json's vocab_size 136, equal to PEFT's merge on the resized base."""
    resized = copy.deepcopy(llama.model)
    resized.resize_token_embeddings(136)
    folder = save_lora(resized, tmp_path / "resized", modules_to_save=["embed_tokens", "lm_head"])
    expected = peft_single(Base(resized, llama.path), folder, tmp_path)
    assert expected.config["vocab_size"] == 136
    merge([read_adapter(folder)], None, llama.path, tmp_path / "out")
    changed = assert_equals_peft(tmp_path / "out", llama.path, expected)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= changed
    merged = tensors_of(tmp_path / "out")
    assert merged["model.embed_tokens.weight"].shape == merged["lm_head.weight"].shape == (136, 32)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 136
    assert_logits_match(tmp_path / "out", expected)


def test_a_resized_embedding_without_its_untied_output_layer_is_refused(llama: Base, tmp_path: Path) -> None:
    """Only embed_tokens resized (136 rows) on an untied base: the output layer's 8 new rows are nowhere to be found."""
    resized = copy.deepcopy(llama.model)
    resized.resize_token_embeddings(136)
    folder = save_lora(resized, tmp_path / "embed", modules_to_save=["embed_tokens"])
    assert_refused("resize", [folder], None, llama.path, tmp_path / "out")


# --- trained biases -----------------------------------------------------------------------------------------------

BIAS_CASES: dict[str, tuple[str, dict[str, Any], set[str]]] = {
    # lora_only: the biases of the LoRA layers; all: every bias of the model
    "llama-lora_only": (
        "llama_bias",
        dict(bias="lora_only"),
        {f"{m}.{p}" for m in layers("self_attn.q_proj", "self_attn.v_proj") for p in ("weight", "bias")},
    ),
    "llama-all": (
        "llama_bias",
        dict(bias="all"),
        weight_keys(*layers("self_attn.q_proj", "self_attn.v_proj"))
        | {f"{m}.bias" for m in layers("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")},
    ),
    "gpt2-lora_only": (
        "gpt2",
        dict(bias="lora_only", target_modules=["c_attn"], fan_in_fan_out=True),
        {f"{m}.{p}" for m in layers("attn.c_attn", prefix="transformer.h") for p in ("weight", "bias")},
    ),
    # GPT-2's layer norms have biases too: bias="all" trains them as well
    "gpt2-all": (
        "gpt2",
        dict(bias="all", target_modules=["c_attn"], fan_in_fan_out=True),
        weight_keys(*layers("attn.c_attn", prefix="transformer.h"))
        | {
            f"{m}.bias"
            for m in layers(
                "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "ln_1", "ln_2", prefix="transformer.h"
            )
        }
        | {"transformer.ln_f.bias"},
    ),
}


@pytest.mark.parametrize("case", sorted(BIAS_CASES))
def test_trained_biases_replace_the_base_biases(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """PEFT saves the trained biases whole (``q_proj.base_layer.bias`` for a LoRA layer, ``k_proj.bias`` else)."""
    fixture, kwargs, changed = BIAS_CASES[case]
    base: Base = request.getfixturevalue(fixture)
    folder = save_lora(base.model, tmp_path / "biased", **kwargs)
    expected = peft_single(base, folder, tmp_path)
    merge([read_adapter(folder)], None, base.path, tmp_path / "out")
    assert assert_equals_peft(tmp_path / "out", base.path, expected) == changed
    assert_logits_match(tmp_path / "out", expected)


# --- lora_bias ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_lora_bias_adds_its_scaled_bias_to_the_base_bias(llama_bias: Base, tmp_path: Path, weight: float) -> None:
    """lora_B has a bias: the merge adds ``weight * scaling * lora_B.bias`` to the base bias (linear in the weight,
    so any weight merges), as PEFT with the adapter's scaling multiplied by the weight."""
    folder = save_lora(llama_bias.model, tmp_path / "lora-bias", lora_bias=True)
    expected = oracle(peft_stack(llama_bias.model, [folder], [weight]), tmp_path / "peft")
    merge([read_adapter(folder)], [weight], llama_bias.path, tmp_path / "out")
    changed = assert_equals_peft(tmp_path / "out", llama_bias.path, expected)
    assert changed == {f"{m}.{p}" for m in layers("self_attn.q_proj", "self_attn.v_proj") for p in ("weight", "bias")}
    assert_logits_match(tmp_path / "out", expected)


def test_lora_bias_on_a_layer_without_a_bias_is_refused(llama: Base, tmp_path: Path) -> None:
    """The default tiny Llama has no q_proj bias (PEFT warns when it makes the adapter, and cannot merge it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "has no bias", and a ZeRO-3 hint its save gives 1-D lora_B biases
        folder = save_lora(llama.model, tmp_path / "lora-bias", lora_bias=True)
    assert_refused("no bias", [folder], None, llama.path, tmp_path / "out")


# --- trainable tokens ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["untied", "tied"])
def test_trainable_tokens_replace_their_rows(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """``trainable_token_indices``: PEFT saves the trained rows as ``embed_tokens.token_adapter.trainable_tokens_delta``
    (3 x hidden; despite the name the rows themselves, not a difference), and merging writes them over those rows.

    Tied: PEFT wraps lm_head too, sharing the same rows (the adapter still holds them once), so its merged model
    changes the one stored tensor; so must merge."""
    base: Base = request.getfixturevalue("llama" if case == "untied" else "tied")
    folder = save_lora(base.model, tmp_path / "tokens", trainable_token_indices=TOKENS)
    expected = peft_single(base, folder, tmp_path)
    merge([read_adapter(folder)], None, base.path, tmp_path / "out")
    changed = assert_equals_peft(tmp_path / "out", base.path, expected)
    assert changed == {"model.embed_tokens.weight"} | weight_keys(*layers("self_attn.q_proj", "self_attn.v_proj"))
    before, after = tensors_of(base.path)["model.embed_tokens.weight"], expected.tensors["model.embed_tokens.weight"]
    assert [i for i in range(len(before)) if not torch.equal(before[i], after[i])] == TOKENS
    assert_logits_match(tmp_path / "out", expected)


def test_a_trainable_token_beyond_the_vocabulary_is_refused(llama: Base, tmp_path: Path) -> None:
    """Rows trained on a base resized to 136 tokens, merged into the original 128-token base: row 130 does not exist."""
    resized = copy.deepcopy(llama.model)
    resized.resize_token_embeddings(136)
    folder = save_lora(resized, tmp_path / "tokens", trainable_token_indices=[3, 130])
    assert_refused(r"130", [folder], None, llama.path, tmp_path / "out")


# --- weights other than 1 -----------------------------------------------------------------------------------------

REPLACING: dict[str, tuple[str, dict[str, Any]]] = {
    "bias-lora_only": ("llama_bias", dict(bias="lora_only")),
    "bias-all": ("llama_bias", dict(bias="all")),
    "modules_to_save": ("llama", dict(modules_to_save=["lm_head"])),
    "trainable-tokens": ("llama", dict(trainable_token_indices=TOKENS)),
}


@pytest.mark.parametrize("case", sorted(REPLACING))
def test_what_replaces_base_values_is_refused_at_a_weight_other_than_1(
    case: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Trained biases, modules_to_save copies and trainable tokens replace the base's values rather than add to
    them: half of a replacement is no model PEFT can make, so any weight but 1 is refused."""
    fixture, kwargs = REPLACING[case]
    base: Base = request.getfixturevalue(fixture)
    folder = save_lora(base.model, tmp_path / "lora", **kwargs)
    assert_refused("weight 1", [folder], [0.5], base.path, tmp_path / "out")


# --- bfloat16 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["dora", "lora-bias"])
def test_bfloat16_base_within_one_bf16_step_of_peft(case: str, tmp_path: Path) -> None:
    """A bfloat16 base: every changed tensor within one bf16 step of PEFT's merge on that base, the rest bit-identical.

    PEFT keeps the adapter in float32 (autocast_adapter_dtype) and rounds each merged tensor to bf16 once, so it is
    practically correctly rounded: measured against PEFT's merge of the same base and adapter in float64, at most
    0.500 bf16 steps off for DoRA (q_proj, v_proj, down_proj; every element equal to the float64 result rounded to
    bf16) and 0.506 for lora_bias (1 element of 1024 in one q_proj one step from the rounded float64 result: double
    rounding through float32). So one step of PEFT's holds any correctly rounded merge.
    """
    model, kwargs = {
        "dora": (tiny_llama(), LLAMA_DORA),
        "lora-bias": (tiny_llama(attention_bias=True), dict(lora_bias=True)),
    }[case]
    path = save_base(model.to(torch.bfloat16), tmp_path / "base16")
    folder = save_lora(model, tmp_path / "lora", **kwargs)
    loaded = load_model(path, torch.bfloat16)  # PEFT on the model as loaded (a cast model also rounds its buffers)
    peft_model = load_peft(loaded, folder)
    unmerged = logits(peft_model)
    merged_model = peft_model.merge_and_unload().eval()
    merged_model.save_pretrained(tmp_path / "peft")
    expected = Oracle(tensors_of(tmp_path / "peft"), {}, unmerged, logits(merged_model))
    merge([read_adapter(folder)], None, path, tmp_path / "out")
    changed = assert_equals_peft(tmp_path / "out", path, expected, bf16=True)
    assert len(changed) == (6 if case == "dora" else 8)
    assert {t.dtype for t in tensors_of(tmp_path / "out").values()} == {torch.bfloat16}
    ours = logits(load_model(tmp_path / "out", torch.bfloat16))
    assert max_abs_diff(ours, expected.merged) <= 0.05  # bf16 logits: PEFT's merged and unmerged are 4e-3 apart
    assert max_abs_diff(expected.merged, expected.unmerged) <= 0.05


# --- streaming ------------------------------------------------------------------------------------------------------


def test_a_sharded_base_gives_the_same_tensors_as_a_single_file(llama: Base, tmp_path: Path) -> None:
    """The merge streams shard by shard: a DoRA merge into a base saved in several shards gives, bit for bit, the
    tensors of the same merge into the single-file base (and PEFT's)."""
    sharded = save_base(llama.model, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 3
    folder = save_lora(llama.model, tmp_path / "dora", **LLAMA_DORA)
    adapter = read_adapter(folder)
    merge([adapter], None, llama.path, tmp_path / "single")
    merge([adapter], None, sharded, tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == len(list(sharded.glob("*.safetensors")))
    single, streamed = tensors_of(tmp_path / "single"), tensors_of(tmp_path / "out")
    assert sorted(single) == sorted(streamed)
    assert all(same_bits(streamed[key], single[key]) for key in single)
    expected = peft_single(llama, folder, tmp_path)
    assert len(assert_equals_peft(tmp_path / "out", sharded, expected)) == 6


# --- the dry run --------------------------------------------------------------------------------------------------


def test_the_dry_run_lists_every_operation_and_the_resize(llama: Base, tmp_path: Path) -> None:
    """merge --dry-run names what a merge will do beyond LoRA additions, and counts the carried tensors' memory."""
    from click.testing import CliRunner

    from adapterkit import Store, plan_merge
    from adapterkit.cli import cli

    resized = copy.deepcopy(llama.model)
    resized.resize_token_embeddings(136)
    copies = save_lora(resized, tmp_path / "resized", modules_to_save=["embed_tokens", "lm_head"])
    dora = save_lora(llama.model, tmp_path / "dora", **LLAMA_DORA)
    adapters = [read_adapter(dora), read_adapter(copies)]
    summary = plan_merge(adapters, None, llama.path)
    assert summary["operations"] == {"dora": 6, "lora": 4, "replace": 2}
    assert summary["config_updates"] == {"vocab_size": 136}
    embed = summary["touched"]["model.embed_tokens.weight"]
    assert embed["base_shape"] == [128, 32] and embed["shape"] == [136, 32]
    assert [c["op"] for c in embed["contributions"]] == ["replace"]
    q = summary["touched"]["model.layers.0.self_attn.q_proj.weight"]["contributions"]
    assert [(c["op"], c["adapter"], c.get("norms")) for c in q] == [("dora", 0, "rows"), ("lora", 1, None)]
    carried = sum(t.numel() * t.element_size() for a in adapters for t in a.extra_tensors.values())
    assert summary["adapter_bytes"] == sum(a.factor_bytes for a in adapters) + carried
    # the plan is the merge's: the same tensors change, and the output holds what the plan said it would
    report = merge(adapters, None, llama.path, tmp_path / "out")
    assert report.merged_tensors == summary["merged_tensors"]
    assert report.bytes_written == summary["bytes_written"]

    store = Store(tmp_path / "store")
    for name, folder in (("dora", dora), ("copies", copies)):
        store.add(folder, tag=f"me/{name}")
    result = CliRunner().invoke(
        cli,
        ["--store", str(tmp_path / "store"), "merge", "me/dora", "me/copies", "--base", str(llama.path), "--out",
         str(tmp_path / "cli-out"), "--dry-run"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "operations: 4 LoRA additions, 6 DoRA rescales, 2 tensors replaced by the adapter's copy" in lines
    assert "resized: model.embed_tokens.weight [128, 32] -> [136, 32]" in lines
    assert "config.json: vocab_size = 136" in lines
    assert not (tmp_path / "cli-out").exists()
