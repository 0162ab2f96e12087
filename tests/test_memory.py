"""Memory claims of README, measured: ``svd`` never forms the out x in matrix, ``merge`` streams the base.

Each measured command is the real CLI in its own process; its peak resident set size is the kernel's
``ru_maxrss`` for that process alone, read with ``os.wait4``. The bounds are generous (several times what
the commands need today, so allocator or library changes do not trip them) and still far below what
breaking the claim costs:

* ``compose --strategy svd`` of two r=16 adapters on one 65536 x 32768 module, and ``inspect`` of them: the
  factors are 12 MB, the dense change 8 GiB of float32. Each process runs under an address-space limit of
  4 GiB, half the dense size, so a regression that forms the matrix fails with an allocation error instead
  of taking 8 GiB from the machine, and it must peak below 1 GiB.
* ``merge`` of one adapter into a 64 MiB and a 512 MiB base (single shards; the largest tensor, 16 MiB,
  is the same in both): the two peaks may differ by at most the largest tensor, where loading the base
  (or a shard) would add the 448 MiB the bases differ by.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "adapterkit"]
MIB = 1 << 20
GIB = 1 << 30
#: Runs its arguments under an address-space limit (RLIMIT_AS, bytes in argv[1]); exec keeps the process id.
_LIMITED = (
    "import os, resource, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); os.execv(sys.argv[2], sys.argv[2:])"
)


def run_measured(args: list[str], store: Path, tmp: Path, address_space: int | None = None) -> tuple[int, str, int]:
    """(exit status, stderr, peak RSS in bytes) of the CLI run with ``args`` in a process of its own."""
    command = [*CLI, "--store", str(store), *args]
    if address_space is not None:
        command = [sys.executable, "-c", _LIMITED, str(address_space), *command]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out, err = tmp / "stdout", tmp / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
    return process.returncode, err.read_text(errors="replace"), usage.ru_maxrss * 1024  # Linux: KiB


def lora_folder(path: Path, module: str, shape: tuple[int, int], r: int, seed: int) -> Path:
    out_dim, in_dim = shape
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    key = f"base_model.model.{module}"
    save_file(
        {
            f"{key}.lora_A.weight": rng.standard_normal((r, in_dim), dtype=np.float32),
            f"{key}.lora_B.weight": rng.standard_normal((out_dim, r), dtype=np.float32),
        },
        str(path / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": [module.rsplit(".", 1)[1]]}
    (path / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/base"}))
    return path


def add(store: Path, folder: Path, ref: str) -> None:
    result = subprocess.run([*CLI, "--store", str(store), "add", str(folder), "--tag", ref], capture_output=True)
    assert result.returncode == 0, result.stderr


def test_svd_compose_and_inspect_never_form_the_dense_matrix(tmp_path: Path) -> None:
    module, shape = "model.layers.0.mlp.up_proj", (65536, 32768)
    dense_bytes = shape[0] * shape[1] * 4
    assert dense_bytes == 8 * GIB
    store = tmp_path / "store"
    for i in range(2):
        add(store, lora_folder(tmp_path / f"a{i}", module, shape, 16, seed=i), f"huge{i}")
    status, stderr, peak = run_measured(
        ["compose", "huge0", "huge1", "-w", "0.7,-0.4", "-s", "svd", "--rank", "16", "--tag", "blend"],
        store,
        tmp_path,
        address_space=dense_bytes // 2,
    )
    print(f"compose --strategy svd, 65536 x 32768, two r=16 parents: peak RSS {peak / MIB:.0f} MiB")
    assert status == 0, stderr
    assert peak < GIB, f"peak RSS {peak / MIB:.0f} MiB"
    assert (
        "blend:latest"
        in subprocess.run([*CLI, "--store", str(store), "list"], capture_output=True, text=True, check=True).stdout
    )
    # docs/inspect.md: inspect measures from the factors alone (spectra, cosines, sampled sign conflicts)
    status, stderr, peak = run_measured(
        ["inspect", "huge0", "huge1", "-w", "0.7,-0.4"], store, tmp_path, address_space=dense_bytes // 2
    )
    print(f"inspect of the same two adapters: peak RSS {peak / MIB:.0f} MiB")
    assert status == 0, stderr
    assert peak < GIB, f"peak RSS {peak / MIB:.0f} MiB"


def write_base(folder: Path, tensors: int, shape: tuple[int, int]) -> int:
    """A single-shard base of ``tensors`` float32 tensors of ``shape``, written tensor by tensor; returns its size."""
    size = shape[0] * shape[1] * 4
    header = {
        f"model.layers.{i}.mlp.up_proj.weight": {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [i * size, (i + 1) * size],
        }
        for i in range(tensors)
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(tensors)
    folder.mkdir(parents=True)
    with (folder / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(tensors):
            fh.write(rng.standard_normal(shape, dtype=np.float32).tobytes())
    return tensors * size


def test_merge_memory_does_not_grow_with_the_base(tmp_path: Path) -> None:
    shape = (4096, 1024)
    largest = shape[0] * shape[1] * 4  # 16 MiB, the largest tensor of both bases
    store = tmp_path / "store"
    add(store, lora_folder(tmp_path / "lora", "model.layers.0.mlp.up_proj", shape, 16, seed=3), "lora")
    peaks = {}
    for tensors in (4, 32):  # 64 MiB and 512 MiB
        base = tmp_path / f"base{tensors}"
        size = write_base(base, tensors, shape)
        out = tmp_path / f"merged{tensors}"
        status, stderr, peaks[size] = run_measured(
            ["merge", "lora", "--base", str(base), "--out", str(out)], store, tmp_path
        )
        assert status == 0, stderr
        assert abs((out / "model.safetensors").stat().st_size - (base / "model.safetensors").stat().st_size) < 4096
    (small, small_peak), (big, big_peak) = sorted(peaks.items())
    assert big - small == 448 * MIB
    print(
        f"merge peak RSS: {small_peak / MIB:.0f} MiB into a {small / MIB:.0f} MiB base, "
        f"{big_peak / MIB:.0f} MiB into a {big / MIB:.0f} MiB base (largest tensor {largest / MIB:.0f} MiB)"
    )
    assert big_peak - small_peak < largest, f"peak RSS grew by {(big_peak - small_peak) / MIB:.0f} MiB"
