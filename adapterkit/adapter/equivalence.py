"""How far what a runtime will apply is from what the store holds: the equivalence certificate.

Every export re-reads what it wrote and compares, module by module, the weight change the target
will apply (its factors and its own scaling rule) with the stored one (``scaling * B @ A``). The
number reported is the Frobenius norm of the difference over the larger of the two norms (0 when
both are zero), computed exactly in float64 from the factors without forming either matrix: an
8B-sized adapter's deltas would take gigabytes, its factors take megabytes.

For ``D1 = B1 @ A1`` and ``D2 = B2 @ A2``, ``D1 - D2 = [B1, -B2] @ [A1; A2] = U @ V``; with
``U = Qu Ru`` and ``V.T = Qv Rv`` (thin QR), ``||U V||_F = ||Ru Rv.T||_F``, a product of two small
(2r x 2r) matrices. QR keeps the error near float64's epsilon, where the Gram-matrix shortcut would
square the condition and floor the measure at about 1e-8.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from adapterkit.adapter.model import Adapter

__all__ = ["Certificate", "Factors", "compare_adapters", "relative_difference"]


@dataclass(frozen=True)
class Factors:
    """A module's weight change as a runtime holds it: ``scale * B @ A`` (A is (r, in), B is (out, r))."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B * scale, A)`` as float64 matrices (A flattened past its first dimension)."""
        a = self.A.detach().to(torch.float64).reshape(self.A.shape[0], -1)
        b = self.B.detach().to(torch.float64).reshape(self.B.shape[0], -1) * self.scale
        return b, a


def _norm_of_product(u: torch.Tensor, v: torch.Tensor) -> float:
    """``||u @ v||_F`` for u (m, k) and v (k, n), from thin QR factors (no m x n matrix formed)."""
    if u.shape[1] == 0:
        return 0.0
    _, ru = torch.linalg.qr(u)
    _, rv = torch.linalg.qr(v.T)
    return float(torch.linalg.matrix_norm(ru @ rv.T))


def _trimmed(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors without trailing rank components that are zero in both (what padding added)."""
    keep = b.shape[1]
    while keep and not b[:, keep - 1].any() and not a[keep - 1].any():
        keep -= 1
    return b[:, :keep], a[:keep]


def _same_product(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> bool:
    """Whether the scaled factors are equal, element for element, up to zero padding: then so are the deltas."""
    b1, a1 = _trimmed(b1, a1)
    b2, a2 = _trimmed(b2, a2)
    return b1.shape == b2.shape and a1.shape == a2.shape and torch.equal(a1, a2) and torch.equal(b1, b2)


def relative_difference(stored: Factors, target: Factors) -> float:
    """``||D_target - D_stored||_F / max(||D_target||_F, ||D_stored||_F)``, 0.0 when both are zero.

    Factors equal element for element once scaled (and zero padding dropped) give exactly 0.0;
    shapes of the two deltas must agree.
    """
    b1, a1 = stored.matrices()
    b2, a2 = target.matrices()
    if b1.shape[0] != b2.shape[0] or a1.shape[1] != a2.shape[1]:
        raise ValueError(f"deltas of different shapes: {b1.shape[0]}x{a1.shape[1]} and {b2.shape[0]}x{a2.shape[1]}")
    if _same_product(b1, a1, b2, a2):
        return 0.0
    scale = max(_norm_of_product(b1, a1), _norm_of_product(b2, a2))
    if scale == 0.0:
        return 0.0
    diff = _norm_of_product(torch.cat([b1, -b2], dim=1), torch.cat([a1, a2], dim=0))
    return diff / scale


@dataclass
class Certificate:
    """Per-module relative differences between what an export's target applies and the stored deltas."""

    #: How the written files were read back (e.g. "gguf: llama.cpp scale rule", "peft: adapter_config.json").
    method: str
    modules: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, stored: Factors, target: Factors) -> None:
        self.modules[name] = relative_difference(stored, target)

    @property
    def max_rel_diff(self) -> float:
        return max(self.modules.values(), default=0.0)

    @property
    def worst(self) -> str | None:
        """The module with the largest difference (the first in name order among equals); None when all are 0."""
        if not self.modules or self.max_rel_diff == 0.0:
            return None
        return max(sorted(self.modules), key=lambda name: self.modules[name])

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "max_rel_diff": self.max_rel_diff,
            "worst_module": self.worst,
            "modules": dict(sorted(self.modules.items())),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Certificate:
        return cls(method=doc["method"], modules=dict(doc["modules"]))


def compare_adapters(stored: Adapter, written: Adapter, method: str) -> Certificate:
    """Each stored module against the same module of ``written`` (a missing one counts as 1: nothing applied)."""
    certificate = Certificate(method=method)
    for name, module in stored.modules.items():
        other = written.modules.get(name)
        if other is None:
            certificate.modules[name] = 1.0
            continue
        certificate.add(
            name,
            Factors(module.A, module.B, module.spec.scaling),
            Factors(other.A, other.B, other.spec.scaling),
        )
    return certificate
