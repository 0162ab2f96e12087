"""GGUF LoRA export, checked by a real llama.cpp against PEFT's logits.

Each case builds a tiny Hugging Face model, writes it as a base GGUF (tests/llamacpp.py), exports a
stored adapter with adapterkit, applies it in llama.cpp (``llama_adapter_lora_init``) and compares
every position's logits with those of PEFT on the same base and adapter. Float32 throughout; the
acceptance bound is a max relative error of 1e-3 (what is reached is printed, about 1e-6).

The llama.cpp binding (llama-cpp-python) is a dev dependency: in CI (``CI`` set) a missing binding
fails these tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_lora, save_base, tiny_llama
from llamacpp import LlamaCpp, max_rel_error, tiny_causal_lm, write_base_gguf

from adapterkit import Store, compose
from adapterkit.errors import ExportError
from adapterkit.formats import gguf as gguf_format
from adapterkit.formats.gguf import GgufFormat
from adapterkit.formats.peft import read_adapter, write_adapter

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PLAIN = dict(r=8, lora_alpha=16, target_modules=ALL_PROJ)
#: rsLoRA with rank and alpha patterns (keys in sorted order, as PEFT saves and reloads them).
PATTERNED = dict(
    r=8,
    lora_alpha=16,
    use_rslora=True,
    target_modules=ALL_PROJ,
    rank_pattern={"k_proj": 2, r"layers\.1\..*": 6, "q_proj": 4},
    alpha_pattern={"down_proj": 40, "v_proj": 3.5},
)
SEQUENCES = [[1, 5, 77, 200, 3, 9, 150, 287, 42, 18], [1, 260, 261, 262, 100, 101, 7], list(range(3, 60, 4))]
BOUND = 1e-3


@pytest.fixture(scope="module")
def binding() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the llama.cpp binding (llama-cpp-python, a dev dependency) is missing: {exc}")
        pytest.skip(f"llama-cpp-python is not installed ({exc})")


class Bases:
    """Tiny bases by architecture, each saved (safetensors), written as GGUF and loaded in llama.cpp once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, tuple[Any, Path, LlamaCpp]] = {}

    def get(self, arch: str) -> tuple[Any, Path, LlamaCpp]:
        if arch not in self.built:
            model = tiny_causal_lm(arch)
            folder = save_base(model, self.root / arch)
            runtime = LlamaCpp(write_base_gguf(model, self.root / f"{arch}.gguf"))
            self.built[arch] = (model, folder, runtime)
        return self.built[arch]

    def close(self) -> None:
        for _, _, runtime in self.built.values():
            runtime.close()


@pytest.fixture(scope="module")
def bases(binding: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bases]:
    made = Bases(tmp_path_factory.mktemp("gguf-bases"))
    yield made
    made.close()


def _peft_logits(model: Any, folder: Path) -> list[np.ndarray]:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    with torch.no_grad():
        return [peft_model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in SEQUENCES]


def _base_logits(model: Any) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in SEQUENCES]


def _compare(runtime: LlamaCpp, gguf_file: Path, model: Any, peft_folder: Path, label: str) -> float:
    """Max relative error of llama.cpp's logits against PEFT's, over every sequence; checks the LoRA matters."""
    want = _peft_logits(model, peft_folder)
    got = [runtime.logits(ids, adapter=gguf_file) for ids in SEQUENCES]
    error = max(max_rel_error(g, w) for g, w in zip(got, want, strict=True))
    moved = max(max_rel_error(w, b) for w, b in zip(want, _base_logits(model), strict=True))
    print(f"\n{label}: llama.cpp vs PEFT max relative error {error:.2e} (the adapter moves the logits by {moved:.2f})")
    assert moved > 0.1, "the adapter barely changes the logits: the comparison would prove nothing"
    return error


def _export(store: Store, ref: str, dest: Path, base: Path, **options: Any) -> Any:
    return GgufFormat().write(store.get(ref), dest, base=base, **options)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_plain_adapter_matches_peft_in_llama_cpp(bases: Bases, arch: str, tmp_path: Path) -> None:
    model, base, runtime = bases.get(arch)
    assert (
        max(max_rel_error(runtime.logits(ids), w) for ids, w in zip(SEQUENCES, _base_logits(model), strict=True))
        < BOUND
    )
    make_lora(model, seed=1, **PLAIN).save_pretrained(tmp_path / "lora")
    store = Store(tmp_path / "store")
    store.add(tmp_path / "lora", "plain:1")
    result = _export(store, "plain:1", tmp_path / "out", base)
    assert result.files == [tmp_path / "out" / "adapter.gguf"]
    certificate = result.details["certificate"]
    assert certificate["max_rel_diff"] == 0.0  # scaling 2 folds into B exactly
    assert len(certificate["modules"]) == 2 * len(ALL_PROJ)
    assert _compare(runtime, result.files[0], model, tmp_path / "lora", f"{arch} plain") <= BOUND
    assert runtime.adapter_meta(result.files[0], "general.architecture") == gguf_format.ARCHITECTURES[arch][0]
    assert runtime.adapter_meta(result.files[0], "adapter.type") == "lora"
    assert float(runtime.adapter_meta(result.files[0], "adapter.lora.alpha") or "nan") == 0.0


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_rslora_with_rank_and_alpha_patterns_matches_peft(bases: Bases, arch: str, tmp_path: Path) -> None:
    model, base, runtime = bases.get(arch)
    make_lora(model, seed=2, **PATTERNED).save_pretrained(tmp_path / "lora")
    store = Store(tmp_path / "store")
    store.add(tmp_path / "lora", "patterned:1")
    adapter = store.get("patterned:1")
    assert len({m.spec.scaling for m in adapter.modules.values()}) >= 4  # no single alpha could serve them
    result = _export(store, "patterned:1", tmp_path / "out.gguf", base)
    assert result.path == tmp_path / "out.gguf" and result.files == [tmp_path / "out.gguf"]
    assert 0.0 < result.details["certificate"]["max_rel_diff"] < 1e-6  # float32 rounding of the folded scalings
    assert _compare(runtime, result.files[0], model, tmp_path / "lora", f"{arch} rsLoRA + patterns") <= BOUND


def test_svd_blend_with_a_negative_weight_matches_peft(bases: Bases, tmp_path: Path) -> None:
    model, base, runtime = bases.get("LlamaForCausalLM")
    make_lora(model, seed=1, **PLAIN).save_pretrained(tmp_path / "plain")
    make_lora(model, seed=2, **PATTERNED).save_pretrained(tmp_path / "patterned")
    blend = compose(
        [read_adapter(tmp_path / "plain"), read_adapter(tmp_path / "patterned")], [0.8, -0.6], "svd", rank=6
    )
    store = Store(tmp_path / "store")
    store.put(blend, "blend:svd")
    write_adapter(store.get("blend:svd"), tmp_path / "blend")  # PEFT's view of the same blend: the oracle
    result = _export(store, "blend:svd", tmp_path / "out", base)
    assert result.details["certificate"]["max_rel_diff"] < 1e-6
    assert _compare(runtime, result.files[0], model, tmp_path / "blend", "svd blend 0.8/-0.6") <= BOUND


def test_embedding_and_output_layer_loras(bases: Bases, tmp_path: Path) -> None:
    """token_embd.lora_a goes in transposed (llama.cpp gathers its rows by token); output is a plain linear."""
    model, base, runtime = bases.get("LlamaForCausalLM")
    make_lora(model, seed=3, r=4, lora_alpha=12, target_modules=["embed_tokens", "lm_head", "q_proj"]).save_pretrained(
        tmp_path / "lora"
    )
    store = Store(tmp_path / "store")
    store.add(tmp_path / "lora", "emb:1")
    assert store.get("emb:1").extra_tensors  # PEFT saved the embedding's base layer beside it; left out
    result = _export(store, "emb:1", tmp_path / "out", base)
    assert result.details["certificate"]["max_rel_diff"] < 1e-7  # scaling 3 folded into float32 B
    assert _compare(runtime, result.files[0], model, tmp_path / "lora", "embed_tokens + lm_head + q_proj") <= BOUND


@pytest.mark.parametrize(("dtype", "certificate_bound", "logits_bound"), [("f16", 1e-3, 3e-2), ("bf16", 8e-3, 1e-1)])
def test_half_precision_exports(
    bases: Bases, tmp_path: Path, dtype: str, certificate_bound: float, logits_bound: float
) -> None:
    """The certificate reports the rounding of the factors; llama.cpp then computes the LoRA in half precision
    too (activations rounded to the weights' type), which costs more than the factors' rounding."""
    model, base, runtime = bases.get("LlamaForCausalLM")
    make_lora(model, seed=2, **PATTERNED).save_pretrained(tmp_path / "lora")
    store = Store(tmp_path / "store")
    store.add(tmp_path / "lora", "p:1")
    result = _export(store, "p:1", tmp_path / "out", base, dtype=dtype)
    rel = result.details["certificate"]["max_rel_diff"]
    print(f"\n{dtype}: certificate max relative difference {rel:.2e}")
    assert 0.0 < rel < certificate_bound
    assert result.details["dtype"] == dtype
    error = _compare(runtime, result.files[0], model, tmp_path / "lora", f"{dtype} rsLoRA + patterns")
    assert error < logits_bound


def test_without_the_q_k_permutation_llama_cpp_would_be_wrong(
    bases: Bases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the permutation is for: the same export without it loads and gives wrong logits."""
    model, base, runtime = bases.get("LlamaForCausalLM")
    make_lora(model, seed=1, **PLAIN).save_pretrained(tmp_path / "lora")
    store = Store(tmp_path / "store")
    store.add(tmp_path / "lora", "plain:1")
    monkeypatch.setitem(gguf_format.ARCHITECTURES, "LlamaForCausalLM", ("llama", False))
    result = _export(store, "plain:1", tmp_path / "out", base)
    assert result.details["certificate"]["max_rel_diff"] == 0.0  # the certificate reads back what was meant...
    assert _compare(runtime, result.files[0], model, tmp_path / "lora", "unpermuted q/k") > 100 * BOUND  # ...not so


# -- what a GGUF LoRA cannot hold, and other refusals (no llama.cpp needed) --------------------------------------


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    root = tmp_path_factory.mktemp("gguf-refusals")
    model = tiny_llama(seed=0)
    model.config.architectures = ["LlamaForCausalLM"]
    return model, save_base(model, root / "base")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(use_dora=True), r"GGUF LoRA cannot hold DoRA magnitudes \(model\.layers\.0\.self_attn\.q_proj, "),
        (
            dict(modules_to_save=["lm_head"]),
            r"GGUF LoRA cannot hold full module copies \(modules_to_save\) \(lm_head\)$",
        ),
        (
            dict(lora_bias=True),
            r"GGUF LoRA cannot hold LoRA biases \(lora_bias\) \(model\.layers\.0\.self_attn\.q_proj",
        ),
        (dict(trainable_token_indices=[1, 2]), r"GGUF LoRA cannot hold trainable tokens \(model\.embed_tokens\)$"),
    ],
    ids=["dora", "modules_to_save", "lora_bias", "trainable_tokens"],
)
def test_refuses_what_gguf_cannot_hold(
    llama_base: tuple[Any, Path], tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    model, base = llama_base
    make_lora(model, seed=1, **kwargs).save_pretrained(tmp_path / "lora")
    with pytest.raises(ExportError, match=message):
        GgufFormat().write(read_adapter(tmp_path / "lora"), tmp_path / "out", base=base)
    assert not (tmp_path / "out").exists()


def test_refuses_a_tied_output_layer(tmp_path: Path) -> None:
    model = tiny_llama(seed=0, tie_word_embeddings=True)
    save_base(model, tmp_path / "base")
    make_lora(model, seed=1, target_modules=["lm_head"]).save_pretrained(tmp_path / "lora")
    with pytest.raises(ExportError, match=r"module 'lm_head': the base ties its output layer to the input embedding"):
        GgufFormat().write(read_adapter(tmp_path / "lora"), tmp_path / "out", base=tmp_path / "base")


def test_refuses_an_architecture_llama_cpp_does_not_map(llama_base: tuple[Any, Path], tmp_path: Path) -> None:
    model, base = llama_base
    make_lora(model, seed=1).save_pretrained(tmp_path / "lora")
    other = tmp_path / "base"
    other.mkdir()
    for item in base.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"architecture 'GPT2LMHeadModel' is not one adapterkit exports to GGUF"):
        GgufFormat().write(read_adapter(tmp_path / "lora"), tmp_path / "out", base=other)


def test_needs_a_base_and_a_free_destination(llama_base: tuple[Any, Path], tmp_path: Path) -> None:
    model, base = llama_base
    make_lora(model, seed=1).save_pretrained(tmp_path / "lora")
    adapter = read_adapter(tmp_path / "lora")
    with pytest.raises(ExportError, match=r"GGUF export needs the base model folder \(--base BASE_DIR\)"):
        GgufFormat().write(adapter, tmp_path / "out")
    with pytest.raises(ValueError, match=r"parameter 'dtype' must be one of 'f32', 'f16', 'bf16', got 'f8'"):
        GgufFormat().write(adapter, tmp_path / "out", base=base, dtype="f8")
    (tmp_path / "taken.gguf").write_bytes(b"x")
    with pytest.raises(ExportError, match=r"taken\.gguf: already exists"):
        GgufFormat().write(adapter, tmp_path / "taken.gguf", base=base)
    assert (tmp_path / "taken.gguf").read_bytes() == b"x"
    result = GgufFormat().write(adapter, tmp_path / "new", base=base)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["adapter.gguf"]  # no temporary file left
    assert result.details["certificate"]["max_rel_diff"] == 0.0


def test_cli_export_gguf_prints_the_certificate(llama_base: tuple[Any, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from adapterkit.cli import cli

    model, base = llama_base
    make_lora(model, seed=1, r=4, lora_alpha=12).save_pretrained(tmp_path / "lora")
    runner = CliRunner()
    home = ["--store", str(tmp_path / "store")]
    added = runner.invoke(cli, [*home, "add", str(tmp_path / "lora"), "-t", "a:1"])
    assert added.exit_code == 0, added.output
    out = runner.invoke(cli, [*home, "export", "a:1", str(tmp_path / "out"), "--format", "gguf", "--base", str(base)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].endswith(f" to {tmp_path / 'out'}")
    assert lines[1].startswith("certificate: 4 modules re-read, largest relative difference ")
    doc = runner.invoke(
        cli,
        [
            *home,
            "export",
            "a:1",
            str(tmp_path / "out16.gguf"),
            "--format",
            "gguf",
            "--base",
            str(base),
            "--dtype",
            "f16",
        ],
    )
    assert doc.exit_code == 0, doc.output
    as_json = runner.invoke(
        cli, [*home, "export", "a:1", str(tmp_path / "j"), "--format", "gguf", "--base", str(base), "--json"]
    )
    result = json.loads(as_json.output)
    assert result["architecture"] == "llama" and result["dtype"] == "f32" and result["format"] == "gguf"
    assert result["written"] == [str(tmp_path / "j" / "adapter.gguf")]
    assert set(result["certificate"]["modules"]) == set(store_modules(tmp_path / "lora"))
    refused = runner.invoke(cli, [*home, "export", "a:1", str(tmp_path / "x"), "--format", "gguf"])
    assert refused.exit_code == 1
    assert refused.output.splitlines()[-1] == (
        "Error: GGUF export needs the base model folder (--base BASE_DIR): llama.cpp names tensors by it"
    )


def store_modules(folder: Path) -> list[str]:
    return list(read_adapter(folder).modules)
