"""Rewrite an adapter's factors without changing its deltas: padding ranks and folding scalings.

Runtimes read a LoRA's scaling in their own way: vLLM takes one ``r`` and ``lora_alpha`` for the
whole adapter and ignores ``rank_pattern``/``alpha_pattern``; PEFT's compiled hotswapping needs
every adapter padded to one rank; llama.cpp reads one alpha per file. An adapter with per-module
ranks, alphas or rsLoRA is still exactly representable for all of them: a module's delta is
``scaling * B @ A``, so any part of the scaling can move into ``B``, and zero rows of ``A`` with
zero columns of ``B`` add nothing. These are pure functions of the in-memory adapter.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from adapterkit.adapter.config import delta_blockers
from adapterkit.adapter.dtypes import all_finite
from adapterkit.adapter.model import Adapter, LoraModule
from adapterkit.errors import ExportError

__all__ = ["common_scaling", "fold_into_b", "pad_rank", "refuse_non_lora_deltas"]


def refuse_non_lora_deltas(adapter: Adapter, what: str) -> None:
    """ExportError when a module's delta is not ``scaling * B @ A`` (DoRA, LoRA biases, PiSSA, ...).

    ``what`` names the operation, e.g. ``"--pad-rank"``: folding a scaling into ``B`` is exact only for
    a plain LoRA product.
    """
    blocking = delta_blockers(adapter.config)
    if blocking:
        raise ExportError(
            f"{what} rewrites the LoRA factors, which is exact only when every delta is scaling * B @ A; "
            f"this adapter sets {', '.join(repr(f) for f in blocking)}"
        )


def fold_into_b(module: LoraModule, factor: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``B * factor`` in ``dtype`` (B's own by default), rounded once from float64; B itself when factor is 1.

    A non-finite result (an overflow in float16) raises :class:`ExportError` naming the module:
    adapterkit never writes a NaN or an infinity.
    """
    target = dtype or module.B.dtype
    out = module.B.to(target) if factor == 1.0 else (module.B.to(torch.float64) * factor).to(target)
    if not all_finite(out):
        raise ExportError(
            f"module {module.name!r}: its factor B times the scaling {factor:g} does not fit {str(target)[6:]} "
            "(it would be written as infinity or NaN); export with a wider dtype"
        )
    return out


def common_scaling(modules: Mapping[str, LoraModule]) -> float:
    """The scaling shared by the most parameters (the smallest among ties); 1.0 when that is 0.

    Choosing it as the adapter's one scaling leaves those modules' factors untouched (bit-exact) and
    folds only the others'.
    """
    weight: Counter[float] = Counter()
    for module in modules.values():
        weight[module.spec.scaling] += module.spec.num_parameters
    if not weight:
        return 1.0
    best = max(weight.values())
    chosen = min(s for s, w in weight.items() if w == best)
    return chosen if chosen != 0.0 and math.isfinite(chosen) else 1.0


def _tidy(value: float) -> float | int:
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def pad_rank(adapter: Adapter, rank: int) -> Adapter:
    """The same adapter with every module at rank ``rank`` and one ``r``/``lora_alpha`` for all of them.

    Each module's ``A`` gains zero rows and ``B`` zero columns up to ``rank`` (their product is
    unchanged), and ``B`` is multiplied by the module's scaling over the common one (see
    :func:`common_scaling`), so that ``lora_alpha / r`` (no rsLoRA, no rank or alpha patterns) gives
    every module its exact original delta. Modules already at the common scaling keep their ``B``
    bit for bit. Everything else in the config and the extra tensors is kept as it is.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ExportError(f"--pad-rank must be a positive integer, got {rank!r}")
    refuse_non_lora_deltas(adapter, "--pad-rank")
    too_big = [m for m in adapter.modules.values() if m.spec.r > rank]
    if too_big:
        worst = max(too_big, key=lambda m: (m.spec.r, m.name))
        raise ExportError(
            f"--pad-rank {rank} is below the rank of {len(too_big)} module(s) (largest: {worst.name!r} "
            f"has r={worst.spec.r}); padding cannot lower a rank"
        )
    scaling = common_scaling(adapter.modules)
    config: dict[str, Any] = dict(adapter.config)
    config.update(r=rank, lora_alpha=_tidy(rank * scaling), use_rslora=False, rank_pattern={}, alpha_pattern={})
    modules: dict[str, LoraModule] = {}
    for name, module in adapter.modules.items():
        spec = module.spec
        a = torch.zeros((rank, *module.A.shape[1:]), dtype=module.A.dtype)
        a[: spec.r] = module.A
        b = torch.zeros((module.B.shape[0], rank, *module.B.shape[2:]), dtype=module.B.dtype)
        b[:, : spec.r] = fold_into_b(module, spec.scaling / scaling)
        new_spec = dataclasses.replace(spec, r=rank, alpha=config["lora_alpha"], scaling=config["lora_alpha"] / rank)
        modules[name] = LoraModule(new_spec, a, b)
    return Adapter(
        config=config,
        modules=modules,
        extra_tensors=dict(adapter.extra_tensors),
        key_prefix=adapter.key_prefix,
        metadata=None,
        digest=None,
    )
