"""Digests are forever: the same inputs give the same digests in every version of adapterkit.

The values below were computed once (before the formats layer and the torch-free store) and must
never change; a change that must alter one is a store-format change (docs/store-format.md). The
adapters are built from fixed NumPy streams and the blend is ``linear`` (exact, no dependence on
BLAS order), so the digests do not depend on the machine. A blend's lineage records adapterkit's
version, so its digest is pinned for this version only.
"""

from __future__ import annotations

from pathlib import Path

import adapterkit
from adapterkit import Store, compose
from tests.conftest import write_adapter_folder
from tests.helpers import save_base, tiny_llama

PINNED = {
    "plain": "sha256:07993673c5c3e086017a4817c4c6a1856f906808283ca11142193f1d1f2c47d6",
    "with_base": "sha256:e7a3d2144f3b9f6d4bab36970c4c6d58dd0ec1f572e9e58f9e4b0c4b824cfb60",
    "rslora": "sha256:05fffb9c224c138326d264244a75a5079399d4b94cf305336467dd39d7d7170b",
}
PINNED_BLEND = {"0.1.0": "sha256:6b202196969d1ba41e4324a7e170de4ca5d46c378d8b22e75e5c9521f6651745"}


def test_digests_of_deterministic_adapters_never_change(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    first = write_adapter_folder(tmp_path / "a", seed=0, dim=32)
    second = write_adapter_folder(tmp_path / "b", seed=1, dim=32, r=4, config={"use_rslora": True})
    base = save_base(tiny_llama(num_key_value_heads=4), tmp_path / "base")
    digests = {
        "plain": store.add(first, "pin/a:v1").digest,
        "with_base": store.add(first, "pin/a:based", base=base).digest,
        "rslora": store.add(second, "pin/b:v1", base=base).digest,
    }
    assert digests == PINNED
    blend = compose([store.get("pin/a:based"), store.get("pin/b:v1")], [0.5, -1.0], "linear")
    digest = store.put(blend, "pin/ab").digest
    if adapterkit.__version__ in PINNED_BLEND:
        assert digest == PINNED_BLEND[adapterkit.__version__]
