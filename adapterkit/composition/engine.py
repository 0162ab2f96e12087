"""``compose``: blend adapters into a new adapter, with lineage.

This module is the dispatcher: it checks that the adapters belong together, pairs their
modules, folds each parent's scaling into its factors, hands every module to the strategy (pure
maths, on the chosen device) and assembles the result with a PEFT config that gives each module
its true scaling. Which strategies exist is the plugin manager's business. :func:`prepare` holds
every check made before the first module, shared by ``compose`` and its dry run.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.config import ModuleSpec, carried_features
from adapterkit.adapter.extras import DORA_NOT_A_DELTA
from adapterkit.base_identity import BaseIdentity, reconcile
from adapterkit.errors import (
    CompositionError,
    IncompatibleAdaptersError,
    NonFiniteError,
    UnknownStrategyError,
    UnsupportedAdapterError,
)
from adapterkit.strategies.base import ModuleInput, Strategy
from adapterkit.version import __version__
from adapterkit.weighting import check_finite_factors, check_weight_range, extra_trainable

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import Adapter, LoraModule
    from adapterkit.plugins import Plugins

__all__ = [
    "EMPTY_TOLERANCE_ULPS",
    "Blend",
    "ComposeProgress",
    "adapter_digest",
    "adapter_label",
    "check_compatible",
    "check_not_empty",
    "common_shape",
    "compose",
    "delta_norm",
    "derived_config",
    "prepare",
    "resolve_strategy",
]

#: ``progress(modules_done, modules_total, module_name)``, called after each module is blended.
ComposeProgress = Callable[[int, int, str], None]
#: A blend is empty when every module's delta is at most this many units of the working dtype's rounding
#: (its machine epsilon) times the parents' weighted deltas, sum_i |w_i| ||D_i||_F: see :func:`check_not_empty`.
EMPTY_TOLERANCE_ULPS = 64


def adapter_digest(adapter: Adapter) -> str:
    """The adapter's store digest, or for one never stored, the sha256 of its canonical files."""
    if adapter.digest:
        return adapter.digest
    from adapterkit.adapter.model import tensors_to_bytes
    from adapterkit.formats.peft import config_bytes

    hasher = hashlib.sha256(config_bytes(adapter.config))
    hasher.update(tensors_to_bytes(adapter.state_dict()))
    return "sha256:" + hasher.hexdigest()


def adapter_label(adapter: Adapter, index: int) -> str:
    """How messages name the ``index``-th adapter of a call: its position, and its digest when it has one."""
    return f"adapter {index + 1} ({adapter.digest[:19]})" if adapter.digest else f"adapter {index + 1}"


def check_compatible(adapters: Sequence[Adapter], *, force: bool = False) -> dict[str, Any] | None:
    """Refuse adapters that are not for one base, or whose change a weight cannot scale; returns the shared base entry.

    The base rule is :func:`adapterkit.base_identity.reconcile` (fingerprints, content digests and
    names, each compared where both adapters carry it); its warnings are issued as
    ``adapterkit:`` warnings, which the CLI prints as ``Warning:`` lines.
    """
    labels = [adapter_label(adapter, i) for i, adapter in enumerate(adapters)]
    sides = [BaseIdentity.of_adapter(adapter, label) for adapter, label in zip(adapters, labels, strict=True)]
    base_model, doubts = reconcile(sides, force=force, verb="blend")
    for doubt in doubts:
        warnings.warn(f"adapterkit: {doubt}", stacklevel=3)
    for adapter, label in zip(adapters, labels, strict=True):
        # Extra tensors (modules_to_save, trainable tokens) have no weighted sum, and fields such as
        # use_dora or a PiSSA init make a module's change something other than scaling * B @ A.
        if adapter.config.get("use_dora"):
            raise UnsupportedAdapterError(f"adapter {adapter_digest(adapter)[:19]} sets 'use_dora': {DORA_NOT_A_DELTA}")
        blocking = carried_features(adapter.config)
        if blocking:
            raise UnsupportedAdapterError(
                f"adapter {adapter_digest(adapter)[:19]} sets {blocking[0]!r}, which a blend cannot carry"
            )
        trained = extra_trainable(adapter)
        if trained:
            # A blend must be exact or refused: the LoRA part would get its weight, these tensors their full value.
            raise UnsupportedAdapterError(
                f"{label} trains more than its LoRA factors ({trained}); a blend cannot weight it"
            )
    return base_model


def common_shape(name: str, specs: list[ModuleSpec]) -> ModuleSpec:
    """The one shape every parent gives module ``name``, or IncompatibleAdaptersError naming both."""
    first = specs[0]
    for spec in specs[1:]:
        if (spec.kind, spec.in_features, spec.out_features, spec.kernel, spec.fan_in_fan_out) != (
            first.kind,
            first.in_features,
            first.out_features,
            first.kernel,
            first.fan_in_fan_out,
        ):
            raise IncompatibleAdaptersError(
                f"module {name!r} is {first.kind} {first.in_features}->{first.out_features} in one adapter "
                f"and {spec.kind} {spec.in_features}->{spec.out_features} in another"
            )
    return first


def resolve_strategy(
    strategy: str, params: Mapping[str, Any], plugins: Plugins | None = None
) -> tuple[Strategy, dict[str, Any]]:
    """The registered strategy ``strategy`` and its full parameter set, or a clear error for either."""
    from adapterkit.plugins import get_plugins

    registry = (plugins or get_plugins()).strategies()
    if strategy not in registry:
        raise UnknownStrategyError(f"unknown strategy {strategy!r}; available: {', '.join(sorted(registry))}")
    chosen = registry[strategy]
    try:
        resolved = chosen.check_params(params)
    except ValueError as exc:
        raise CompositionError(str(exc)) from None
    if resolved.get("rank") is not None and resolved.get("energy") is not None:
        # Either decides the output rank; taking one silently would hide which the user got.
        raise CompositionError(f"strategy {strategy!r}: give 'rank' or 'energy', not both")
    return chosen, resolved


def delta_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """``||B @ A||_F`` in float64, from the triangular factors of B and Aᵀ (never the dense product).

    QR is backward stable, so a product that cancels to nothing (A - A as stacked factors) comes
    out at float64 rounding, where the Gram form ``trace(BᵀB AAᵀ)`` would leave ``sqrt(eps)``.
    """
    import torch

    a = A.detach().to(torch.float64).flatten(1)
    b = B.detach().to(torch.float64).flatten(1)
    if a.shape[0] == 0:
        return 0.0
    r_b = torch.linalg.qr(b, mode="r").R
    r_a = torch.linalg.qr(a.T, mode="r").R
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


def check_not_empty(
    results: Mapping[str, float], scales: Mapping[str, float], compute: torch.dtype, strategy: str
) -> None:
    """Refuse a blend whose every module's delta is zero or rounding noise of the parents' deltas.

    ``results[name]`` is ``||ΔW||_F`` of the blended module, ``scales[name]`` is ``sum_i |w_i|
    ||D_i||_F`` over its parents. A module counts as empty when its delta is at most
    ``EMPTY_TOLERANCE_ULPS * eps(compute) * scales[name]`` (about 7.6e-6 of the parents' deltas in
    float32): rounding in the maths leaves a cancelled sum about ``eps * scale`` in size (A - A
    through ``svd`` gives 1e-7 to 1e-6 of it), while a real difference between two adapters is
    orders of magnitude above that. A module whose parents are all zero (weight 0, an untrained
    adapter with B = 0) has scale 0 and is empty only when its delta is exactly zero.
    """
    import torch

    tolerance = EMPTY_TOLERANCE_ULPS * torch.finfo(compute).eps
    if results and all(norm <= tolerance * scales[name] for name, norm in results.items()):
        largest = max((norm / scales[name] for name, norm in results.items() if scales[name] > 0), default=0.0)
        raise CompositionError(
            f"the blend is empty: every module's delta is zero or rounding noise ({strategy} left at most "
            f"{largest:.1e} of the parents' weighted deltas; the threshold is {tolerance:.1e}); check the weights"
        )


@dataclass(frozen=True)
class Blend:
    """A compose call checked before its first module: what both ``compose`` and its dry run work from."""

    adapters: Sequence[Adapter]
    weights: list[float]
    labels: list[str]
    strategy: Strategy
    params: dict[str, Any]
    device: torch.device
    base_model: dict[str, Any] | None
    #: dtype of the result's factors; compute: float64 when that is float64, else float32.
    out_dtype: torch.dtype
    compute: torch.dtype
    #: One adapter at weight 1 through ``linear``: the result is the parent itself, bit for bit.
    identity: bool
    lineage: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return sorted({name for adapter in self.adapters for name in adapter.modules})

    def present(self, name: str) -> list[tuple[int, LoraModule, float]]:
        """(parent index, module, weight) of every parent that has module ``name``."""
        return [
            (i, a.modules[name], w)
            for i, (a, w) in enumerate(zip(self.adapters, self.weights, strict=True))
            if name in a.modules
        ]

    def module_input(self, name: str, device: torch.device | None = None) -> tuple[ModuleInput, ModuleSpec]:
        """Module ``name`` as the strategy sees it (each parent's scaling folded into A), and its shape."""
        target = device if device is not None else self.device
        present = self.present(name)
        shape = common_shape(name, [m.spec for _, m, _ in present])
        factors = [
            (
                m.A.to(device=target, dtype=self.compute).flatten(1) * m.spec.scaling,
                m.B.to(device=target, dtype=self.compute).flatten(1),
            )
            for _, m, _ in present
        ]
        module_input = ModuleInput(
            name=name,
            factors=factors,
            weights=[w for _, _, w in present],
            ranks=[m.spec.r for _, m, _ in present],
            positions=[i for i, _, _ in present],
        )
        return module_input, shape

    def scale(self, module_input: ModuleInput) -> float:
        """``sum_i |w_i| ||D_i||_F`` over a module's parents: what an empty result is measured against."""
        return sum(
            abs(w) * delta_norm(A, B) for (A, B), w in zip(module_input.factors, module_input.weights, strict=True)
        )


def prepare(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None,
    strategy: str,
    params: Mapping[str, Any],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    plugins: Plugins | None = None,
) -> Blend:
    """Refuse, before any module is blended, everything ``compose`` refuses up front.

    Weights, strategy and parameters, device, bases, extra trainable tensors, non-finite factors,
    and weights that would overflow the working dtype.
    """
    import torch

    from adapterkit.adapter.model import check_weights
    from adapterkit.devices import resolve_device

    values = check_weights(adapters, weights, "compose")
    chosen, resolved = resolve_strategy(strategy, params, plugins)
    target = resolve_device(device)
    base_model = check_compatible(adapters, force=force)
    labels = [adapter_label(adapter, i) for i, adapter in enumerate(adapters)]
    check_finite_factors(adapters, labels)
    factor_dtypes = {m.A.dtype for a in adapters for m in a.modules.values()}
    out_dtype = dtype or (factor_dtypes.pop() if len(factor_dtypes) == 1 else torch.float32)
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    identity = chosen.name == "linear" and len(adapters) == 1 and values[0] == 1.0
    if not identity:
        # The maths runs in ``compute``; PEFT later multiplies the stored factors in their own dtype (float16's
        # range is far narrower): a weight must fit both.
        check_weight_range(adapters, values, labels, min(compute, out_dtype, key=lambda d: torch.finfo(d).max))
    lineage: dict[str, Any] = {
        "strategy": strategy,
        "parameters": {k: v for k, v in resolved.items() if v is not None},
        "parents": [{"digest": adapter_digest(a), "weight": w} for a, w in zip(adapters, values, strict=True)],
        "adapterkit_version": __version__,
    }
    return Blend(
        adapters=adapters,
        weights=values,
        labels=labels,
        strategy=chosen,
        params=resolved,
        device=target,
        base_model=base_model,
        out_dtype=out_dtype,
        compute=compute,
        identity=identity,
        lineage=lineage,
    )


def compose(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    strategy: str = "linear",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    plugins: Plugins | None = None,
    progress: ComposeProgress | None = None,
    **params: Any,
) -> Adapter:
    """Blend ``adapters`` with ``weights`` (negative allowed) using ``strategy``; returns a new adapter.

    ``dtype`` is the dtype of the result's factors (default: the parents' when they agree, else
    float32); the maths runs in float32, or float64 when ``dtype`` is float64. Modules missing
    from an adapter contribute zero. The result's ``metadata`` holds its lineage and base model.
    ``progress(done, total, module)`` is called after each module.

    Everything that can be refused is refused before a module is blended (:func:`prepare`); a
    result that is empty (:func:`check_not_empty`) or not finite is refused at the end, so no such
    adapter is ever returned.
    """
    import torch

    from adapterkit.adapter.dtypes import all_finite, torch_dtypes
    from adapterkit.adapter.model import Adapter, LoraModule

    blend = prepare(adapters, weights, strategy, params, device=device, dtype=dtype, force=force, plugins=plugins)
    lineage = blend.lineage
    if blend.identity:
        # empty only when every delta is exactly zero: the first module with a change settles it
        if not any(delta_norm(m.A * m.spec.scaling, m.B) > 0 for m in adapters[0].modules.values()):
            zeros = dict.fromkeys(adapters[0].modules, 0.0)
            check_not_empty(zeros, zeros, torch.float64, strategy)
        return _identity(adapters[0], blend.base_model, lineage)  # bit-for-bit the parent: no rounding from folding
    out_dtype, compute = blend.out_dtype, blend.compute

    names = blend.names
    modules: dict[str, LoraModule] = {}
    errors: dict[str, float] = {}
    norms: dict[str, float] = {}
    scales: dict[str, float] = {}
    # Once one module's delta is above rounding noise the blend is not empty, and the other modules'
    # norms (two QR factorizations each) need not be computed.
    tolerance = EMPTY_TOLERANCE_ULPS * torch.finfo(compute).eps
    settled = False
    for done, name in enumerate(names, start=1):
        module_input, shape = blend.module_input(name)
        try:
            result = blend.strategy.function(module_input, **blend.params)
        except (ValueError, torch.linalg.LinAlgError) as exc:
            detail = " ".join(str(exc).split())
            raise CompositionError(f"strategy {strategy!r} failed on module {name!r}: {detail}") from None
        if not (all_finite(result.A) and all_finite(result.B)):
            working = str(compute).removeprefix("torch.")
            raise NonFiniteError(
                f"strategy {strategy!r} gave module {name!r} non-finite values in {working} "
                "(weights too large for the working dtype?); nothing was stored"
            )
        if not settled:
            scales[name] = blend.scale(module_input)
        if progress is not None:
            progress(done, len(names), name)
        rank = result.A.shape[0]
        if rank == 0:
            norms[name] = 0.0
            continue  # nothing left of this module (e.g. all weights zero)
        spec = ModuleSpec(
            name=name,
            kind=shape.kind,
            r=rank,
            alpha=rank,
            scaling=1.0,
            in_features=shape.in_features,
            out_features=shape.out_features,
            kernel=shape.kernel,
            fan_in_fan_out=shape.fan_in_fan_out,
            dtype=torch_dtypes()[out_dtype],
        )
        A = result.A.reshape(spec.a_shape).to(device="cpu", dtype=out_dtype).contiguous()
        B = result.B.reshape(spec.b_shape).to(device="cpu", dtype=out_dtype).contiguous()
        if not (all_finite(A) and all_finite(B)):
            raise NonFiniteError(
                f"module {name!r} of the blend overflows {str(out_dtype).removeprefix('torch.')}, the dtype it is "
                "stored in (weights too large?); nothing was stored"
            )
        if not settled:
            norms[name] = delta_norm(A, B)
            settled = norms[name] > tolerance * scales[name]
        modules[name] = LoraModule(spec, A, B)
        if result.truncation_error is not None:
            errors[name] = result.truncation_error
    if not settled:
        check_not_empty(norms, scales, compute, strategy)
    if errors:
        lineage["truncation_error"] = errors

    config = derived_config(adapters[0].config, modules)
    extras = _shared_extras(adapters)
    blended = Adapter(config=config, modules=modules, extra_tensors=extras, key_prefix=adapters[0].key_prefix)
    blended.metadata = {"base_model": blend.base_model, "lineage": lineage}
    return blended


def _shared_extras(adapters: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """Tensors saved beside the factors (PEFT saves a resized embedding's full weight) ride along if all agree.

    They are copies of base weights, not changes: a blend can carry one only when every parent that has it
    holds the same values; anything else has no meaningful weighted sum and is refused.
    """
    import torch

    extras: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        for key, tensor in adapter.extra_tensors.items():
            if key in extras and not torch.equal(extras[key], tensor):
                raise CompositionError(f"adapters hold different values for {key!r}, which is not a LoRA factor")
            extras.setdefault(key, tensor)
    return extras


def _identity(parent: Adapter, base_model: dict[str, Any] | None, lineage: dict[str, Any]) -> Adapter:
    from adapterkit.adapter.model import Adapter

    copy = Adapter(
        config=dict(parent.config),
        modules=dict(parent.modules),
        extra_tensors=dict(parent.extra_tensors),
        key_prefix=parent.key_prefix,
    )
    copy.metadata = {"base_model": base_model, "lineage": lineage}
    return copy


def derived_config(first: Mapping[str, Any], modules: Mapping[str, Any]) -> dict[str, Any]:
    """A PEFT config under which every module gets scaling 1 (alpha = r), whatever its rank.

    Targets are the exact module paths, so PEFT creates LoRA layers on precisely the blended
    modules; ranks other than the most common one go to ``rank_pattern`` / ``alpha_pattern`` under
    an escaped full path (PEFT matches pattern keys against the end of the module path).
    """
    ranks = {name: module.spec.r for name, module in modules.items()}
    default = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): r for name, r in sorted(ranks.items()) if r != default}
    return {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "revision": first.get("revision"),
        "r": default,
        "lora_alpha": default,
        "use_rslora": False,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(modules),
        "fan_in_fan_out": any(module.spec.fan_in_fan_out for module in modules.values()),
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
