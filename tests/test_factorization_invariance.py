"""A blend depends on each parent's changes, not on how they happen to be factored (README's claim).

``B A = (B Q)(Q⁻¹ A)`` for any invertible r x r ``Q``: an adapter re-factored that way is the same adapter to
PEFT and to a merge. PEFT's ``ties``/``dare_*``/``magnitude_prune`` act on the raw factors and give another
result; adapterkit's act on each module's dense change and must give the same one. The parents differ in
rank, alpha, rsLoRA, patterns and targets, and include an embedding module.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import MIXED_LORA_SPECS, save_lora, tiny_llama

from adapterkit import compose
from adapterkit.adapter.model import Adapter, LoraModule
from adapterkit.formats.peft import read_adapter

WEIGHTS = [0.7, -0.4, 0.55]
FULL_RANK = 256  # above every module's smaller side: no truncation


def in_float64(adapter: Adapter) -> Adapter:
    out = copy.copy(adapter)
    out.modules = {
        name: LoraModule(module.spec, module.A.double(), module.B.double()) for name, module in adapter.modules.items()
    }
    return out


def refactored(adapter: Adapter, seed: int) -> Adapter:
    """The same adapter with every module's factors replaced by ``(B Q, Q⁻¹ A)`` for a random invertible ``Q``.

    ``Q = U diag(s) V`` with random orthogonal U, V and s in [0.25, 4]: far from orthogonal (so it changes every
    entry of both factors and their magnitudes), yet well conditioned (so the products agree to rounding).
    """
    generator = torch.Generator().manual_seed(seed)
    out = copy.copy(adapter)
    out.modules = {}
    for name, module in adapter.modules.items():
        r = module.A.shape[0]
        U = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=torch.float64)).Q
        s = 4.0 ** (2 * torch.rand(r, generator=generator, dtype=torch.float64) - 1)
        Q, Q_inv = U @ torch.diag(s) @ V, V.T @ torch.diag(1 / s) @ U.T
        A = (Q_inv @ module.A.flatten(1)).reshape(module.A.shape)
        B = (module.B.flatten(1) @ Q).reshape(module.B.shape)
        assert (A - module.A).abs().max() > 0.1 * module.A.abs().max()  # really other factors
        out.modules[name] = LoraModule(module.spec, A, B)
    return out


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> list[Adapter]:
    root: Path = tmp_path_factory.mktemp("parents")
    base = tiny_llama()
    return [
        in_float64(read_adapter(save_lora(base, root / f"p{i}", seed=i + 11, **spec)))
        for i, spec in enumerate(MIXED_LORA_SPECS)
    ]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = [
    ("ties", {"density": 0.4}),
    ("ties", {"density": 0.4, "majority_sign_method": "frequency", "elect_on": "unweighted"}),
    ("dare_linear", {"density": 0.6, "seed": 3}),
    ("dare_ties", {"density": 0.6, "seed": 3}),
    ("magnitude_prune", {"density": 0.3}),
    ("svd", {}),
    ("linear", {}),
]


@pytest.mark.parametrize(("strategy", "params"), CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)])
def test_the_blend_does_not_depend_on_the_factorization(
    parents: list[Adapter], strategy: str, params: dict[str, object]
) -> None:
    others = [refactored(parent, seed=i) for i, parent in enumerate(parents)]
    rank = {} if strategy == "linear" else {"rank": FULL_RANK}
    ours = compose(parents, WEIGHTS, strategy, dtype=torch.float64, **rank, **params)
    theirs = compose(others, WEIGHTS, strategy, dtype=torch.float64, **rank, **params)
    assert set(ours.modules) == set(theirs.modules)
    for name in ours.modules:
        assert rel(theirs.delta(name, torch.float64), ours.delta(name, torch.float64)) <= 1e-11, name


@pytest.mark.parametrize("strategy", ["ties", "dare_ties", "magnitude_prune"])
def test_the_truncated_blend_does_not_depend_on_the_factorization(parents: list[Adapter], strategy: str) -> None:
    """Truncated to rank 4: the same dense change, hence the same best rank-4 approximation and error."""
    others = [refactored(parent, seed=10 + i) for i, parent in enumerate(parents)]
    ours = compose(parents, WEIGHTS, strategy, density=0.5, rank=4, dtype=torch.float64)
    theirs = compose(others, WEIGHTS, strategy, density=0.5, rank=4, dtype=torch.float64)
    for name in ours.modules:
        assert rel(theirs.delta(name, torch.float64), ours.delta(name, torch.float64)) <= 1e-11, name
    errors, other_errors = (b.metadata["lineage"]["truncation_error"] for b in (ours, theirs))
    assert errors.keys() == other_errors.keys()
    for name, error in errors.items():
        assert other_errors[name] == pytest.approx(error, rel=1e-10, abs=1e-12), name


@pytest.mark.parametrize("strategy", ["ties", "dare_linear", "magnitude_prune"])
def test_large_modules_sketched_truncation_does_not_depend_on_the_factorization(
    strategy: str, tmp_path: Path, write_folder: Any
) -> None:
    """640 x 640 modules: thresholds bracketed from a sample, several row blocks, a sketched truncation."""
    parents = [in_float64(read_adapter(write_folder(tmp_path / f"p{i}", seed=i, dim=640, modules=2))) for i in range(2)]
    others = [refactored(parent, seed=20 + i) for i, parent in enumerate(parents)]
    params = {"density": 0.5, "rank": 8, "dtype": torch.float64} | ({"seed": 1} if strategy == "dare_linear" else {})
    ours = compose(parents, [0.8, -0.5], strategy, **params)
    theirs = compose(others, [0.8, -0.5], strategy, **params)
    for name in ours.modules:
        assert rel(theirs.delta(name, torch.float64), ours.delta(name, torch.float64)) <= 1e-11, name
