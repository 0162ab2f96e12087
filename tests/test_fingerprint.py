"""Base-model fingerprints: independent of sharding, sensitive to what makes an adapter (not) fit.

``structure_digest`` decides whether adapters may be composed or merged together, so it must not
change when the same model is merely re-sharded, and must change when any tensor's name, dtype or
shape does. Folders that cannot be fingerprinted are refused with :class:`BaseModelError`.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers import assert_one_line, make_lora, save_base, tiny_gpt2, tiny_llama

from adapterkit.base_model import INDEX_NAME, base_weight_key, fingerprint, read_base_config, read_base_headers
from adapterkit.errors import BaseModelError
from adapterkit.formats.peft import read_adapter


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def bases(model, tmp_path_factory):
    """The same model saved whole and in several shards."""
    root = tmp_path_factory.mktemp("bases")
    single = save_base(model, root / "single")
    sharded = save_base(model, root / "sharded", max_shard_size="20KB")
    assert (single / "model.safetensors").is_file() and not (single / INDEX_NAME).exists()
    assert (sharded / INDEX_NAME).is_file() and len(list(sharded.glob("*.safetensors"))) >= 3
    return single, sharded


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def test_sharding_does_not_change_the_fingerprint(bases):
    single, sharded = (fingerprint(folder, content=True) for folder in bases)
    assert single.structure_digest == sharded.structure_digest
    assert single.content_digest == sharded.content_digest
    assert single.tensors == sharded.tensors
    assert single.structure_digest.startswith("sha256:") and len(single.structure_digest) == 71
    assert fingerprint(bases[0]).content_digest is None


def test_structure_ignores_values_but_content_does_not(model, bases, tmp_path):
    other = tiny_llama(seed=1)  # same architecture, other weights
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    saved = save_base(other, tmp_path / "other", max_shard_size="30KB")
    assert fingerprint(saved).structure_digest == fingerprint(bases[0]).structure_digest
    assert fingerprint(saved, content=True).content_digest != fingerprint(bases[0], content=True).content_digest


def test_one_changed_value_changes_the_content_digest(model, bases, tmp_path):
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight[3, 5] += 1.0
    saved = save_base(changed, tmp_path / "changed", max_shard_size="20KB")
    assert fingerprint(saved).structure_digest == fingerprint(bases[1]).structure_digest
    assert fingerprint(saved, content=True).content_digest != fingerprint(bases[1], content=True).content_digest


def test_one_changed_shape_changes_the_structure_digest(bases, tmp_path):
    wider = save_base(tiny_llama(intermediate_size=72), tmp_path / "wider")
    assert fingerprint(wider).structure_digest != fingerprint(bases[0]).structure_digest


def test_dtype_changes_the_structure_digest(model, bases, tmp_path):
    half = save_base(tiny_llama().to(torch.float16), tmp_path / "half")
    assert fingerprint(half).structure_digest != fingerprint(bases[0]).structure_digest


def test_only_pytorch_model_bin_is_refused(model, tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    with pytest.raises(BaseModelError, match="no safetensors weights") as info:
        fingerprint(folder)
    assert_one_line(str(info.value))
    assert str(folder) in str(info.value)


def test_missing_shard_is_refused(bases, tmp_path):
    folder = _copy(bases[1], tmp_path)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(BaseModelError, match="missing") as info:
        fingerprint(folder)
    assert_one_line(str(info.value))
    assert victim.name in str(info.value)


def test_corrupt_shard_header_is_refused(bases, tmp_path):
    folder = _copy(bases[1], tmp_path)
    victim = sorted(folder.glob("model-*.safetensors"))[0]
    raw = bytearray(victim.read_bytes())
    raw[8:12] = b"\x00\xff\x00\xff"  # break the JSON
    victim.write_bytes(bytes(raw))
    with pytest.raises(BaseModelError) as info:
        fingerprint(folder)
    assert_one_line(str(info.value))
    assert str(victim) in str(info.value)


def test_truncated_shard_is_refused(bases, tmp_path):
    folder = _copy(bases[0], tmp_path)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(BaseModelError, match="truncated"):
        fingerprint(folder)


@pytest.mark.parametrize(
    ("index", "words"),
    [
        ("not json", "not a safetensors index"),
        (json.dumps({"metadata": {}}), "not a safetensors index"),
        (json.dumps({"weight_map": ["a"]}), "not a safetensors index"),
        (json.dumps({"weight_map": {"lm_head.weight": "../model.safetensors"}}), "invalid shard name"),
        (json.dumps({"weight_map": {"lm_head.weight": "/etc/passwd"}}), "invalid shard name"),
        (json.dumps({"weight_map": {"lm_head.weight": 3}}), "invalid shard name"),
    ],
)
def test_bad_index_is_refused(index, words, bases, tmp_path):
    folder = _copy(bases[1], tmp_path)
    (folder / INDEX_NAME).write_text(index)
    with pytest.raises(BaseModelError, match=words) as info:
        fingerprint(folder)
    assert_one_line(str(info.value))
    assert str(folder / INDEX_NAME) in str(info.value)


def test_index_that_misplaces_a_tensor_is_refused(bases, tmp_path):
    folder = _copy(bases[1], tmp_path)
    index = json.loads((folder / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    first, second = sorted(set(weight_map.values()))[:2]
    moved = next(name for name, shard in weight_map.items() if shard == first)
    weight_map[moved] = second
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(BaseModelError, match="weight_map does not match"):
        fingerprint(folder)


def test_tensor_in_two_shards_is_refused(bases, tmp_path):
    folder = _copy(bases[0], tmp_path)
    shutil.copy(folder / "model.safetensors", folder / "other.safetensors")
    (folder / "model.safetensors").rename(folder / "first.safetensors")
    with pytest.raises(BaseModelError, match="in both"):
        fingerprint(folder)


def test_unindexed_shards_are_read(bases, tmp_path):
    folder = _copy(bases[1], tmp_path)
    (folder / INDEX_NAME).unlink()
    assert fingerprint(folder).structure_digest == fingerprint(bases[0]).structure_digest
    assert len(read_base_headers(folder)) >= 3


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (
            b'{"hidden_size": 8,}',
            r"\(Expecting property name enclosed in double quotes: line 1 column 19 \(char 18\)\)",
        ),
        (b"\xff\xfe", r"\('utf-8' codec can't decode byte 0xff in position 0: invalid start byte\)"),
        (b"[" * 100_000 + b"]" * 100_000, r"\(nested too deeply\)"),
    ],
    ids=["syntax", "not-utf-8", "deep"],
)
def test_config_that_is_not_json_is_refused_with_the_parsers_words(data, detail, tmp_path):
    (tmp_path / "config.json").write_bytes(data)
    with pytest.raises(BaseModelError, match=f"^{re.escape(str(tmp_path / 'config.json'))}: not valid JSON {detail}$"):
        read_base_config(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(BaseModelError, match="not a directory"):
        fingerprint(tmp_path / "absent")


# --- which base tensor a LoRA module changes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_base", "targets", "fan_in_fan_out"),
    [
        (tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], False),
        (tiny_gpt2, ["c_attn", "c_proj", "wte"], True),
    ],
    ids=["llama", "gpt2"],
)
def test_base_weight_key_finds_each_module_with_its_shape(make_base, targets, fan_in_fan_out, tmp_path):
    """Every module of a real PEFT adapter maps to the base tensor it changes, and delta shapes agree."""
    base = make_base()
    make_lora(base, target_modules=targets, fan_in_fan_out=fan_in_fan_out).save_pretrained(tmp_path / "adapter")
    adapter = read_adapter(tmp_path / "adapter")
    fp = fingerprint(save_base(base, tmp_path / "base"))
    for name, module in adapter.modules.items():
        key = base_weight_key(name, fp.tensors)
        assert key is not None, name
        assert fp.tensors[key][1] == module.spec.base_shape, name


def test_base_weight_key_handles_wrapper_prefixes():
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": ("F32", (4, 4)),
        "layers.0.mlp.up_proj.weight": ("F32", (4, 4)),
        "a.x.proj.weight": ("F32", (1,)),
        "b.x.proj.weight": ("F32", (1,)),
    }
    assert base_weight_key("model.layers.0.self_attn.q_proj", tensors) == "model.layers.0.self_attn.q_proj.weight"
    # the adapter was made on the task model (one component more), the base saved bare
    assert base_weight_key("model.layers.0.mlp.up_proj", tensors) == "layers.0.mlp.up_proj.weight"
    # the adapter was made on the bare model (one component fewer)
    assert base_weight_key("layers.0.self_attn.q_proj", tensors) == "model.layers.0.self_attn.q_proj.weight"
    assert base_weight_key("x.proj", tensors) is None  # ambiguous: two candidates
    assert base_weight_key("nowhere", tensors) is None
