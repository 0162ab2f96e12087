"""Shared fixtures: real PEFT adapters on a tiny Llama (built once per session), synthetic adapters, stores.

Building real adapters needs torch, transformers and peft (about 3 s), so it happens once, in a
session-scoped fixture; tests copy the folders they mutate. ``make_adapter`` writes a valid PEFT
LoRA folder directly (config + canonical safetensors) without torch, for tests that need many
distinct adapters or large ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterkit import Store
from adapterkit.files.safetensors import serialize

# tests/helpers.py is imported as a top-level module whatever pytest's import mode is.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@dataclass(frozen=True)
class PeftFolders:
    """Folders written by PEFT/transformers themselves (see tests/helpers.py)."""

    base: Path  #: tiny Llama base model (safetensors), hidden size 32
    other_base: Path  #: same architecture family with hidden size 48: every module has the wrong shape
    lora: Path  #: r=8 on q_proj, v_proj
    lora2: Path  #: r=4 on q_proj, k_proj, v_proj, o_proj
    lora_bin: Path  #: ``lora`` saved as adapter_model.bin (safe_serialization=False)
    lora_mlp: Path  #: r=8 on gate_proj, up_proj, down_proj


@pytest.fixture(scope="session")
def peft_folders(tmp_path_factory: pytest.TempPathFactory) -> PeftFolders:
    """Real PEFT adapters on a tiny Llama, built once per session (tests must copy before mutating)."""
    from helpers import make_lora, save_base, save_lora, tiny_llama

    root = tmp_path_factory.mktemp("peft")
    base = tiny_llama(seed=0)
    save_base(base, root / "base")
    save_base(tiny_llama(seed=0, hidden_size=48, num_attention_heads=4, num_key_value_heads=2), root / "other_base")
    save_lora(base, root / "lora", seed=1)
    save_lora(base, root / "lora2", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    make_lora(base, seed=1).save_pretrained(root / "lora_bin", safe_serialization=False)
    save_lora(base, root / "lora_mlp", seed=3, target_modules=["gate_proj", "up_proj", "down_proj"])
    return PeftFolders(
        base=root / "base",
        other_base=root / "other_base",
        lora=root / "lora",
        lora2=root / "lora2",
        lora_bin=root / "lora_bin",
        lora_mlp=root / "lora_mlp",
    )


def write_adapter_folder(
    path: Path,
    *,
    seed: int = 0,
    modules: int = 4,
    dim: int = 64,
    r: int = 8,
    config: dict[str, Any] | None = None,
    readme: str | None = "# synthetic adapter\n",
) -> Path:
    """A valid PEFT LoRA folder of ``modules`` q/v projections with random F32 factors (no torch needed).

    Size of the weights: ``modules * 2 * r * dim * 4`` bytes. ``config`` entries override the defaults.
    """
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for index in range(modules):
        layer, proj = divmod(index, 2)
        module = f"base_model.model.model.layers.{layer}.self_attn.{'qv'[proj]}_proj"
        a = rng.standard_normal((r, dim), dtype=np.float32)
        b = rng.standard_normal((dim, r), dtype=np.float32)
        tensors[f"{module}.lora_A.weight"] = ("F32", (r, dim), a.tobytes())
        tensors[f"{module}.lora_B.weight"] = ("F32", (dim, r), b.tobytes())
    doc: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
    }
    doc.update(config or {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(doc, indent=2), "utf-8")
    (path / "adapter_model.safetensors").write_bytes(serialize(tensors))
    if readme is not None:
        (path / "README.md").write_text(readme, "utf-8")
    return path


@pytest.fixture
def write_folder() -> Callable[..., Path]:
    """:func:`write_adapter_folder` itself, for tests that choose where each folder goes."""
    return write_adapter_folder


@pytest.fixture
def make_adapter(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_adapter("name", seed=1, dim=256, ...)`` writes a synthetic PEFT folder under tmp_path."""

    def make(name: str = "adapter", **kwargs: Any) -> Path:
        return write_adapter_folder(tmp_path / "src" / name, **kwargs)

    return make


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An empty store in a fresh directory (created on first write)."""
    yield Store(tmp_path / "store")


def _tree_snapshot(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for dirname in dirnames:
            out[(Path(dirpath) / dirname).relative_to(root).as_posix() + "/"] = "dir"
        for filename in filenames:
            path = Path(dirpath) / filename
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def snapshot() -> Callable[[Path], dict[str, str]]:
    """``snapshot(root)``: every file and directory under ``root`` -> sha256 of its content (``"dir"``)."""
    return _tree_snapshot


@pytest.fixture
def copy_folder(tmp_path: Path) -> Callable[[Path, str], Path]:
    """``copy_folder(source, name)``: a private copy of a (session-scoped) folder to mutate."""

    def copy(source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, tmp_path / "copies" / name))

    return copy
