"""The store's side of issue 13: no NaN ever stored, a warning for an adapter that changes nothing,
a read-only store that verify and gc --dry-run still report on, and a pickle refused in one line.

The NaN check is :class:`adapterkit.files.safetensors.TensorScan`: it reads the bytes that ``add``,
``Store.put`` and ``pull`` stream into the store anyway, so the store never reads them twice and
never imports torch for it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_adapter_folder

from adapterkit import Store
from adapterkit.errors import NonFiniteError
from adapterkit.files.safetensors import FLOAT_BITS, TensorScan, scanned, serialize

Snapshot = Callable[[Path], dict[str, str]]

#: For each floating dtype: the bytes of one NaN, one +infinity (where the dtype has one) and one -0.0.
SPECIAL = {
    "F64": (np.array([np.nan, np.inf, -0.0], "<f8").tobytes(), 8),
    "F32": (np.array([np.nan, np.inf, -0.0], "<f4").tobytes(), 4),
    "F16": (np.array([np.nan, np.inf, -0.0], "<f2").tobytes(), 2),
    "BF16": (bytes.fromhex("c07f807f0080"), 2),
    "F8_E5M2": (bytes.fromhex("7e7c80"), 1),
    "F8_E4M3": (bytes.fromhex("7fff80"), 1),  # e4m3fn: no infinity, 0x7f and 0xff are NaN
}


def _stream(tensors: dict[str, tuple[str, tuple[int, ...], bytes]], chunk: int) -> Iterator[bytes]:
    data = serialize(tensors)
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
@pytest.mark.parametrize("dtype", sorted(SPECIAL))
def test_the_scan_finds_nan_and_infinity_in_every_float_dtype_across_chunk_boundaries(dtype: str, chunk: int) -> None:
    special, size = SPECIAL[dtype]
    fine = np.arange(1, 17, dtype="<u1").tobytes() if size == 1 else np.ones(16, f"<f{size}").tobytes()
    if dtype == "BF16":
        fine = bytes.fromhex("803f") * 16  # 1.0
    for index in range(2):  # the NaN, then the infinity (a second NaN for F8_E4M3)
        bad = special[index * size : (index + 1) * size]
        tensors = {
            "a.ints": ("I32", (4,), np.array([-1, 0x7F800000, 2, 3], "<i4").tobytes()),  # not floats: never flagged
            "b.weights": (dtype, (20,), fine[: 9 * size] + bad + fine[: 10 * size]),
        }
        scan = TensorScan("FILE")
        with pytest.raises(NonFiniteError, match=r"^FILE: tensor 'b.weights' holds a non-finite value .* element 9;"):
            list(scanned(_stream(tensors, chunk), scan))
    zero = {"z": (dtype, (3,), special[2 * size :] * 3), "n": (dtype, (16,), fine[: 16 * size])}
    scan = TensorScan("FILE")
    list(scanned(_stream(zero, chunk), scan))
    assert scan.zero_tensors == {"z"}  # -0.0 is zero; any magnitude bit is not


def test_the_scan_defers_for_streams_checked_as_they_end() -> None:
    tensors = {"w": ("F32", (2,), np.array([np.nan, 1], "<f4").tobytes())}
    scan = TensorScan("FILE", defer=True)
    chunks = iter(_stream(tensors, 5))
    for chunk in chunks:
        scan.feed(chunk)  # no refusal yet: the caller's own integrity check comes first
    with pytest.raises(NonFiniteError, match="tensor 'w'"):
        scan.finish()
    garbage = TensorScan("FILE")
    garbage.feed(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" + b"\xff" * 64)  # not our business: the hash is
    garbage.finish()
    assert set(FLOAT_BITS) == {"F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3", "F8_E8M0"}


def _nan_folder(path: Path, value: float = np.nan) -> Path:
    folder = write_adapter_folder(path, modules=2, dim=8, r=2)
    raw = bytearray((folder / "adapter_model.safetensors").read_bytes())
    raw[-8:-4] = np.array([value], "<f4").tobytes()
    (folder / "adapter_model.safetensors").write_bytes(bytes(raw))
    return folder


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_add_refuses_a_non_finite_tensor_and_stores_nothing(
    store: Store, tmp_path: Path, snapshot: Snapshot, value: float
) -> None:
    store.add(write_adapter_folder(tmp_path / "fine"), "fine")
    before = snapshot(store.root)
    folder = _nan_folder(tmp_path / "bad", value)
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"  # the last tensor in canonical order
    with pytest.raises(NonFiniteError, match=f"adapter_model.safetensors: tensor '{name}' holds a non-finite"):
        store.add(folder, "bad")
    assert snapshot(store.root) == before


def test_add_of_a_bin_and_put_refuse_non_finite_tensors_too(store: Store, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from adapterkit.formats.peft import read_adapter

    folder = _nan_folder(tmp_path / "bad")
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    with pytest.raises(NonFiniteError, match=r"adapter_model.bin: tensor .* holds a non-finite"):
        store.add(folder, "bad")
    adapter = read_adapter(write_adapter_folder(tmp_path / "fine"))
    name = sorted(adapter.modules)[0]
    adapter.modules[name].A[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the adapter to store: tensor .*lora_A.weight' holds a non-finite"):
        store.put(adapter, "bad")
    assert store.list() == []


def test_pull_refuses_an_adapter_with_a_non_finite_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote written before the check (here: with the scan switched off) cannot bring a NaN in."""
    from adapterkit.sync import pull, push

    old = Store(tmp_path / "old")
    with monkeypatch.context() as patched:
        patched.setattr(TensorScan, "feed", lambda self, chunk: None)
        old.add(_nan_folder(tmp_path / "bad"), "team/bad")
    push(old, "team/bad", str(tmp_path / "remote"))
    fresh = Store(tmp_path / "fresh")
    with pytest.raises(NonFiniteError, match=r"team/bad:latest: adapter_model\.safetensors: tensor .* holds a non-"):
        pull(fresh, f"{tmp_path / 'remote'}/team/bad")
    assert fresh.list() == [] and not any(fresh.manifests)
    assert fresh.verify().ok


def test_add_warns_about_an_adapter_that_changes_nothing(store: Store, tmp_path: Path) -> None:
    folder = write_adapter_folder(tmp_path / "untrained", modules=2, dim=8, r=2)
    tensors = {}
    for key in ("q", "v"):
        module = f"base_model.model.model.layers.0.self_attn.{key}_proj"
        tensors[f"{module}.lora_A.weight"] = ("F32", (2, 8), np.ones((2, 8), "<f4").tobytes())
        tensors[f"{module}.lora_B.weight"] = ("F32", (8, 2), np.zeros((8, 2), "<f4").tobytes())  # PEFT's init
    (folder / "adapter_model.safetensors").write_bytes(serialize(tensors))
    with pytest.warns(UserWarning, match=r"every module's lora_B .* is all zeros, so this adapter changes nothing"):
        result = store.add(folder, "untrained")
    assert store.show("untrained")["digest"] == result.digest  # stored anyway: it is a valid adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.add(write_adapter_folder(tmp_path / "trained"), "trained")


def test_a_plain_pickle_is_refused_in_one_line_without_torchs_warning(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with (folder / "adapter_model.bin").open("wb") as fh:
        pickle.dump({"base_model.model.x.lora_A.weight": torch.zeros(2, 3)}, fh, protocol=4)
    proc = subprocess.run(
        [sys.executable, "-m", "adapterkit", "--store", str(tmp_path / "s"), "add", str(folder), "-t", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"Error: {folder / 'adapter_model.bin'}: is a pickle of protocol 4, which torch's safe loader cannot read; "
        "adapterkit never unpickles, so it is refused for safety: where you trust the file, convert it with "
        "torch.load(it, weights_only=False) and safetensors' save_file(state_dict, 'adapter_model.safetensors')"
    ]


# --- a store this user cannot write ------------------------------------------------------------------------------

#: Capabilities that let root ignore file modes; dropped so that a read-only store is read-only for the test.
_OVERRIDES = "-dac_override,-dac_read_search,-fowner"


def _as_reader(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user who may read but not write the store (root, without its power to ignore file modes)."""
    command = [sys.executable, "-m", "adapterkit", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: file modes cannot make the store read-only")
        command = [setpriv, f"--inh-caps={_OVERRIDES}", f"--bounding-set={_OVERRIDES}", *command]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def _chmod_tree(root: Path, files: int, dirs: int) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), files)
        os.chmod(dirpath, dirs)


def test_verify_and_gc_dry_run_report_on_a_store_they_cannot_write(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    store.add(write_adapter_folder(tmp_path / "a", seed=1), "team/a")
    digest = store.add(write_adapter_folder(tmp_path / "b", seed=2), "team/b").digest
    store.remove("team/b")
    weights = next(p for p in store.blobs.root.rglob("*") if p.is_file() and p.stat().st_size > 1000)
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    _chmod_tree(root, 0o444, 0o555)
    try:
        probe = _as_reader(["--store", str(root), "list"])
        assert probe.returncode == 0, probe.stderr  # reading works
        assert _as_reader(["--store", str(root), "tag", "team/a", "team/c"]).returncode == 1  # writing does not

        verify = _as_reader(["--store", str(root), "verify"])
        assert verify.returncode == 1, verify.stderr  # a problem found and reported, not "Permission denied"
        assert verify.stderr == "", verify.stderr
        assert "not moved to corrupt/ (Permission denied): run verify with write access to the store" in verify.stdout
        assert "note: the store cannot be written here, so 1 corrupt object stayed in place" in verify.stdout
        assert weights.exists() and not (root / "corrupt").exists()
        dry = _as_reader(["--store", str(root), "gc", "--dry-run", "--json"])
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout)["kept_unreachable"] == {"manifests": 1, "blobs": 1}  # team/b, in its grace
        dry = _as_reader(["--store", str(root), "gc", "--dry-run", "--grace", "0s"])
        assert dry.returncode == 0, dry.stderr
        assert f"would remove manifests/sha256/{digest[7:9]}/{digest[9:]}" in dry.stdout
        really = _as_reader(["--store", str(root), "gc", "--grace", "0s"])
        assert really.returncode == 1 and really.stderr.startswith("Error: cannot gc store")  # writing still refused
    finally:
        _chmod_tree(root, 0o644, 0o755)
