"""Store performance against its peers, measured in one run.

    python benchmarks/store.py [--size-mb 200] [--repeat 5]

Prints, for one synthetic PEFT adapter of about 200 MB:
  * ``adapterkit add`` time / ``sha256sum`` time of the same file (target <= 1.3): adding must
    cost little more than reading and hashing the bytes once;
  * re-``add`` of a stored adapter / ``sha256sum`` time;
  * ``adapterkit list`` wall time on a store of 100 adapters (target < 0.3 s), and whether
    torch was imported (it must not be).
Each figure is the median of --repeat runs, taken with a warm page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADAPTERKIT = [sys.executable, "-m", "adapterkit"]


def make_adapter(folder: Path, size_mb: int, seed: int = 0, hidden: int = 4096, r: int = 64) -> Path:
    """A PEFT-style adapter folder whose weights file is about ``size_mb`` MB (float32 factors)."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    per_module = 2 * r * hidden * 4
    layers = max(1, size_mb * 1_000_000 // (2 * per_module))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, hidden, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, r, generator=gen)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic/llama",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "v_proj"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--adapters", type=int, default=100)
    args = parser.parse_args()
    sha256sum = shutil.which("sha256sum")
    if sha256sum is None:
        sys.exit("sha256sum not found")

    with tempfile.TemporaryDirectory(prefix="adapterkit-bench-") as tmp:
        work = Path(tmp)
        adapter = make_adapter(work / "adapter", args.size_mb)
        weights = adapter / "adapter_model.safetensors"
        size = weights.stat().st_size
        print(f"adapter: {size / 1e6:.0f} MB, {sys.platform}, {os.cpu_count()} CPUs")

        timed([sha256sum, str(weights)])  # warm the page cache
        hashing, adding, readding = [], [], []
        for i in range(args.repeat):
            hashing.append(timed([sha256sum, str(weights)]))
            store = work / f"store-{i}"
            adding.append(timed([*ADAPTERKIT, "--store", str(store), "add", str(adapter), "--tag", "bench/big"]))
            readding.append(timed([*ADAPTERKIT, "--store", str(store), "add", str(adapter), "--tag", "bench/big"]))
            shutil.rmtree(store)
        h, a, r = median(hashing), median(adding), median(readding)
        print(f"sha256sum               {h:7.3f} s")
        print(f"adapterkit add          {a:7.3f} s   add / sha256sum    = {a / h:.2f}  (target <= 1.3)")
        print(f"adapterkit add (again)  {r:7.3f} s   re-add / sha256sum = {r / h:.2f}")

        sys.path.insert(0, str(HERE.parent))
        from adapterkit import Store

        store = Store(work / "store-list")
        small = work / "small"
        for i in range(args.adapters):
            make_adapter(small, 1, seed=i, hidden=256, r=8)
            store.add(small, f"bench/adapter-{i:03d}")
        cmd = [*ADAPTERKIT, "--store", str(store.root), "list"]
        timed(cmd)
        listing = median([timed(cmd) for _ in range(args.repeat)])
        probe = (
            "import sys; from adapterkit.cli import cli; "
            "cli.main(['--store', sys.argv[1], 'list'], standalone_mode=False); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)"
        )
        check = subprocess.run(
            [sys.executable, "-c", probe, str(store.root)], capture_output=True, text=True, check=True
        )
        torch_loaded = "NO-TORCH" not in check.stderr
        print(
            f"adapterkit list ({args.adapters} adapters) {listing:7.3f} s   (target < 0.3 s); "
            f"torch imported: {'yes' if torch_loaded else 'no'}"
        )


if __name__ == "__main__":
    main()
