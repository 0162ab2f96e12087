"""Extraction against mergekit-extract-lora, measured in one run.

    python benchmarks/extract.py [--hidden 2048] [--layers 8] [--intermediate 5504] [--vocab 32000]
                                 [--rank 16] [--repeat 1] [--workdir DIR]

Builds a synthetic bfloat16 Llama pair without instantiating a model (random tensors written with
safetensors from a LlamaConfig's shapes): a base in ~500 MB shards, and a fine-tune in ~300 MB
shards (sharded differently on purpose) that equals the base plus, on every attention and MLP
projection, a random rank-16 change and small noise; norms and embeddings are unchanged. The
default shapes are a 1.07 GB model. Then runs, each in its own subprocess so that its peak RSS
(``ru_maxrss`` from ``wait4``) is its own, page cache warm:

  * adapterkit: ``extract(base, tuned, rank=R)`` + ``write_adapter`` (CPU, float32 factors);
  * ``mergekit-extract-lora --model TUNED --base-model BASE --out-path OUT --max-rank R`` (CPU; it
    writes the adapter, then may exit 1 when it cannot reach the Hub for the model card: the
    adapter it wrote is its answer).

Then, outside the timed runs, reads every projection's true change ``tuned - base`` and measures
each adapter's relative error on it, ``||D - s B A|| / ||D||``, per module. Prints wall time, time
past imports, peak RSS, adapter size and worst module error of each, and the targets: >= 20x
faster, peak RSS <= 1/5 of mergekit's and <= 600 MB, error <= mergekit's on every module, and an
adapter that carries only what changed.
"""

from __future__ import annotations

import argparse
import contextlib
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
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_shapes(hidden: int, layers: int, intermediate: int, vocab: int) -> tuple[dict[str, object], dict]:
    heads = hidden // 128
    kv_heads = heads  # full multi-head attention: every projection of a layer but the MLP's is hidden x hidden
    head_dim = hidden // heads
    config: dict[str, object] = dict(
        architectures=["LlamaForCausalLM"],  # mergekit picks its architecture description from this
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


def _write(folder: Path, tensors_by_shard: list[dict], config: dict[str, object]) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(**config, dtype="bfloat16").save_pretrained(folder)
    weight_map, total = {}, 0
    for i, tensors in enumerate(tensors_by_shard):
        shard = f"model-{i + 1:05d}-of-{len(tensors_by_shard):05d}.safetensors"
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = shard
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _groups(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def make_pair(work: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """Write base and tuned (different shard sizes); returns the base's bytes."""
    import torch

    config, shapes = llama_shapes(hidden, layers, intermediate, vocab)
    gen = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            base[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            base[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    tuned: dict[str, torch.Tensor] = {}
    for name, weight in base.items():
        if name.rsplit(".", 2)[-2] in PROJECTIONS:
            out_dim, in_dim = weight.shape
            change = torch.randn(out_dim, 16, generator=gen) @ torch.randn(16, in_dim, generator=gen) * 5e-4
            change += 1e-4 * torch.randn(out_dim, in_dim, generator=gen)
            tuned[name] = (weight.float() + change).to(torch.bfloat16)
        else:
            tuned[name] = weight
    _write(work / "base", [{n: base[n] for n in g} for g in _groups(shapes, 500_000_000)], config)
    _write(work / "tuned", [{n: tuned[n] for n in g} for g in _groups(shapes, 300_000_000)], config)
    return sum(t.numel() * 2 for t in base.values())


# --- the measured programs (run as children of this script) ------------------------------------------------------


def child_build(work: str, hidden: str, layers: str, intermediate: str, vocab: str) -> None:
    """Build in a child, so that the driver stays small (a forked child's peak RSS starts from its parent's)."""
    total = make_pair(Path(work), int(hidden), int(layers), int(intermediate), int(vocab))
    print(json.dumps({"total": total}))


def child_adapterkit(base: str, tuned: str, out: str, rank: str) -> None:
    sys.path.insert(0, str(HERE.parent))
    from adapterkit.extraction import extract
    from adapterkit.formats.peft import write_adapter

    start = time.perf_counter()
    write_adapter(extract(base, tuned, rank=int(rank)), out)
    print(json.dumps({"inside": time.perf_counter() - start}))


def child_errors(base: str, tuned: str, ours: str, theirs: str) -> None:
    """Each adapter's relative error on every projection's true change (not timed)."""
    import torch
    from safetensors import safe_open

    sys.path.insert(0, str(HERE.parent))
    from adapterkit.formats.peft import read_adapter

    def tensors(folder: str) -> dict[str, tuple[Path, str]]:
        index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())["weight_map"]
        return {name: (Path(folder) / shard, name) for name, shard in index.items()}

    def load(where: tuple[Path, str]) -> torch.Tensor:
        with safe_open(where[0], "pt") as fh:
            return fh.get_tensor(where[1]).float()

    base_t, tuned_t = tensors(base), tensors(tuned)
    adapters = {"ours": read_adapter(ours), "theirs": read_adapter(theirs)}
    errors: dict[str, dict[str, float]] = {key: {} for key in adapters}
    for name in base_t:
        if name.rsplit(".", 2)[-2] not in PROJECTIONS:
            continue
        module = name.removesuffix(".weight")
        change = load(tuned_t[name]) - load(base_t[name])
        norm = float(change.double().norm())
        for key, adapter in adapters.items():
            if module not in adapter.modules:
                errors[key][module] = 1.0
                continue
            errors[key][module] = float((change - adapter.delta(module)).double().norm()) / norm
    extras = {key: sorted(adapter.config.get("modules_to_save") or []) for key, adapter in adapters.items()}
    print(json.dumps({"errors": errors, "modules_to_save": extras}))


CHILDREN = {"build": child_build, "adapterkit": child_adapterkit, "errors": child_errors}


def measure(cmd: list[str], done: Path | None = None) -> tuple[float, float, float, float]:
    """Wall seconds, peak RSS (MB), seconds past imports (the wall time when the child does not say), CPU seconds.

    CPU seconds (user + system, all threads) are the figure to compare on a busy machine: wall time
    then depends on what else runs, and a program with more threads than free cores loses more.

    A command that exits non-zero counts when it wrote ``done`` (mergekit's card lookup, see above).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    output = proc.stdout.read()
    errors = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and (done is None or not done.exists()):
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n{errors.decode()[-3000:]}")
    lines = output.decode().strip().splitlines()
    inside = elapsed
    if lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            inside = json.loads(lines[-1])["inside"]
    cpu = usage.ru_utime + usage.ru_stime
    return elapsed, usage.ru_maxrss / 1024, inside, cpu  # Linux reports ru_maxrss in KiB


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.name.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary folder)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child](*args.paths)
        return
    mergekit = shutil.which("mergekit-extract-lora") or str(Path(sys.executable).parent / "mergekit-extract-lora")
    if not Path(mergekit).exists():
        sys.exit("mergekit-extract-lora not found: pip install -c constraints.txt mergekit")

    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="adapterkit-extract-bench-", dir=args.workdir) as tmp:
        work = Path(tmp).resolve()
        started = time.perf_counter()
        shape = [str(v) for v in (args.hidden, args.layers, args.intermediate, args.vocab)]
        built = subprocess.run([*me, "--child", "build", str(work), *shape], capture_output=True, check=True)
        total = json.loads(built.stdout.decode().strip().splitlines()[-1])["total"]
        base, tuned = str(work / "base"), str(work / "tuned")
        print(
            f"pair: {total / 1e9:.2f} GB bf16 each (hidden {args.hidden}, {args.layers} layers, intermediate "
            f"{args.intermediate}, vocab {args.vocab}); tuned = base + rank-16 change + noise on every projection; "
            f"built in {time.perf_counter() - started:.0f} s; {os.cpu_count()} CPUs; "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        programs = {
            "adapterkit extract": (lambda out: [*me, "--child", "adapterkit", base, tuned, out, str(args.rank)]),
            "mergekit-extract-lora": (
                lambda out: [
                    mergekit,
                    "--model",
                    tuned,
                    "--base-model",
                    base,
                    "--out-path",
                    out,
                    "--max-rank",
                    str(args.rank),
                ]
            ),
        }
        files = [str(path) for side in ("base", "tuned") for path in sorted((work / side).iterdir())]
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # page cache warm for both
        results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in programs}
        sizes: dict[str, int] = {}
        kept = {"adapterkit extract": work / "ours", "mergekit-extract-lora": work / "theirs"}
        for attempt in range(args.repeat):
            for name, command in programs.items():
                out = work / "out"
                results[name].append(measure(command(str(out)), done=out / "adapter_model.safetensors"))
                sizes[name] = folder_bytes(out)
                if attempt == args.repeat - 1:
                    out.rename(kept[name])
                else:
                    shutil.rmtree(out)
        ours_dir, theirs_dir = str(kept["adapterkit extract"]), str(kept["mergekit-extract-lora"])
        checked = subprocess.run(
            [*me, "--child", "errors", base, tuned, ours_dir, theirs_dir], capture_output=True, check=True
        )
        report = json.loads(checked.stdout.decode().strip().splitlines()[-1])
        ours, theirs = report["errors"]["ours"], report["errors"]["theirs"]
        summary = {
            name: tuple(statistics.median(run[i] for run in runs) for i in range(4)) for name, runs in results.items()
        }
        worst = {"adapterkit extract": max(ours.values()), "mergekit-extract-lora": max(theirs.values())}
        print(
            f"{'':22s} {'wall':>9s} {'past imports':>13s} {'CPU':>9s} {'peak RSS':>10s} {'adapter':>10s} "
            f"{'worst error':>12s}   (medians of {args.repeat})"
        )
        for name, (seconds, rss, inside, cpu) in summary.items():
            print(
                f"{name:22s} {seconds:7.2f} s {inside:11.2f} s {cpu:7.1f} s {rss:7.0f} MB {sizes[name] / 1e6:7.1f} MB "
                f"{worst[name]:12.4e}"
            )
        (ak_t, ak_m, _, ak_cpu), (mk_t, mk_m, _, mk_cpu) = summary.values()
        not_worse = sum(ours[m] <= theirs[m] * (1 + 1e-6) for m in ours)
        carried = report["modules_to_save"]
        checks = [
            (
                f"speed-up mergekit / adapterkit = {mk_t / ak_t:.1f}x (CPU {mk_cpu / ak_cpu:.1f}x)",
                ">= 20x",
                mk_t / ak_t >= 20,
            ),
            (f"RSS adapterkit / mergekit = {ak_m / mk_m:.3f}", "<= 0.2", ak_m / mk_m <= 0.2),
            (f"RSS adapterkit = {ak_m:.0f} MB", "<= 600 MB", ak_m <= 600),
            (f"error <= mergekit's on {not_worse} of {len(ours)} modules", "all", not_worse == len(ours)),
            (f"adapterkit carries in full: {carried['ours'] or 'nothing'}", "nothing", not carried["ours"]),
        ]
        for text, target, ok in checks:
            print(f"{text:58s} (target {target:>9s}) {'ok' if ok else 'MISSED'}")
        print(f"mergekit carries in full (modules_to_save): {', '.join(carried['theirs']) or 'nothing'}")


if __name__ == "__main__":
    main()
