"""merge(): equal to PEFT's merge_and_unload, same shard layout, checks before writing, nothing left on failure."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    conv_input,
    load_peft,
    logits,
    make_lora,
    max_abs_diff,
    save_base,
    save_lora,
    tiny_conv_net,
    tiny_gpt2,
    tiny_llama,
)

from adapterkit.adapter.dtypes import parse_dtype
from adapterkit.adapter.model import Adapter
from adapterkit.base_model import INDEX_NAME, fingerprint
from adapterkit.errors import (
    AdapterkitError,
    BaseModelError,
    CompositionError,
    InvalidInputError,
    MergeError,
    UnsupportedAdapterError,
)
from adapterkit.files.safetensors import read_header
from adapterkit.formats.peft import read_adapter
from adapterkit.merging.plan import build_plan
from adapterkit.merging.streamed import merge

SHARD = "20KB"  # the tiny models then take 6 to 8 shards


@dataclass(frozen=True)
class Case:
    """A base model saved in shards, the model it was saved from, and PEFT adapter folders for it."""

    model: Any
    base: Path
    loras: dict[str, Path]


def _case(root: Path, model: Any, loras: dict[str, dict[str, Any]], shard: str | None = SHARD) -> Case:
    save_base(model, root / "base", max_shard_size=shard)
    folders = {name: save_lora(model, root / name, seed=i + 1, **kw) for i, (name, kw) in enumerate(loras.items())}
    return Case(model, root / "base", folders)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _case(
        tmp_path_factory.mktemp("llama"),
        tiny_llama(),
        {
            "attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            "mixed": dict(r=4, lora_alpha=7, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"]),
            # an embedding LoRA (PEFT also saves the embedding's base weight beside it) and the untied output layer
            "embed": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "o_proj"]),
        },
    )


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Case:
    # GPT-2's Conv1D layers store weights as (in, out) and have biases: PEFT sets fan_in_fan_out.
    return _case(
        tmp_path_factory.mktemp("gpt2"),
        tiny_gpt2(),
        {"conv1d": dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)},
    )


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _case(
        tmp_path_factory.mktemp("tied"),
        tiny_llama(tie_word_embeddings=True),
        {
            "head": dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]),
            "ensure": dict(r=4, lora_alpha=8, target_modules=["embed_tokens"], ensure_weight_tying=True),
        },
    )


def load_merged(path: Path, dtype: torch.dtype | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {})).eval()


def peft_merged(model: Any, folder: Path) -> Any:
    return load_peft(model, folder).merge_and_unload()


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


# --- equal to PEFT -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", ["attn", "mixed", "embed"])
def test_llama_merge_equals_peft_merge_and_unload(llama: Case, lora: str, tmp_path: Path) -> None:
    report = merge([read_adapter(llama.loras[lora])], None, llama.base, tmp_path / "out")
    expected = logits(peft_merged(llama.model, llama.loras[lora]))
    assert max_abs_diff(logits(load_merged(tmp_path / "out")), expected) <= 1e-5
    assert report.merged_tensors and not report.warnings
    assert max_abs_diff(expected, logits(llama.model)) > 1e-2  # the adapter does change the model


def test_gpt2_fan_in_fan_out_with_biases_equals_peft(gpt2: Case, tmp_path: Path) -> None:
    merge([read_adapter(gpt2.loras["conv1d"])], None, gpt2.base, tmp_path / "out")
    expected = logits(peft_merged(gpt2.model, gpt2.loras["conv1d"]))
    assert max_abs_diff(logits(load_merged(tmp_path / "out")), expected) <= 1e-5
    merged, base = tensors_of(tmp_path / "out"), tensors_of(gpt2.base)
    assert all(torch.equal(merged[k], base[k]) for k in base if k.endswith(".bias"))


def test_two_adapters_give_the_weighted_sum_of_their_deltas(llama: Case, tmp_path: Path) -> None:
    adapters = [read_adapter(llama.loras["attn"]), read_adapter(llama.loras["mixed"])]
    report = merge(adapters, [0.7, -0.3], llama.base, tmp_path / "out")
    merged, base = tensors_of(tmp_path / "out"), tensors_of(llama.base)
    expected = {k: v.double() for k, v in base.items()}
    for adapter, weight in zip(adapters, [0.7, -0.3], strict=True):
        for name in adapter.modules:
            expected[f"{name}.weight"] += weight * adapter.delta(name, torch.float64)
    assert set(report.merged_tensors) == {f"{n}.weight" for a in adapters for n in a.modules}
    for key, value in expected.items():
        assert max_abs_diff(merged[key], value) <= 1e-6, key
    # and PEFT running both adapters, weighted, then merging them agrees
    from adapterkit.merging.stacking import attach

    reference = attach(copy.deepcopy(llama.model), adapters, [0.7, -0.3]).merge_and_unload()
    assert max_abs_diff(logits(load_merged(tmp_path / "out")), logits(reference)) <= 1e-5


def test_weighted_merge_of_two_adapters_equals_peft_cat_then_merge_and_unload(llama: Case, tmp_path: Path) -> None:
    """PEFT itself as the reference for a weighted multi-adapter merge: both adapters loaded into one PeftModel,
    ``add_weighted_adapter(..., combination_type="cat")`` (PEFT's exact weighted sum, rank r1 + r2), then
    ``merge_and_unload``. The adapters differ in rank, alpha, rsLoRA and targets; one weight is negative.

    PEFT's cat gives the new adapter adapter 0's ``use_rslora`` with alpha = r, so with the rsLoRA adapter first
    its scaling would be sqrt(r) instead of 1 (a PEFT defect): the plain adapter goes first.
    """
    from peft import PeftModel

    folders, weights = [llama.loras["attn"], llama.loras["mixed"]], [0.7, -0.3]
    merge([read_adapter(f) for f in folders], weights, llama.base, tmp_path / "out")
    peft = PeftModel.from_pretrained(copy.deepcopy(llama.model), folders[0], adapter_name="a0")
    peft.load_adapter(folders[1], adapter_name="a1")
    peft.add_weighted_adapter(["a0", "a1"], weights, "blend", combination_type="cat")
    peft.set_adapter("blend")
    reference = peft.merge_and_unload().eval()
    ours = load_merged(tmp_path / "out")
    assert max_abs_diff(logits(ours), logits(reference)) <= 1e-5
    assert max_abs_diff(logits(reference), logits(llama.model)) > 0.1  # the blend changes the model
    expected = reference.state_dict()
    for key, value in tensors_of(tmp_path / "out").items():
        assert max_abs_diff(value, expected[key]) <= 1e-6, key


def test_bfloat16_base_matches_peft_within_bf16_rounding(llama: Case, tmp_path: Path) -> None:
    save_base(copy.deepcopy(llama.model).to(torch.bfloat16), tmp_path / "base16", max_shard_size=SHARD)
    adapter = read_adapter(llama.loras["embed"])
    report = merge([adapter], None, tmp_path / "base16", tmp_path / "out")
    assert report.dtype is None
    for info in read_header(next((tmp_path / "out").glob("*.safetensors"))).tensors.values():
        assert info.dtype == "BF16"
    # PEFT's own bf16 result: load the base in bf16, load the adapter, merge
    reference = peft_merged(load_merged(tmp_path / "base16", torch.bfloat16), llama.loras["embed"])
    ours = load_merged(tmp_path / "out", torch.bfloat16)
    theirs, base = reference.state_dict(), tensors_of(tmp_path / "base16")
    eps = torch.finfo(torch.bfloat16).eps
    for key, value in tensors_of(tmp_path / "out").items():
        exact = base[key].double()
        name = key.removesuffix(".weight")
        if name in adapter.modules:
            exact = exact + adapter.delta(name, torch.float64)
        # ours is the exact sum rounded once to bf16 ...
        assert ((value.double() - exact).abs() <= exact.abs() * eps / 2 * 1.001).all(), key
        # ... and PEFT's, which rounds the delta to bf16 first, is within one more rounding of it
        delta = (exact - base[key].double()).abs()
        assert ((value.double() - theirs[key].double()).abs() <= (exact.abs() + delta) * eps).all(), key
    assert max_abs_diff(logits(ours), logits(reference)) <= 0.05


def test_dtype_converts_every_float_tensor_and_the_config(llama: Case, tmp_path: Path) -> None:
    report = merge([read_adapter(llama.loras["attn"])], None, llama.base, tmp_path / "out", dtype="bf16")
    assert report.dtype == "BF16"
    for shard in (tmp_path / "out").glob("*.safetensors"):
        assert {info.dtype for info in read_header(shard).tensors.values()} == {"BF16"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors_of(tmp_path / "out").values())
    # every weight is PEFT's float32 merge rounded to bf16 (logits are not compared: a model cast with .to()
    # also rounds its rotary buffers, one loaded in bf16 does not)
    expected = peft_merged(llama.model, llama.loras["attn"]).to(torch.bfloat16).state_dict()
    merged = tensors_of(tmp_path / "out")
    assert set(merged) <= set(expected)
    for key, value in merged.items():
        assert torch.equal(value, expected[key]), key
    load_merged(tmp_path / "out", torch.bfloat16)  # transformers loads it


def test_single_file_base_gives_a_single_file(tmp_path: Path) -> None:
    model = tiny_llama(seed=3)
    save_base(model, tmp_path / "base")
    assert not (tmp_path / "base" / INDEX_NAME).exists()
    lora = save_lora(model, tmp_path / "lora", target_modules=["gate_proj", "up_proj"])
    merge([read_adapter(lora)], None, tmp_path / "base", tmp_path / "out")
    assert listing(tmp_path / "out") == listing(tmp_path / "base")
    assert max_abs_diff(logits(load_merged(tmp_path / "out")), logits(peft_merged(model, lora))) <= 1e-5


# --- tied embeddings ---------------------------------------------------------------------------------------------


def test_tied_output_layer_changes_the_shared_tensor_as_peft_does(tied: Case, tmp_path: Path) -> None:
    assert "lm_head.weight" not in fingerprint(tied.base).tensors  # transformers stored the tied weight once
    report = merge([read_adapter(tied.loras["head"])], None, tied.base, tmp_path / "out")
    assert "model.embed_tokens.weight" in report.merged_tensors
    assert len(report.warnings) == 1 and "lm_head" in report.warnings[0] and "both" in report.warnings[0]
    expected = logits(peft_merged(tied.model, tied.loras["head"]))
    assert max_abs_diff(logits(load_merged(tmp_path / "out")), expected) <= 1e-5


def test_ensure_weight_tying_adds_the_shared_delta_once(tied: Case, tmp_path: Path) -> None:
    adapter = read_adapter(tied.loras["ensure"])
    assert {"lm_head", "model.embed_tokens"} <= set(adapter.modules)  # PEFT saved the delta for both sides
    report = merge([adapter], None, tied.base, tmp_path / "out")
    assert report.merged_tensors == ["model.embed_tokens.weight"] and not report.warnings
    base = tensors_of(tied.base)["model.embed_tokens.weight"].double()
    merged = tensors_of(tmp_path / "out")["model.embed_tokens.weight"]
    assert max_abs_diff(merged, base + adapter.delta("model.embed_tokens", torch.float64)) <= 1e-5
    # the adapter as PEFT runs it unmerged (both sides changed once); PEFT's merge_and_unload adds it twice
    assert (
        max_abs_diff(logits(load_merged(tmp_path / "out")), logits(load_peft(tied.model, tied.loras["ensure"]))) <= 1e-4
    )


# --- layout ------------------------------------------------------------------------------------------------------


def test_layout_index_and_files_are_kept(llama: Case, tmp_path: Path) -> None:
    (llama_copy := tmp_path / "base").mkdir()
    for entry in llama.base.iterdir():
        shutil.copy(entry, llama_copy / entry.name)
    (llama_copy / "tokenizer.json").write_text('{"version": "1.0"}')
    (llama_copy / "pytorch_model.bin").write_bytes(b"stale unmerged weights")
    (llama_copy / "original").mkdir()
    adapter = read_adapter(llama.loras["attn"])
    report = merge([adapter], None, llama_copy, tmp_path / "out")
    out = tmp_path / "out"
    assert listing(out) == sorted(set(listing(llama_copy)) - {"pytorch_model.bin", "original"})
    assert report.skipped_files == ["original/", "pytorch_model.bin"]
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (llama_copy / name).read_bytes()
    source_index = json.loads((llama_copy / INDEX_NAME).read_text())
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["weight_map"] == source_index["weight_map"]
    assert index["metadata"]["total_size"] == source_index["metadata"]["total_size"]
    assert report.shards == len(set(index["weight_map"].values())) > 3
    assert report.structure_digest == report.base_structure_digest
    changed = set(report.merged_tensors)
    for shard in sorted(set(index["weight_map"].values())):
        src, dst = read_header(llama_copy / shard), read_header(out / shard)
        assert dst.metadata == {"format": "pt"}
        assert list(dst.tensors) == sorted(src.tensors, key=lambda n: src.tensors[n].begin)  # source order
        src_bytes, dst_bytes = (llama_copy / shard).read_bytes(), (out / shard).read_bytes()
        for name, info in src.tensors.items():
            a = src_bytes[src.data_start + info.begin : src.data_start + info.end]
            b = dst_bytes[dst.data_start + dst.tensors[name].begin : dst.data_start + dst.tensors[name].end]
            assert (a == b) == (name not in changed), name  # untouched tensors are copied byte for byte


def test_progress_is_called_per_tensor(llama: Case, tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    merge([read_adapter(llama.loras["attn"])], None, llama.base, tmp_path / "out", progress=lambda *a: calls.append(a))
    names = [name for _, _, name in calls]
    assert sorted(names) == sorted(fingerprint(llama.base).tensors)
    assert [done for done, _, _ in calls] == sorted(done for done, _, _ in calls)
    assert (
        calls[-1][0]
        == calls[-1][1]
        == sum(os.path.getsize(p) for p in (tmp_path / "out").glob("*.safetensors"))
        - sum(read_header(p).data_start for p in (tmp_path / "out").glob("*.safetensors"))
    )


def test_plan_reports_without_writing(
    llama: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, snapshot: Any
) -> None:
    """plan_merge (and merge --dry-run) open nothing for writing, anywhere, and leave the base as it was."""
    import builtins
    import io

    adapter = read_adapter(llama.loras["mixed"])
    writes: list[str] = []
    real_os_open, real_open = os.open, builtins.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & write_flags:
            writes.append(f"os.open({path!r}, {flags:#o})")
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+"):
            writes.append(f"open({file!r}, {mode!r})")
        return real_open(file, mode, *args, **kwargs)

    before = snapshot(llama.base)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    plan = build_plan([adapter], [0.5], llama.base)
    monkeypatch.undo()
    assert writes == []
    assert snapshot(llama.base) == before and list(tmp_path.iterdir()) == []
    assert sorted(plan.targets) == sorted(f"{n}.weight" for n in adapter.modules)
    assert plan.weights == [0.5] and plan.total_bytes > 0

    from click.testing import CliRunner

    from adapterkit import Store
    from adapterkit.cli import cli

    store = Store(tmp_path / "store")
    store.add(llama.loras["mixed"], "mixed")
    stored = snapshot(store.root)
    out = tmp_path / "out"
    args = ["--store", str(store.root), "merge", "mixed", "-w", "0.5", "--base", str(llama.base), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not out.exists() and snapshot(store.root) == stored and snapshot(llama.base) == before


# --- refusals: clear error, nothing written ----------------------------------------------------------------------


def assert_refused(
    error: type[Exception], match: str, adapters: list[Adapter], base: Path, out: Path, **kwargs: Any
) -> str:
    before = listing(out.parent)
    with pytest.raises(error, match=match) as info:
        merge(adapters, kwargs.pop("weights", None), base, out, **kwargs)
    assert listing(out.parent) == before  # no out_dir, no temporary folder
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_wrong_base_fingerprint_is_refused_unless_forced(llama: Case, tmp_path: Path) -> None:
    adapter = read_adapter(llama.loras["attn"])
    adapter.metadata = {"base_model": {"name": "x", "structure_digest": "sha256:" + "0" * 64}}
    assert_refused(BaseModelError, "fingerprints differ.*--force", [adapter], llama.base, tmp_path / "out")
    merge([adapter], None, llama.base, tmp_path / "out", force=True)
    assert (tmp_path / "out" / INDEX_NAME).is_file()


def test_stored_adapter_with_matching_fingerprint_merges(llama: Case, store: Any, tmp_path: Path) -> None:
    store.add(llama.loras["attn"], "attn:v1", base=llama.base)
    adapter = store.get("attn:v1")
    assert adapter.metadata["base_model"]["structure_digest"] == fingerprint(llama.base).structure_digest
    report = merge([adapter], None, llama.base, tmp_path / "out")
    assert report.adapters == [adapter.digest]


def test_missing_shard_is_refused(llama: Case, tmp_path: Path) -> None:
    base = Path(shutil.copytree(llama.base, tmp_path / "base"))
    shard = sorted(base.glob("model-*.safetensors"))[2]
    shard.unlink()
    assert_refused(BaseModelError, shard.name, [read_adapter(llama.loras["attn"])], base, tmp_path / "out")


@pytest.mark.parametrize("damage", ["header-length", "header-json", "truncated"])
def test_corrupt_shard_is_refused(llama: Case, tmp_path: Path, damage: str) -> None:
    base = Path(shutil.copytree(llama.base, tmp_path / "base"))
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    if damage == "header-length":
        data[:8] = struct.pack("<Q", 1 << 40)
    elif damage == "header-json":
        data[8:12] = b"!!!!"
    else:
        del data[-10:]
    shard.write_bytes(bytes(data))
    assert_refused(BaseModelError, shard.name, [read_adapter(llama.loras["attn"])], base, tmp_path / "out")


def test_existing_out_dir_is_refused_and_left_alone(llama: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    with pytest.raises(InvalidInputError, match="already exists"):
        merge([read_adapter(llama.loras["attn"])], None, llama.base, out)
    assert listing(tmp_path) == before and listing(out) == ["keep.txt"]


def test_targets_missing_from_the_base_are_refused(llama: Case, gpt2: Case, tmp_path: Path) -> None:
    message = assert_refused(
        BaseModelError, "no weight for module", [read_adapter(gpt2.loras["conv1d"])], llama.base, tmp_path / "out"
    )
    assert "transformer.h.0.attn.c_attn" in message


def test_shape_mismatch_is_refused(llama: Case, tmp_path: Path) -> None:
    other = tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    save_base(other, tmp_path / "other")
    assert_refused(
        BaseModelError,
        r"is \[48, 48\] but module",
        [read_adapter(llama.loras["attn"])],
        tmp_path / "other",
        tmp_path / "out",
    )


@pytest.mark.parametrize(
    ("field", "value"), [("layer_replication", [[0, 1], [1, 2]]), ("use_qalora", True), ("init_lora_weights", "pissa")]
)
def test_adapters_whose_change_merge_cannot_know_are_refused(
    llama: Case, tmp_path: Path, field: str, value: object
) -> None:
    """DoRA, lora_bias and the tensors PEFT merges are merged (tests/test_merge_variants.py); these are not."""
    adapter = read_adapter(llama.loras["attn"])
    adapter.config = {**adapter.config, field: value}
    assert_refused(UnsupportedAdapterError, repr(field), [adapter], llama.base, tmp_path / "out")


def test_an_embedding_copy_that_differs_from_the_base_is_refused(llama: Case, tmp_path: Path) -> None:
    adapter = read_adapter(llama.loras["embed"])
    key = next(k for k in adapter.extra_tensors if k.endswith("embed_tokens.base_layer.weight"))
    adapter.extra_tensors[key] = adapter.extra_tensors[key] + 1
    assert_refused(UnsupportedAdapterError, "differs from the base", [adapter], llama.base, tmp_path / "out")


def test_bad_arguments_are_refused(llama: Case, tmp_path: Path) -> None:
    adapter = read_adapter(llama.loras["attn"])
    out = tmp_path / "out"
    assert_refused(CompositionError, "2 weights for 1", [adapter], llama.base, out, weights=[1, 2])
    assert_refused(CompositionError, "finite", [adapter], llama.base, out, weights=[float("nan")])
    assert_refused(CompositionError, "at least one", [], llama.base, out)
    assert_refused(InvalidInputError, "dtype 'int8'", [adapter], llama.base, out, dtype="int8")
    assert_refused(InvalidInputError, "device", [adapter], llama.base, out, device="nonsense")
    assert_refused(BaseModelError, "not a directory", [adapter], tmp_path / "nowhere", out)


def test_an_interrupted_merge_leaves_nothing(llama: Case, tmp_path: Path) -> None:
    calls = []

    def interrupt(done: int, total: int, name: str) -> None:
        calls.append(name)
        if len(calls) == 10:
            raise KeyboardInterrupt

    before = listing(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        merge([read_adapter(llama.loras["attn"])], None, llama.base, tmp_path / "out", progress=interrupt)
    assert listing(tmp_path) == before


def test_a_write_failure_is_reported_and_cleaned_up(llama: Case, tmp_path: Path, monkeypatch: Any) -> None:
    import adapterkit.merging.streamed as merging

    def full(*_args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merging, "_write_index", full)
    before = listing(tmp_path)
    with pytest.raises(AdapterkitError, match="No space left"):
        merge([read_adapter(llama.loras["attn"])], None, llama.base, tmp_path / "out")
    assert listing(tmp_path) == before


def test_lora_on_a_fresh_peft_model_matches_too(llama: Case, tmp_path: Path) -> None:
    """A multi-layer adapter from get_peft_model directly (not a reloaded folder) gives the same merge."""
    peft_model = make_lora(llama.model, seed=9, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    peft_model.save_pretrained(tmp_path / "lora")
    merge([read_adapter(tmp_path / "lora")], None, llama.base, tmp_path / "out")
    assert max_abs_diff(logits(load_merged(tmp_path / "out")), logits(peft_model.merge_and_unload())) <= 1e-5


def test_conv_layers_of_a_custom_model_match_peft(tmp_path: Path) -> None:
    """Conv2d (3x3 and 1x1), Conv1d and Linear weights are updated through their (out, in * kernel) rows."""
    from safetensors.torch import save_file

    model = tiny_conv_net()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    peft_model = make_lora(model, r=4, lora_alpha=8, target_modules=["conv", "pointwise", "temporal", "head"])
    peft_model.save_pretrained(tmp_path / "lora")
    report = merge([read_adapter(tmp_path / "lora")], [0.5], tmp_path / "base", tmp_path / "out")
    assert len(report.merged_tensors) == 4
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ("conv", "pointwise", "temporal", "head"):
            lora = getattr(peft_model.base_model.model, layer)
            getattr(reference, layer).weight += 0.5 * lora.get_delta_weight("default")
    merged = tensors_of(tmp_path / "out")
    for key, value in reference.state_dict().items():
        assert max_abs_diff(merged[key], value) <= 1e-6, key
    assert max_abs_diff(model.forward(conv_input()), peft_model.forward(conv_input())) > 1e-3  # it does change


@pytest.mark.parametrize(
    ("given", "code"),
    [(None, None), ("auto", None), ("bf16", "BF16"), ("float16", "F16"), (torch.float32, "F32"), ("F64", "F64")],
)
def test_dtype_names(given: Any, code: str | None) -> None:
    assert parse_dtype(given) == code


def test_trained_base_biases_at_another_weight_are_refused_naming_the_field(gpt2: Case, tmp_path: Path) -> None:
    folder = save_lora(gpt2.model, tmp_path / "lora", target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    adapter = read_adapter(folder)
    assert_refused(
        UnsupportedAdapterError, "field 'bias' is 'all'.*weight 1 only", [adapter], gpt2.base, tmp_path / "out",
        weights=[0.5],
    )  # fmt: skip


def test_a_failure_in_the_writer_thread_is_reported_and_cleaned_up(
    llama: Case, tmp_path: Path, monkeypatch: Any
) -> None:
    import adapterkit.merging.shard_writer as shard_writer

    real, calls = shard_writer.SequentialFile.write, []

    def flaky(self: Any, data: Any) -> None:
        calls.append(self)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        real(self, data)

    monkeypatch.setattr(shard_writer.SequentialFile, "write", flaky)
    before = listing(tmp_path)
    with pytest.raises(MergeError, match="No space left"):
        merge([read_adapter(llama.loras["mixed"])], None, llama.base, tmp_path / "out")
    assert listing(tmp_path) == before


def test_a_failure_in_a_compute_worker_is_reported_and_cleaned_up(
    llama: Case, tmp_path: Path, monkeypatch: Any
) -> None:
    import adapterkit.merging.shard_writer as shard_writer

    real, calls = shard_writer.pread_exact, []

    def shrinking(fd: int, into: Any, offset: int, what: str) -> None:
        calls.append(what)
        if len(calls) == 4:
            raise EOFError(f"{what}: the file ended early (it changed while being read)")
        real(fd, into, offset, what)

    monkeypatch.setattr(shard_writer, "pread_exact", shrinking)
    before = listing(tmp_path)
    with pytest.raises(MergeError, match="it changed while being read"):
        merge([read_adapter(llama.loras["mixed"])], None, llama.base, tmp_path / "out")
    assert listing(tmp_path) == before


def test_the_output_does_not_depend_on_how_many_workers_compute_it(
    llama: Case, tmp_path: Path, monkeypatch: Any
) -> None:
    """Blocks computed out of order by several threads are written in order: byte-identical shards."""
    import adapterkit.merging.shard_writer as shard_writer

    monkeypatch.setattr(shard_writer, "BLOCK_ELEMENTS", 64)  # many blocks per tensor
    outputs = []
    for workers in (1, 3):
        monkeypatch.setattr(shard_writer, "_workers", lambda device, n=workers: n)
        out = tmp_path / f"out-{workers}"
        merge([read_adapter(llama.loras["mixed"])], [0.8], llama.base, out)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]


def test_a_zero_weight_adapter_changes_nothing_and_is_not_counted(llama: Case, tmp_path: Path) -> None:
    attn, mixed = read_adapter(llama.loras["attn"]), read_adapter(llama.loras["mixed"])
    both = merge([attn, mixed], [1.0, 0.0], llama.base, tmp_path / "both")
    alone = merge([attn], [1.0], llama.base, tmp_path / "alone")
    assert both.merged_tensors == alone.merged_tensors
    assert tensors_of(tmp_path / "both").keys() == tensors_of(tmp_path / "alone").keys()
    for path in (tmp_path / "alone").glob("*.safetensors"):
        assert (tmp_path / "both" / path.name).read_bytes() == path.read_bytes()


def test_every_file_is_flushed_before_the_folder_is_published(llama: Case, tmp_path: Path, monkeypatch: Any) -> None:
    """A power cut after the rename must not leave an empty config.json or index in a published model."""
    real_fsync, real_rename, synced, published = os.fsync, os.rename, set(), []

    def fsync(fd: int) -> None:
        synced.add(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        published.append(sorted(p.name for p in Path(src).iterdir() if p.is_file()))
        assert set(published[-1]) <= synced, set(published[-1]) - synced
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    merge([read_adapter(llama.loras["attn"])], None, llama.base, tmp_path / "out")
    assert published and "config.json" in published[0] and "model.safetensors.index.json" in published[0]


def test_direct_and_buffered_writing_give_the_same_files(llama: Case, tmp_path: Path, monkeypatch: Any) -> None:
    import adapterkit.merging.shard_writer as shard_writer

    outputs = []
    for direct in (True, False):
        monkeypatch.setattr(shard_writer, "_DIRECT_IO", direct)
        out = tmp_path / f"out-{direct}"
        merge([read_adapter(llama.loras["attn"]), read_adapter(llama.loras["mixed"])], [0.7, -0.3], llama.base, out)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("failing", ["pwrite", "write", "preadv"])
def test_an_io_error_anywhere_in_the_pipeline_fails_cleanly(
    llama: Case, tmp_path: Path, monkeypatch: Any, failing: str
) -> None:
    """Disk full on the background writes or the first write, or a read error: a MergeError, no hang, no leak."""
    import threading

    import adapterkit.files.sequential as sequential_file
    import adapterkit.merging.shard_writer as shard_writer

    monkeypatch.setattr(shard_writer, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(sequential_file, "_STAGING", 2 * 4096)  # many disk writes per shard
    real, calls = getattr(os, failing), []

    def flaky(*args: Any) -> Any:
        calls.append(args[0])
        if len(calls) == 3:
            raise OSError(28 if failing != "preadv" else 5, "No space left" if failing != "preadv" else "I/O error")
        return real(*args)

    adapter = read_adapter(llama.loras["mixed"])
    before, fds = listing(tmp_path), set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, failing, flaky)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            merge([adapter], None, llama.base, tmp_path / "out")
            outcome.append(None)
        except BaseException as exc:  # reported below, in the test's thread
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    monkeypatch.undo()
    assert not worker.is_alive(), "merge hung"
    assert isinstance(outcome[0], MergeError), outcome
    assert listing(tmp_path) == before
    assert set(os.listdir("/proc/self/fd")) <= fds
