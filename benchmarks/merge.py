"""Streamed merge against PEFT and against a plain copy, measured in one run.

    python benchmarks/merge.py [--size-gb 2] [--repeat 3] [--workdir DIR]

Builds a synthetic bfloat16 Llama base of about --size-gb (random tensors written with
safetensors straight from a LlamaConfig's shapes, in ~500 MB shards; no model is instantiated)
and a PEFT LoRA adapter (r=16 on every attention and MLP projection), plus the same adapter as
DoRA (the same factors and a magnitude vector per module, ``use_dora``), then runs, each in its own
subprocess so that its peak RSS (``ru_maxrss`` from ``wait4``) is its own:

  * adapterkit ``merge`` (read_adapter + merge, CPU), of the LoRA and of the DoRA adapter;
  * PEFT: ``from_pretrained`` in bf16 + ``PeftModel.from_pretrained`` + ``merge_and_unload`` +
    ``save_pretrained`` with the base's shard size, of both adapters;
  * ``cp -r`` of the base folder, and ``cp -r`` followed by ``sync``.

Prints wall time and peak RSS of each (medians of --repeat runs, page cache warm) and the ratios
against the targets: RSS <= 1/4 of PEFT's and <= 600 MB; time <= PEFT's; time <= 2x cp; the
DoRA merge's RSS within 10% of the LoRA merge's and its time <= 1.5x it.

Two things to keep in mind when reading the ratio to ``cp``. adapterkit's merge is durable: every
shard is fsynced before the output folder is renamed into place (so a crash never leaves a
half-written model at OUT_DIR), which ``cp -r`` does not do; ``cp -r && sync`` is the floor for a
durable copy. And each Python program pays its interpreter and ``import torch`` (about 1 s here)
before doing any work, a fixed cost that ``cp`` does not have: the "past imports" column is the
time from the first line of work to the last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARD_BYTES = 500_000_000
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_shapes(size_gb: float) -> tuple[dict[str, object], dict[str, tuple[int, ...]]]:
    """A LlamaConfig (as a dict) whose bf16 weights come to about ``size_gb`` GB, and every tensor's shape."""
    budget = size_gb * 1e9 / 2  # parameters
    vocab = 32000
    # the widest model whose two embeddings take at most a sixth of the budget (2 GB: TinyLlama's shape, 21 layers)
    hidden = max((h for h in (512, 1024, 2048, 4096) if 2 * vocab * h <= budget / 6), default=256)
    intermediate = int(hidden * 2.75) // 256 * 256
    heads = hidden // 128
    kv_heads = max(1, heads // 4)
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate + 2 * hidden
    layers = max(1, round((budget - 2 * vocab * hidden - hidden) / per_layer))
    config: dict[str, object] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[f"{p}.self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, intermediate)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return config, shapes


def make_base(folder: Path, size_gb: float) -> int:
    """Write the synthetic base (shards + index + config.json); returns its size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config, shapes = llama_shapes(size_gb)
    folder.mkdir(parents=True)
    LlamaConfig(**config, dtype="bfloat16").save_pretrained(folder)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = shard
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        del tensors
    total = sum(math.prod(s) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


def make_adapter(folder: Path, base: Path, r: int = 16, dora: bool = False) -> int:
    """A PEFT LoRA folder with random float32 factors on every projection of every layer.

    With ``dora``, the same factors (same seed) and a DoRA magnitude vector per module: the norms
    of the base's rows (0.02 * sqrt(in), as ``make_base`` draws them) moved by a few percent.
    """
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (hidden // config["num_attention_heads"])
    io = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for proj, (fan_in, fan_out) in io.items():
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) / math.sqrt(fan_in)
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.01
            if dora:
                noise = torch.randn(fan_out, generator=torch.Generator().manual_seed(len(tensors)))
                tensors[f"{key}.lora_magnitude_vector"] = 0.02 * math.sqrt(fan_in) * (1 + 0.05 * noise)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": TARGETS,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": dora,
    }
    (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return (folder / "adapter_model.safetensors").stat().st_size


# --- the measured programs (run as children of this script) ------------------------------------------------------


def child_build(work: str, size_gb: str) -> None:
    """Build base and adapter in a child, so that the driver stays small: a forked child's peak RSS
    starts from its parent's, and would hide the numbers being measured."""
    total = make_base(Path(work) / "base", float(size_gb))
    adapter_bytes = make_adapter(Path(work) / "adapter", Path(work) / "base")
    make_adapter(Path(work) / "dora", Path(work) / "base", dora=True)
    print(json.dumps({"total": total, "adapter": adapter_bytes}))


def child_adapterkit(adapter: str, base: str, out: str) -> None:
    sys.path.insert(0, str(HERE.parent))
    from adapterkit.formats.peft import read_adapter
    from adapterkit.merging.streamed import merge

    start = time.perf_counter()
    merge([read_adapter(adapter)], None, base, out)
    print(json.dumps({"inside": time.perf_counter() - start}))


def child_peft(adapter: str, base: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, max_shard_size=SHARD_BYTES)
    print(json.dumps({"inside": time.perf_counter() - start}))


CHILDREN = {"build": child_build, "adapterkit": child_adapterkit, "peft": child_peft}


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and the seconds the child reports past its imports (else the wall time)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    lines = output.decode().strip().splitlines()
    inside = json.loads(lines[-1])["inside"] if lines else elapsed
    return elapsed, usage.ru_maxrss / 1024, inside  # Linux reports ru_maxrss in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary folder)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child](*args.paths)
        return

    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="adapterkit-merge-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        built = subprocess.run([*me, "--child", "build", tmp, str(args.size_gb)], capture_output=True, check=True)
        sizes = json.loads(built.stdout.decode().strip().splitlines()[-1])
        shards = len(list((work / "base").glob("*.safetensors")))
        print(
            f"base: {sizes['total'] / 1e9:.2f} GB bf16 in {shards} shards; adapter: {sizes['adapter'] / 1e6:.0f} MB "
            f"(r=16 on {len(TARGETS)} projections per layer); built in {time.perf_counter() - started:.0f} s; "
            f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}"
        )
        adapter, dora, base = str(work / "adapter"), str(work / "dora"), str(work / "base")
        programs = {
            "adapterkit merge": lambda out: [*me, "--child", "adapterkit", adapter, base, out],
            "peft merge_and_unload": lambda out: [*me, "--child", "peft", adapter, base, out],
            "cp -r": lambda out: ["cp", "-r", base, out],
            "cp -r && sync": lambda out: ["sh", "-c", 'cp -r "$0" "$1" && sync', base, out],
            "adapterkit merge, DoRA": lambda out: [*me, "--child", "adapterkit", dora, base, out],
            "peft, DoRA": lambda out: [*me, "--child", "peft", dora, base, out],
        }
        subprocess.run(["cat", *map(str, sorted((work / "base").iterdir()))], stdout=subprocess.DEVNULL, check=True)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in programs}
        for _ in range(args.repeat):
            for name, command in programs.items():
                out = work / "out"
                subprocess.run(["sync"], check=True)  # no write-back of the previous run in this one's time
                results[name].append(measure(command(str(out))))
                shutil.rmtree(out)
        summary = {
            name: tuple(statistics.median(run[i] for run in runs) for i in range(3)) for name, runs in results.items()
        }
        print(f"{'':24s} {'wall':>9s} {'past imports':>13s} {'peak RSS':>10s}   (medians of {args.repeat})")
        for name, (seconds, rss, inside) in summary.items():
            past = f"{inside:11.2f} s" if not name.startswith("cp") else f"{'':13s}"
            print(f"{name:24s} {seconds:7.2f} s {past} {rss:7.0f} MB")
        (ak_t, ak_m, ak_in), (pf_t, pf_m, pf_in), (cp_t, _, _), (sync_t, _, _), dora_ak, dora_pf = summary.values()
        checks = [
            (f"RSS adapterkit / PEFT  = {ak_m / pf_m:.3f}", "<= 0.25", ak_m / pf_m <= 0.25),
            (f"RSS adapterkit         = {ak_m:.0f} MB", "<= 600 MB", ak_m <= 600),
            (f"time adapterkit / PEFT = {ak_t / pf_t:.2f}", "<= 1", ak_t <= pf_t),
            (f"time adapterkit / cp   = {ak_t / cp_t:.2f}", "<= 2", ak_t <= 2 * cp_t),
            (f"past imports / cp      = {ak_in / cp_t:.2f}", "<= 2", ak_in <= 2 * cp_t),
            (f"time adapterkit / (cp && sync) = {ak_t / sync_t:.2f}", "<= 2", ak_t <= 2 * sync_t),
            (f"DoRA RSS / LoRA RSS    = {dora_ak[1] / ak_m:.3f}", "<= 1.10", dora_ak[1] <= 1.1 * ak_m),
            (f"DoRA time / LoRA time  = {dora_ak[0] / ak_t:.2f}", "<= 1.5", dora_ak[0] <= 1.5 * ak_t),
            (f"DoRA: adapterkit / PEFT time = {dora_ak[0] / dora_pf[0]:.2f}", "<= 1", dora_ak[0] <= dora_pf[0]),
            (
                f"DoRA: adapterkit / PEFT RSS  = {dora_ak[1] / dora_pf[1]:.3f}",
                "<= 0.25",
                dora_ak[1] <= 0.25 * dora_pf[1],
            ),
        ]
        for text, target, ok in checks:
            print(f"{text:34s} (target {target:>9s}) {'ok' if ok else 'MISSED'}")
        print(
            f"past imports: adapterkit / PEFT = {ak_in / pf_in:.2f} "
            "(python + torch start-up is the same fixed cost for both Python programs)"
        )


if __name__ == "__main__":
    main()
