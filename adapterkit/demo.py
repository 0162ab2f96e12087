"""``adapterkit demo``: the whole workflow on a tiny model, built on the spot (nothing downloaded).

It builds a 2-layer Llama-style base model and trains nothing: two LoRA adapters get random
factors from PEFT, which is enough to show every step and to check the one promise that matters,
that what comes out of the store is the adapter that went in (same logits through PEFT).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import adapterkit

__all__ = ["DEMO_BASE_NAME", "run_demo"]

#: What PEFT records as ``base_model_name_or_path`` for the demo's adapters.
DEMO_BASE_NAME = "adapterkit-demo/tiny-llama"


def _tiny_base() -> object:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        name_or_path=DEMO_BASE_NAME,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def _lora(base: object, seed: int, **kwargs: object) -> object:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **kwargs)  # random B too, so the adapter changes the model
    return get_peft_model(copy.deepcopy(base), config).eval()


def _logits(model: object) -> object:
    import torch

    ids = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[operator]


def run_demo(workdir: Path | None = None, *, echo: Callable[[str], None] = print) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and PEFT's deprecation chatter is not the demo's story
        return _run(workdir, echo)


def _run(workdir: Path | None, echo: Callable[[str], None]) -> Path:
    import torch
    from peft import PeftModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="adapterkit-demo-"))
    if root.is_dir() and any(root.iterdir()):
        raise adapterkit.InvalidInputError(f"{root}: not empty; the demo builds its files in a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    echo(f"working in {root}")

    base = _tiny_base()
    base_dir = root / "base"
    base.save_pretrained(base_dir, max_shard_size="200KB")  # type: ignore[attr-defined]
    shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    echo(f"built a tiny Llama base model: {len(shards)} safetensors shards in {base_dir}")

    adapters = {
        "demo/summarize": _lora(base, 1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "demo/translate": _lora(
            base, 2, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"]
        ),
    }
    store = adapterkit.Store(root / "store")
    for name, model in adapters.items():
        folder = root / name.replace("/", "-")
        model.save_pretrained(folder)  # type: ignore[attr-defined]
        result = store.add(folder, f"{name}:v1", base=base_dir)
        echo(
            f"added {result.ref}: {result.digest[:19]}  {result.info['num_modules']} modules, "
            f"{result.info['num_parameters']:,} parameters, {result.new_bytes:,} new bytes"
        )
    again = store.add(root / "demo-summarize", "demo/summarize:v1", base=base_dir)
    echo(f"re-added demo/summarize: same digest {again.digest[:19]}, {again.new_bytes} new bytes")

    echo("store contents:")
    for item in store.list():
        echo(f"  {', '.join(item['refs'])}  r={item['r']}  {item['num_modules']} modules  {item['size']:,} bytes")

    worst = 0.0
    for name, model in adapters.items():
        exported = store.export(f"{name}:v1", root / "exported" / name.replace("/", "-")).path
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), exported).eval()
        diff = (_logits(loaded) - _logits(model)).abs().max().item()  # type: ignore[operator]
        worst = max(worst, diff)
        echo(f"exported {name}:v1 to {exported}; PEFT loads it, max |logit diff| vs the original = {diff:.1e}")
    if worst > 1e-6:
        raise SystemExit(f"demo failed: exported adapters differ from the originals by {worst}")

    parents = [store.get(f"{name}:v1") for name in adapters]
    blend = adapterkit.compose(parents, [0.7, -0.3], "linear")
    stored = store.put(blend, "demo/blend:linear")
    exact = max(
        (blend.delta(n) - sum(w * p.delta(n) for p, w in zip(parents, (0.7, -0.3), strict=True) if n in p.modules))
        .abs()
        .max()
        .item()
        for n in blend.modules
    )
    echo(
        f"composed 0.7 x summarize - 0.3 x translate (linear, exact): {stored.ref} {stored.digest[:19]}, "
        f"module ranks {stored.info['ranks'][0]}-{stored.info['ranks'][-1]}, max |delta - weighted sum| = {exact:.1e}"
    )
    compressed = adapterkit.compose(parents, [0.7, -0.3], "svd", rank=4)
    stored = store.put(compressed, "demo/blend:svd4")
    errors = compressed.metadata["lineage"]["truncation_error"]
    echo(
        f"composed the same blend truncated to rank 4 (svd): {stored.ref} {stored.digest[:19]}, "
        f"relative error per module {min(errors.values()):.2f} to {max(errors.values()):.2f}"
    )

    from transformers import AutoModelForCausalLM

    merged_dir = root / "merged"
    merged = adapterkit.merge([store.get("demo/blend:svd4")], None, base_dir, merged_dir)
    echo(
        f"merged demo/blend:svd4 into the base, tensor by tensor: {merged_dir} "
        f"({len(merged.merged_tensors)} of {merged.tensors} tensors changed)"
    )
    baked = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    stacked = adapterkit.attach(copy.deepcopy(base), [store.get("demo/blend:svd4")])
    diff = (_logits(baked) - _logits(stacked)).abs().max().item()  # type: ignore[operator]
    generated = baked.generate(torch.arange(4).reshape(1, 4), max_new_tokens=8, do_sample=False)
    echo(
        f"transformers loads the merged model; max |logit diff| vs the blend attached with PEFT = {diff:.1e}; "
        f"greedy tokens: {generated[0, 4:].tolist()}"
    )
    if diff > 1e-5:
        raise SystemExit(f"demo failed: merged model differs from the attached blend by {diff}")

    report = store.verify(full=True)
    echo(f"verify --full: {report.blobs} blobs, {report.manifests} manifests, {report.refs} refs, ok={report.ok}")
    echo(f"torch {torch.__version__}; try: adapterkit --store {root / 'store'} list")
    return root
