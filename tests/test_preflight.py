"""``adapterkit check REF --base BASE``: each fault a loader would meet, or hide, gets its own line.

Each test injects one fault into a real PEFT adapter (or its base) and expects the line naming it;
a clean adapter gives no line and exit 0. The base's weights are never read: a base whose shards
hold nothing but headers checks the same.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import make_lora, save_base, save_lora, tiny_gpt2, tiny_llama

from adapterkit import Store
from adapterkit.base_model import BaseModel
from adapterkit.checking import check
from adapterkit.cli import cli


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preflight")
    base = tiny_llama(seed=0)
    save_base(base, root / "base")
    save_lora(base, root / "lora", seed=1, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    save_base(tiny_llama(seed=0, hidden_size=48, num_attention_heads=4, num_key_value_heads=2), root / "other")
    save_base(tiny_llama(seed=0, num_hidden_layers=1), root / "one_layer")
    base.to(torch.bfloat16).save_pretrained(root / "bf16")
    resized = tiny_llama(seed=0)
    resized.resize_token_embeddings(136)
    save_lora(resized, root / "resized", seed=1, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    gpt2 = tiny_gpt2(seed=0)
    save_base(gpt2, root / "gpt2")
    make_lora(gpt2, seed=1, target_modules=["c_attn"], fan_in_fan_out=True).save_pretrained(root / "gpt2_lora")
    return {"root": root}


def _copy(made: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made["root"] / name, tmp_path / name))


def _lines(report: object) -> list[str]:
    return [p.message for p in report.problems]  # type: ignore[attr-defined]


def test_clean_adapter_has_no_problem(made: dict[str, Path], store: Store) -> None:
    root = made["root"]
    store.add(root / "lora", "a:1", base=root / "base")
    report = check(store, "a:1", root / "base")
    assert report.ok, _lines(report)
    assert report.modules == 2 * 2 + 2


def test_headers_only_no_weights_read(made: dict[str, Path], store: Store, tmp_path: Path) -> None:
    """A base whose tensor data is all zeros but headers intact gives the same answer: only headers matter."""
    root = made["root"]
    hollow = _copy(made, "base", tmp_path)
    shard = hollow / "model.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    shard.write_bytes(raw[: 8 + n] + bytes(len(raw) - 8 - n))
    store.add(root / "lora", "a:1", base=root / "base")
    assert check(store, "a:1", hollow).ok


def test_wrong_key_prefix(made: dict[str, Path], store: Store, tmp_path: Path) -> None:
    """Keys missing the ``model.`` level: a suffix match would find them, PEFT and vLLM would not."""
    folder = _copy(made, "lora", tmp_path)
    weights = folder / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    save_file(
        {k.replace("base_model.model.model.layers.", "base_model.model.layers."): v for k, v in tensors.items()},
        weights,
    )
    store.add(folder, "a:1")
    lines = _lines(check(store, "a:1", made["root"] / "base"))
    assert lines == [
        "key prefix: 4 name(s) have prefix '' where the base has 'model.' (e.g. layers.0.self_attn.q_proj for "
        "model.layers.0.self_attn.q_proj.weight); PEFT and vLLM match names exactly and would ignore them"
    ]


def test_doubled_prefix_is_a_wrong_prefix_too(made: dict[str, Path], store: Store, tmp_path: Path) -> None:
    folder = _copy(made, "lora", tmp_path)
    weights = folder / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    save_file(
        {k.replace("base_model.model.model.", "base_model.model.model.model."): v for k, v in tensors.items()}, weights
    )
    store.add(folder, "a:1")
    lines = _lines(check(store, "a:1", made["root"] / "base"))
    assert len(lines) == 1 and lines[0].startswith("key prefix: 6 name(s) have prefix 'model.' where the base has ''")


def test_resized_vocabulary(made: dict[str, Path], store: Store) -> None:
    root = made["root"]
    store.add(root / "resized", "a:1")
    lines = _lines(check(store, "a:1", root / "base"))
    assert (
        "module model.embed_tokens: made for a vocabulary of 136 tokens, but base tensor model.embed_tokens.weight "
        "has 128 (config vocab_size 128): the vocabulary was resized; resize the base's embeddings to match"
    ) in lines
    assert (
        "tensor base_model.model.lm_head.weight: a copy of lm_head.weight with 136 rows, but the base has 128: "
        "the vocabulary was resized; resize the base's embeddings to match"
    ) in lines
    assert len(lines) == 2  # the embedding's saved base layer is not reported again


def test_another_base(made: dict[str, Path], store: Store) -> None:
    root = made["root"]
    store.add(root / "lora", "a:1", base=root / "base")
    lines = _lines(check(store, "a:1", root / "other"))
    digest = BaseModel.open(root / "other").structure_digest
    assert lines[0].startswith("fingerprint: the adapter was recorded against base sha256:")
    assert lines[0].endswith(f"but {root / 'other'} is {digest[:19]} (another model, or other tensor names or shapes)")
    assert "module model.layers.0.self_attn.q_proj: changes a [32, 32] weight, but base tensor " in " ".join(lines)
    assert len(lines) == 1 + 2 * 2 + 2


def test_missing_layer(made: dict[str, Path], store: Store) -> None:
    root = made["root"]
    store.add(root / "lora", "a:1")
    lines = _lines(check(store, "a:1", root / "one_layer"))
    assert lines == [
        "module model.layers.1.self_attn.q_proj: the base has no tensor model.layers.1.self_attn.q_proj.weight "
        "(a layer it lacks)",
        "module model.layers.1.self_attn.v_proj: the base has no tensor model.layers.1.self_attn.v_proj.weight "
        "(a layer it lacks)",
    ]


def test_transposed_conv1d(made: dict[str, Path], store: Store, tmp_path: Path) -> None:
    folder = _copy(made, "gpt2_lora", tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False  # the fault: GPT-2's Conv1D stores [in, out]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    store.add(folder, "a:1")
    lines = _lines(check(store, "a:1", made["root"] / "gpt2"))
    assert lines[0] == (
        "module transformer.h.0.attn.c_attn: its delta is laid out [96, 32] but base tensor "
        "transformer.h.0.attn.c_attn.weight is [32, 96]; the base stores a GPT-2 style Conv1D weight [in, out]: "
        "the adapter needs fan_in_fan_out=true"
    )
    assert len(lines) == 2
    store.add(made["root"] / "gpt2_lora", "a:2")
    assert check(store, "a:2", made["root"] / "gpt2").ok


def test_wrong_dtype(made: dict[str, Path], store: Store) -> None:
    root = made["root"]
    store.add(root / "lora", "a:1", base=root / "base")
    lines = _lines(check(store, "a:1", root / "bf16"))
    assert lines == [
        f"base dtype: the adapter was recorded against this model in F32, but {root / 'bf16'} holds BF16 weights"
    ]


def test_half_precision_factors_on_the_other_half_type(made: dict[str, Path], store: Store, tmp_path: Path) -> None:
    folder = _copy(made, "lora", tmp_path)
    weights = folder / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k: v.to(torch.float16) for k, v in load_file(weights).items()}, weights)
    store.add(folder, "a:1")
    lines = _lines(check(store, "a:1", made["root"] / "bf16"))
    assert len(lines) == 6
    assert lines[0] == (
        "module lm_head: factors are F16 but base tensor lm_head.weight is BF16; a loader that casts the adapter to "
        "the base's dtype (vLLM does by default) rounds or overflows them"
    )


def test_cli_check_exit_codes_and_json(made: dict[str, Path], tmp_path: Path) -> None:
    root = made["root"]
    runner = CliRunner()
    home = tmp_path / "store"
    assert runner.invoke(cli, ["--store", str(home), "add", str(root / "lora"), "-t", "a:1"]).exit_code == 0
    ok = runner.invoke(cli, ["--store", str(home), "check", "a:1", "--base", str(root / "base")])
    assert ok.exit_code == 0, ok.output
    assert ok.output == f"a:1 fits {root / 'base'}: 6 modules checked, no problem\n"
    bad = runner.invoke(cli, ["--store", str(home), "check", "a:1", "--base", str(root / "one_layer")])
    assert bad.exit_code == 1
    assert bad.output.splitlines() == [
        "module model.layers.1.self_attn.q_proj: the base has no tensor model.layers.1.self_attn.q_proj.weight "
        "(a layer it lacks)",
        "module model.layers.1.self_attn.v_proj: the base has no tensor model.layers.1.self_attn.v_proj.weight "
        "(a layer it lacks)",
        f"a:1 does not fit {root / 'one_layer'}: 2 problems in 6 modules",
    ]
    doc = runner.invoke(cli, ["--store", str(home), "check", "a:1", "--base", str(root / "one_layer"), "--json"])
    assert doc.exit_code == 1
    parsed = json.loads(doc.output)
    assert parsed["ok"] is False and [p["kind"] for p in parsed["problems"]] == ["missing", "missing"]


def test_a_hub_name_differing_only_in_case_is_the_same_base(tmp_path: Path) -> None:
    """Hub ids compare case-insensitively (base_identity.repo_id), as merge and compose compare them."""
    from adapterkit.checking import check_modules

    cache = tmp_path / "models--Org--Tiny-Llama" / "snapshots" / "0123abc"
    save_base(tiny_llama(), cache)
    base = BaseModel.open(cache)
    recorded = {"name": "org/tiny-llama", "structure_digest": base.structure_digest}
    assert not [p for p in check_modules([], {}, recorded, base).problems if p.kind == "name"]
    other = {"name": "org/other-llama", "structure_digest": base.structure_digest}
    assert [p.kind for p in check_modules([], {}, other, base).problems] == ["name"]
