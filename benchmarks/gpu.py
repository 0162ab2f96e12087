"""adapterkit's ``compose`` on the CPU against a GPU: do the results agree, and how fast is each?

    python benchmarks/gpu.py                    # against cuda; without CUDA it says so and exits 0
    python benchmarks/gpu.py --device cpu       # dry run of the script itself (CPU against CPU)

Three random PEFT-layout adapters (r=16, lora_alpha=32, float32) are built in memory on Llama-3-8B
shapes: per layer q_proj (4096x4096), v_proj (1024x4096) and down_proj (4096x14336), ``--layers``
layers (default 1). They are blended with weights (0.5, 0.3, -0.2) by each strategy, once with
``device="cpu"`` and once with ``device=<device>``; ``compose`` moves the factors there, does the
maths there and returns CPU tensors, so the GPU figure includes the transfers.

Checks (exit status 1 if one fails):

* ``linear`` must give the same adapter, byte for byte: the same digest (sha256 of the canonical
  config bytes and safetensors bytes, ``adapterkit.composition.adapter_digest``). Its maths is a
  scalar product and a concatenation, which rounds the same on any device;
* ``svd`` must agree to float32 rounding: relative Frobenius distance of the two results' deltas
  at most 1e-4 (QR and SVD kernels differ between devices, so bytes may not);
* ``ties`` / ``dare_ties``: the elementwise merge is the same maths, but the randomized SVD of the
  merged delta draws its sketch on the device, so the rank-16 factors differ where the spectrum is
  flat; what must agree is the quality: truncation errors within 1% of each other. The delta
  distance is shown for information. DARE masks are drawn on the CPU, so they are the same.

Times are the median of ``--repeat`` runs after a warm-up (CUDA context, cuBLAS/cuSOLVER handles);
slow runs (over 5 s) are taken once. ``GPU MB`` is the peak memory torch allocated on the device.
It takes about a minute on a GPU machine (the CPU side dominates).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

WEIGHTS = (0.5, 0.3, -0.2)
RANK = 16
ALPHA = 32
SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.v_proj": (1024, 4096), "mlp.down_proj": (4096, 14336)}
STRATEGIES: dict[str, dict[str, Any]] = {
    "linear": {},
    "svd": {"rank": RANK},
    "ties": {"rank": RANK, "density": 0.5},
    "dare_ties": {"rank": RANK, "density": 0.5, "seed": 0},
}


def make_adapter(seed: int, layers: int) -> Any:
    """A PEFT-layout LoRA adapter with random factors (both A and B non-zero)."""
    from adapterkit.adapter.model import Adapter

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for module, (out_features, in_features) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.rand(RANK, in_features, generator=generator) * 2 - 1) / math.sqrt(
                in_features
            )
            tensors[f"{key}.lora_B.weight"] = (torch.rand(out_features, RANK, generator=generator) * 2 - 1) / math.sqrt(
                RANK
            )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic/llama-3-8b-shapes",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": sorted({module.rsplit(".", 1)[1] for module in SHAPES}),
    }
    return Adapter.from_state_dict(config, tensors)


@dataclass
class Timing:
    seconds: float
    result: Any
    gpu_peak_bytes: float = math.nan


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], device: torch.device, repeat: int) -> Timing:
    """Median wall time of ``run()`` over ``repeat`` runs (one if the first is slow), and its result."""
    times: list[float] = []
    result = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for attempt in range(max(1, repeat)):
        synchronize(device)
        start = time.perf_counter()
        result = run()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if attempt == 0 and times[0] > 5:
            break
    peak = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else math.nan
    return Timing(statistics.median(times), result, peak)


def delta_distance(first: Any, second: Any) -> float:
    """Relative Frobenius distance between two adapters' deltas, over all modules, in float64."""
    if set(first.modules) != set(second.modules):
        return math.inf
    diff = total = 0.0
    for name in first.modules:
        a = first.delta(name, torch.float64)
        b = second.delta(name, torch.float64)
        diff += float(torch.linalg.vector_norm(a - b)) ** 2
        total += float(torch.linalg.vector_norm(a)) ** 2
    return math.sqrt(diff / total) if total else math.sqrt(diff)


def worst_truncation(adapter: Any) -> float:
    errors = (adapter.metadata or {}).get("lineage", {}).get("truncation_error") or {}
    return max(errors.values()) if errors else math.nan


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--device", default="cuda", help="device to compare with the CPU (default: cuda)")
    parser.add_argument("--layers", type=int, default=1, help="layers of (q, v, down) modules (default 1)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (median; default 5)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}): "
            "nothing to compare; run this on a machine with a GPU. Exiting 0."
        )
        return 0

    from adapterkit.composition.engine import adapter_digest, compose

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"torch {torch.__version__}; CPU threads {torch.get_num_threads()}; device {device} ({name})")
    adapters = [make_adapter(seed, args.layers) for seed in range(3)]
    print(f"3 adapters x {len(adapters[0].modules)} modules (r={RANK}); weights {WEIGHTS}")
    for target in ("cpu", device):  # warm-up: plugin discovery, CUDA context, BLAS/solver handles
        compose(adapters, list(WEIGHTS), "svd", device=target, rank=RANK)

    header = (
        "strategy",
        "CPU s",
        f"{device.type} s",
        "speedup",
        "GPU MB",
        "same digest",
        "delta dist",
        "trunc CPU",
        "trunc dev",
        "check",
    )
    lines: list[tuple[str, ...]] = [header]
    failures: list[str] = []
    for strategy, params in STRATEGIES.items():
        print(f"  {strategy} ...", flush=True)

        def blend(target: torch.device | str, strategy: str = strategy, params: dict[str, Any] = params) -> Any:
            return compose(adapters, list(WEIGHTS), strategy, device=target, **params)

        on_cpu = timed(lambda: blend("cpu"), torch.device("cpu"), args.repeat)
        on_device = timed(lambda: blend(device), device, args.repeat)
        same = adapter_digest(on_cpu.result) == adapter_digest(on_device.result)
        distance = delta_distance(on_cpu.result, on_device.result)
        trunc_cpu, trunc_dev = worst_truncation(on_cpu.result), worst_truncation(on_device.result)
        if strategy == "linear":
            passed = same
        elif strategy == "svd":
            passed = distance <= 1e-4
        else:
            passed = abs(trunc_cpu - trunc_dev) <= 0.01 * trunc_cpu
        if not passed:
            failures.append(strategy)
        lines.append(
            (
                strategy,
                f"{on_cpu.seconds:.4f}",
                f"{on_device.seconds:.4f}",
                f"{on_cpu.seconds / on_device.seconds:.1f}x" if on_device.seconds > 0 else "-",
                "-" if math.isnan(on_device.gpu_peak_bytes) else f"{on_device.gpu_peak_bytes / 2**20:.0f}",
                "yes" if same else "no",
                f"{distance:.1e}",
                "-" if math.isnan(trunc_cpu) else f"{trunc_cpu:.6f}",
                "-" if math.isnan(trunc_dev) else f"{trunc_dev:.6f}",
                "PASS" if passed else "FAIL",
            )
        )

    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for number, line in enumerate(lines):
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if number == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "\nchecks: linear same digest; svd delta distance <= 1e-4; ties/dare_ties truncation errors within 1% "
        "(their randomized sketches are drawn on each device)."
    )
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
