"""``compose``: blend adapters into a new adapter, with lineage.

This module is the dispatcher: it checks that the adapters belong together, pairs their
modules, folds each parent's scaling into its factors, hands every module to the strategy (pure
maths, on the chosen device) and assembles the result with a PEFT config that gives each module
its true scaling. Which strategies exist is the plugin manager's business.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.config import ModuleSpec, carried_features
from adapterkit.errors import (
    CompositionError,
    IncompatibleAdaptersError,
    UnknownStrategyError,
    UnsupportedAdapterError,
)
from adapterkit.strategies.base import ModuleInput, Strategy
from adapterkit.version import __version__

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import Adapter, LoraModule
    from adapterkit.plugins import Plugins

__all__ = ["Blend", "adapter_digest", "check_compatible", "common_shape", "compose", "prepare", "resolve_strategy"]


def adapter_digest(adapter: Adapter) -> str:
    """The adapter's store digest, or for one never stored, the sha256 of its canonical files."""
    if adapter.digest:
        return adapter.digest
    from adapterkit.adapter.model import tensors_to_bytes
    from adapterkit.formats.peft import config_bytes

    hasher = hashlib.sha256(config_bytes(adapter.config))
    hasher.update(tensors_to_bytes(adapter.state_dict()))
    return "sha256:" + hasher.hexdigest()


def _base_of(adapter: Adapter) -> tuple[str | None, str | None]:
    base = (adapter.metadata or {}).get("base_model") or {}
    return base.get("structure_digest"), base.get("name") or adapter.config.get("base_model_name_or_path")


def check_compatible(adapters: Sequence[Adapter], *, force: bool = False) -> dict[str, Any] | None:
    """Refuse adapters for different bases (by fingerprint, else by name); returns the shared base entry."""
    entries = [_base_of(adapter) for adapter in adapters]
    fingerprints = {fp for fp, _ in entries if fp}
    names = {name for _, name in entries if name}
    if not force:
        if len(fingerprints) > 1:
            raise IncompatibleAdaptersError(
                f"adapters were made for different base models (fingerprints {', '.join(sorted(fingerprints))}); "
                "use --force to blend them anyway"
            )
        if not fingerprints and len(names) > 1:
            raise IncompatibleAdaptersError(
                f"adapters name different base models ({', '.join(sorted(names))}); use --force to blend them anyway"
            )
    for adapter in adapters:
        # Extra tensors (modules_to_save, trainable tokens) have no weighted sum, and fields such as
        # use_dora or a PiSSA init make a module's change something other than scaling * B @ A.
        blocking = carried_features(adapter.config)
        if blocking:
            raise UnsupportedAdapterError(
                f"adapter {adapter_digest(adapter)[:19]} sets {blocking[0]!r}, which a blend cannot carry"
            )
    structure = next((fp for fp, _ in entries if fp), None)
    name = next((n for _, n in entries if n), None)
    if structure is None and name is None:
        return None
    return {"name": name, "revision": adapters[0].config.get("revision"), "structure_digest": structure}


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
        return chosen, chosen.check_params(params)
    except ValueError as exc:
        raise CompositionError(str(exc)) from None


@dataclass(frozen=True)
class Blend:
    """A compose call checked before its first module: what both ``compose`` and its dry run work from."""

    adapters: Sequence[Adapter]
    weights: list[float]
    strategy: Strategy
    params: dict[str, Any]
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

    def module_input(self, name: str, device: torch.device) -> tuple[ModuleInput, ModuleSpec]:
        """Module ``name`` as the strategy sees it (each parent's scaling folded into A), and its shape."""
        present = self.present(name)
        shape = common_shape(name, [m.spec for _, m, _ in present])
        factors = [
            (
                m.A.to(device=device, dtype=self.compute).flatten(1) * m.spec.scaling,
                m.B.to(device=device, dtype=self.compute).flatten(1),
            )
            for _, m, _ in present
        ]
        module_input = ModuleInput(
            name=name, factors=factors, weights=[w for _, _, w in present], ranks=[m.spec.r for _, m, _ in present]
        )
        return module_input, shape


def prepare(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None,
    strategy: str,
    params: Mapping[str, Any],
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    plugins: Plugins | None = None,
) -> Blend:
    """Check everything ``compose`` checks before its first module (weights, strategy, parameters, bases)."""
    import torch

    from adapterkit.adapter.model import check_weights

    values = check_weights(adapters, weights, "compose")
    chosen, resolved = resolve_strategy(strategy, params, plugins)
    base_model = check_compatible(adapters, force=force)
    factor_dtypes = {m.A.dtype for a in adapters for m in a.modules.values()}
    out_dtype = dtype or (factor_dtypes.pop() if len(factor_dtypes) == 1 else torch.float32)
    lineage: dict[str, Any] = {
        "strategy": strategy,
        "parameters": {k: v for k, v in resolved.items() if v is not None},
        "parents": [{"digest": adapter_digest(a), "weight": w} for a, w in zip(adapters, values, strict=True)],
        "adapterkit_version": __version__,
    }
    return Blend(
        adapters=adapters,
        weights=values,
        strategy=chosen,
        params=resolved,
        base_model=base_model,
        out_dtype=out_dtype,
        compute=torch.float64 if out_dtype == torch.float64 else torch.float32,
        identity=chosen.name == "linear" and len(adapters) == 1 and values[0] == 1.0,
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
    **params: Any,
) -> Adapter:
    """Blend ``adapters`` with ``weights`` (negative allowed) using ``strategy``; returns a new adapter.

    ``dtype`` is the dtype of the result's factors (default: the parents' when they agree, else
    float32); the maths runs in float32, or float64 when ``dtype`` is float64. Modules missing
    from an adapter contribute zero. The result's ``metadata`` holds its lineage and base model.
    """
    import torch

    from adapterkit.adapter.dtypes import torch_dtypes
    from adapterkit.adapter.model import Adapter, LoraModule

    blend = prepare(adapters, weights, strategy, params, dtype=dtype, force=force, plugins=plugins)
    lineage = blend.lineage
    if blend.identity:
        return _identity(adapters[0], blend.base_model, lineage)  # bit-for-bit the parent: no rounding from folding
    out_dtype = blend.out_dtype
    target = torch.device(device) if device is not None else torch.device("cpu")

    modules: dict[str, LoraModule] = {}
    errors: dict[str, float] = {}
    for name in blend.names:
        module_input, shape = blend.module_input(name, target)
        try:
            result = blend.strategy.function(module_input, **blend.params)
        except ValueError as exc:
            raise CompositionError(f"strategy {strategy!r} failed on module {name!r}: {exc}") from None
        rank = result.A.shape[0]
        if rank == 0:
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
        modules[name] = LoraModule(spec, A, B)
        if result.truncation_error is not None:
            errors[name] = result.truncation_error
    if not modules:
        raise CompositionError("the blend is empty: every module's result has rank 0")
    if errors:
        lineage["truncation_error"] = errors

    config = _derived_config(adapters[0].config, modules)
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


def _derived_config(first: Mapping[str, Any], modules: Mapping[str, Any]) -> dict[str, Any]:
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
