"""GGUF export against llama.cpp's own convert_lora_to_gguf.py, measured in one run.

    python benchmarks/export.py [--repeat 3] [--workdir DIR] [--llama-cpp-src DIR]

Builds, for Llama-3-8B's shapes (hidden 4096, intermediate 14336, 32 layers, 32 query and 8
key/value heads, vocabulary 128256):

  * a base folder: its config.json, and safetensors shards whose headers are real but whose data
    is a sparse hole (what a GGUF export reads of a base is its config and headers; llama.cpp's
    converter reads config.json only);
  * a plain adapter: r=16, alpha 32 on all seven projections of the 32 layers, random float32
    factors (161 MB);
  * the same with rsLoRA and rank and alpha patterns (a few modules at other ranks and alphas).

Then runs, each in its own process (peak RSS from ``wait4``), on each adapter:

  * ``adapterkit export REF OUT --format gguf --base BASE`` (the adapter stored beforehand);
  * ``python convert_lora_to_gguf.py --base BASE --outtype f32 ADAPTER`` from llama.cpp, whose
    source ships in llama-cpp-python's source distribution (downloaded from PyPI into the work
    folder unless --llama-cpp-src names an unpacked llama.cpp).

Both write float32. Each file written is then read back (gguf reader) and every module's delta,
under llama.cpp's scale rule (alpha / rank, or 1 when alpha is 0) with llama.cpp's q/k row order
undone, is compared with the exact ``scaling * B @ A``: the relative Frobenius error, largest over
the modules. Prints medians of --repeat runs and the ratios adapterkit / converter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: rsLoRA + patterns (keys in sorted order, as PEFT saves and resolves them).
PATTERNED = {
    "use_rslora": True,
    "rank_pattern": {"k_proj": 8, r"model\.layers\.(1|3|5)\..*": 32, "v_proj": 8},
    "alpha_pattern": {"down_proj": 8, "q_proj": 64},
}


def _module_shapes() -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) for every projection of every layer."""
    hidden, inter = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    kv = CONFIG["num_key_value_heads"] * hidden // CONFIG["num_attention_heads"]
    io = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    out = {}
    for i in range(CONFIG["num_hidden_layers"]):
        for proj, shape in io.items():
            part = "self_attn" if proj in PROJ[:4] else "mlp"
            out[f"model.layers.{i}.{part}.{proj}"] = shape
    return out


def make_base(folder: Path) -> None:
    """config.json and bf16 shards whose headers are complete and whose data is a hole (sparse files)."""
    hidden, vocab = CONFIG["hidden_size"], CONFIG["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for name, (fan_in, fan_out) in _module_shapes().items():
        shapes[f"{name}.weight"] = (fan_out, fan_in)
    for i in range(CONFIG["num_hidden_layers"]):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > 5_000_000_000:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    weight_map = {}
    for n, group in enumerate(shards):
        shard = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in sorted(group.items()):
            end = offset + 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
            weight_map[name] = shard
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with (folder / shard).open("wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            fh.truncate(8 + len(raw) + offset)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def make_adapter(folder: Path, base: Path, extra: dict[str, object], seed: int) -> int:
    """A PEFT folder with random float32 factors at the ranks ``extra``'s patterns resolve."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from adapterkit.adapter.config import resolve_rank_alpha

    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": 16,
        "lora_alpha": 32,
        "target_modules": PROJ,
        "lora_dropout": 0.0,
        "bias": "none",
        **extra,
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in _module_shapes().items():
        r, _ = resolve_rank_alpha(config, name)
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) / math.sqrt(fan_in)
        tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return (folder / "adapter_model.safetensors").stat().st_size


def fetch_converter(work: Path) -> Path:
    """llama.cpp's source tree (convert_lora_to_gguf.py, conversion/, gguf-py/) from llama-cpp-python's sdist."""
    target = work / "llama.cpp"
    if (target / "convert_lora_to_gguf.py").is_file():
        return target
    download = work / "sdist"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(download)]
    subprocess.run([*pip, LLAMA_CPP_PYTHON], check=True)
    (archive,) = download.glob("*.tar.gz")
    wanted = ("convert_lora_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 3)
            if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and parts[3].startswith(wanted):
                member.name = parts[3]
                members.append(member)
        tar.extractall(target, members=members, filter="data")
    return target


# --- the measured programs and the check of their output (children of this script) ------------------------------


def child_build(work: str) -> None:
    root = Path(work)
    make_base(root / "base")
    sizes = {
        "plain": make_adapter(root / "plain", root / "base", {}, seed=1),
        "patterned": make_adapter(root / "patterned", root / "base", PATTERNED, seed=2),
    }
    sys.path.insert(0, str(ROOT))
    from adapterkit import Store

    store = Store(root / "store")
    for name in sizes:
        store.add(root / name, f"bench/{name}:1")
    print(json.dumps(sizes))


def child_check(adapter: str, gguf_file: str) -> None:
    """Largest relative error of the file's deltas, as llama.cpp applies them, against the exact ones."""
    import gguf
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from adapterkit.adapter.equivalence import Factors, relative_difference
    from adapterkit.formats.gguf import unpermute_rows
    from adapterkit.formats.peft import read_adapter

    stored = read_adapter(adapter)
    reader = gguf.GGUFReader(gguf_file)
    field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(field.parts[field.data[0]][0]) if field is not None else 0.0
    tensors = {t.name: t for t in reader.tensors}
    heads = {"attn_q": CONFIG["num_attention_heads"], "attn_k": CONFIG["num_key_value_heads"]}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, CONFIG["num_hidden_layers"])
    errors = {}
    for name, module in stored.modules.items():
        target = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        a = torch.from_numpy(np.array(tensors[f"{target}.lora_a"].data, dtype=np.float32))
        b = torch.from_numpy(np.array(tensors[f"{target}.lora_b"].data, dtype=np.float32))
        kind = target.split(".")[2]
        if kind in heads:
            b = unpermute_rows(b, heads[kind])
        scale = float(np.float32(alpha) / np.float32(b.shape[1])) if alpha else 1.0
        errors[name] = relative_difference(Factors(module.A, module.B, module.spec.scaling), Factors(a, b, scale))
    worst = max(errors, key=errors.__getitem__)
    off = sum(1 for e in errors.values() if e > 1e-5)
    print(json.dumps({"max": errors[worst], "worst": worst, "off": off, "modules": len(errors), "alpha": alpha}))


CHILDREN = {"build": child_build, "check": child_check}


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``cmd``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err.decode(errors='replace')[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024  # Linux reports ru_maxrss in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary folder)")
    parser.add_argument("--llama-cpp-src", type=Path, help="an unpacked llama.cpp (default: download the sdist)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child](*args.paths)
        return

    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="adapterkit-export-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        built = subprocess.run([*me, "--child", "build", tmp], capture_output=True, check=True)
        sizes = json.loads(built.stdout.decode().strip().splitlines()[-1])
        source = args.llama_cpp_src or fetch_converter(work)
        print(
            f"Llama-3-8B shapes, r=16 on {len(PROJ)} projections x {CONFIG['num_hidden_layers']} layers: plain "
            f"{sizes['plain'] / 1e6:.0f} MB, rsLoRA + patterns {sizes['patterned'] / 1e6:.0f} MB (float32); built in "
            f"{time.perf_counter() - started:.0f} s; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
        base = str(work / "base")
        store = str(work / "store")
        ours = [sys.executable, "-m", "adapterkit.cli", "--store", store, "export"]
        theirs = [sys.executable, str(source / "convert_lora_to_gguf.py"), "--base", base, "--outtype", "f32"]
        programs = {
            "adapterkit export": lambda name, out: [*ours, f"bench/{name}:1", out, "--format", "gguf", "--base", base],
            "convert_lora_to_gguf": lambda name, out: [*theirs, "--outfile", out, str(work / name)],
        }
        rows = []
        for name in ("plain", "patterned"):
            for program, command in programs.items():
                runs = []
                out = work / f"out-{name}-{program.split()[0]}.gguf"
                for _ in range(args.repeat):
                    out.unlink(missing_ok=True)
                    runs.append(measure(command(name, str(out)), env))
                checked = subprocess.run(
                    [*me, "--child", "check", str(work / name), str(out)], capture_output=True, check=True
                )
                error = json.loads(checked.stdout.decode().strip().splitlines()[-1])
                seconds = statistics.median(r[0] for r in runs)
                rss = statistics.median(r[1] for r in runs)
                rows.append((name, program, seconds, rss, error, out.stat().st_size))
        print(f"{'adapter':10s} {'program':22s} {'wall':>8s} {'peak RSS':>9s} {'file':>8s}  error of the deltas")
        for name, program, seconds, rss, error, size in rows:
            off = f"{error['off']}/{error['modules']} modules off" if error["off"] else "exact"
            print(
                f"{name:10s} {program:22s} {seconds:6.2f} s {rss:6.0f} MB {size / 1e6:5.0f} MB  "
                f"max {error['max']:.2e} ({off}; alpha {error['alpha']:g})"
            )
        print(f"(medians of {args.repeat} runs each)")
        for name in ("plain", "patterned"):
            mine, peer = (row for row in rows if row[0] == name)
            print(
                f"{name}: adapterkit / converter: time {mine[2] / peer[2]:.2f}x, peak RSS {mine[3] / peer[3]:.2f}x; "
                f"largest delta error {mine[4]['max']:.1e} vs {peer[4]['max']:.1e}"
            )


if __name__ == "__main__":
    main()
