"""Stress the store: many concurrent ``adapterkit`` processes, SIGKILLed at random, with the invariants checked.

    python benchmarks/store_stress.py --kills 500 [--workers 8] [--seed 1] [--store DIR] [--keep]

``--workers`` CLI processes run at once (add new and identical adapters, tag, rm, gc --grace 0s/1s, verify);
at seeded random moments one of them is SIGKILLed. Every ``--check-every`` kills the runners are drained and
the store is checked: ``verify`` clean (temp files of killed writers are allowed), every file under blobs/ and
manifests/ hashes to its name, every ref loads as exactly the adapter that was added, and every reflog chains
(no lost update). At the end ``gc --grace 0s`` must leave no temp file and ``verify --full`` must pass.
Prints a summary; exits 1 on the first broken invariant. This is tests/test_store_reliability.py, scaled up.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit import Store
from adapterkit.files.safetensors import serialize

CLI = [sys.executable, "-m", "adapterkit.cli"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
NAMES = ["a", "b", "team/c:v1", "team/c:v2", "d"]


def write_adapter(path: Path, seed: int, dim: int, modules: int = 4, r: int = 16) -> Path:
    """A valid PEFT LoRA folder with random F32 factors (``modules * 2 * r * dim * 4`` bytes of weights)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for index in range(modules):
        module = f"base_model.model.model.layers.{index // 2}.self_attn.{'qv'[index % 2]}_proj"
        tensors[f"{module}.lora_A.weight"] = ("F32", (r, dim), rng.standard_normal((r, dim), np.float32).tobytes())
        tensors[f"{module}.lora_B.weight"] = ("F32", (dim, r), rng.standard_normal((dim, r), np.float32).tobytes())
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(serialize(tensors))
    (path / "README.md").write_text(f"# stress adapter {seed}\n")
    return path


class Invariant(AssertionError):
    """A broken store invariant: the run stops and reports it."""


@dataclass
class Stats:
    kills: int = 0
    killed_by_op: Counter[str] = field(default_factory=Counter)
    completed: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # clean, expected errors (a ref that is gone)
    checks: int = 0
    temp_files_seen: int = 0


@dataclass
class Runner:
    op: str
    args: list[str]
    proc: subprocess.Popen[str]


class Stress:
    def __init__(self, root: Path, work: Path, rng: random.Random, dim: int) -> None:
        self.root = root
        self.store = Store(root)
        self.rng = rng
        self.work = work
        self.dim = dim
        self.scratch = Store(work / "scratch")
        self.tensors: dict[str, dict[str, bytes]] = {}  # digest -> tensor name -> raw bytes
        self.folders = [self.new_folder(i) for i in range(6)]
        self.serial = itertools.count(100)

    def new_folder(self, seed: int) -> Path:
        folder = write_adapter(self.work / "src" / f"a{seed}", seed, self.dim)
        digest = self.scratch.add(folder).digest  # the digest any add of this folder must give
        data = (folder / "adapter_model.safetensors").read_bytes()
        self.tensors[digest] = _raw_tensors(data)
        return folder

    def pick(self) -> tuple[str, list[str]]:
        op = self.rng.choices(["add", "add-new", "tag", "rm", "gc", "verify"], weights=[4, 2, 3, 1, 1, 1])[0]
        if op == "add":
            return op, ["add", str(self.rng.choice(self.folders)), "--tag", self.rng.choice(NAMES)]
        if op == "add-new":
            folder = self.new_folder(next(self.serial))
            return op, ["add", str(folder), "--tag", self.rng.choice(NAMES)]
        if op == "tag":
            return op, ["tag", self.rng.choice(NAMES), self.rng.choice(NAMES)]
        if op == "rm":
            return op, ["rm", self.rng.choice(NAMES)]
        if op == "gc":
            return op, ["gc", "--grace", self.rng.choice(["0s", "1s"])]
        return op, ["verify"]

    def spawn(self) -> Runner:
        op, args = self.pick()
        proc = subprocess.Popen(
            [*CLI, "--store", str(self.root), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        return Runner(op, args, proc)

    def finish(self, runner: Runner, stats: Stats) -> None:
        _, stderr = runner.proc.communicate()
        rc = runner.proc.returncode
        if rc == -signal.SIGKILL:
            stats.kills += 1
            stats.killed_by_op[runner.op] += 1
        elif rc == 0:
            stats.completed[runner.op] += 1
        elif rc == 1 and stderr.startswith(("Error: no ref ", "Error: no adapter ")):
            stats.refused[runner.op] += 1
        else:
            raise Invariant(f"{' '.join(runner.args)} exited {rc}: {stderr.strip()}")

    def check(self, stats: Stats) -> None:
        """Everything a crash may never break (call with no command running)."""
        stats.checks += 1
        report = self.store.verify()
        if not report.ok:
            raise Invariant(f"verify: {report.problems}")
        stats.temp_files_seen += report.stale_temp_files
        for top in (self.store.blobs.root, self.store.manifests.root):
            for path in top.rglob("*") if top.is_dir() else ():
                if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != path.parent.name + path.name:
                    raise Invariant(f"{path} does not hash to its name")
        for name, tag, _ in self.store.refs:
            digest = self.store.refs.read(name, tag)
            if digest not in self.tensors:
                raise Invariant(f"{name}:{tag} points at {digest}, which no add produced")
            _, layers = self.store.manifest(digest)
            weights = next(layer for layer in layers if layer.title == "adapter_model.safetensors")
            loaded = _raw_tensors(self.store.blobs.read(weights.digest, weights.size))
            if loaded != self.tensors[digest]:
                raise Invariant(f"{name}:{tag} does not load as the adapter that was added")
        for name, tag, entries in self.store.refs.all_logs():
            value = self.store.refs.read(name, tag)
            if entries and value not in (entries[-1].new, entries[-1].old):
                raise Invariant(f"{name}:{tag} holds {value}, not its last logged value")
            for before, after in itertools.pairwise(entries):
                if after.old not in (before.new, before.old):
                    raise Invariant(f"{name}:{tag}: lost update between {before} and {after}")


def _raw_tensors(data: bytes) -> dict[str, bytes]:
    """name -> raw bytes of a safetensors file (stdlib only, so the check needs no torch)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    start = 8 + length
    return {name: data[start + e["data_offsets"][0] : start + e["data_offsets"][1]] for name, e in header.items()}


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="adapterkit-stress-"))
    root = Path(args.store) if args.store else work / "store"
    stress = Stress(root, work, rng, args.dim)
    Store(root).add(stress.folders[0], "a")
    stats = Stats()
    started = time.perf_counter()
    running: list[Runner] = []
    try:
        while stats.kills < args.kills:
            while len(running) < args.workers:
                running.append(stress.spawn())
            time.sleep(rng.uniform(0.0, args.max_delay))
            victim = rng.choice(running)
            if victim.proc.poll() is None:
                victim.proc.send_signal(signal.SIGKILL)
            for runner in [r for r in running if r.proc.poll() is not None]:
                running.remove(runner)
                stress.finish(runner, stats)
            if stats.kills >= (stats.checks + 1) * args.check_every:
                for runner in running:
                    runner.proc.wait()
                    stress.finish(runner, stats)
                running.clear()
                stress.check(stats)
                print(
                    f"{stats.kills} kills, {sum(stats.completed.values())} completed, "
                    f"{time.perf_counter() - started:.0f} s: store ok",
                    flush=True,
                )
        for runner in running:
            runner.proc.wait()
            stress.finish(runner, stats)
        stress.check(stats)
        report = stress.store.gc(grace=0)
        leftover = list(stress.store.tmp.iterdir()) if stress.store.tmp.is_dir() else []
        if leftover:
            raise Invariant(f"gc --grace 0s left temp files: {leftover[:3]}")
        final = stress.store.verify(full=True)
        if not final.ok:
            raise Invariant(f"final verify: {final.problems}")
    except Invariant as exc:
        for runner in running:
            runner.proc.kill()
        print(f"FAILED after {stats.kills} kills: {exc}", file=sys.stderr)
        print(f"store kept at {root}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {
        "kills": stats.kills,
        "killed_by_op": dict(stats.killed_by_op),
        "completed": dict(stats.completed),
        "refused_cleanly": dict(stats.refused),
        "checks": stats.checks,
        "stale_temp_files_seen": stats.temp_files_seen,
        "final_gc_removed": len(report.removed),
        "seconds": round(elapsed, 1),
        "commands_per_second": round((stats.kills + sum(stats.completed.values())) / elapsed, 1),
    }
    print(json.dumps(summary, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="stop after this many processes were SIGKILLed")
    parser.add_argument("--workers", type=int, default=8, help="CLI processes running at once")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dim", type=int, default=1024, help="adapter width (weights: 4 modules x 2 x 16 x dim x 4 B)")
    parser.add_argument("--max-delay", type=float, default=0.15, help="longest pause between kills, in seconds")
    parser.add_argument("--check-every", type=int, default=25, help="drain and check the store every N kills")
    parser.add_argument("--store", help="store directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
