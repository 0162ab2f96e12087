"""``attach``: run several adapters on a live model at once, weighted, without merging them.

The approach is PEFT's own multi-adapter path, so nothing here re-implements a forward pass:

1. each adapterkit :class:`~adapterkit.adapter.model.Adapter` is written to a private temporary PEFT folder
   (``adapter_config.json`` + canonical safetensors, exactly what ``adapterkit export`` writes) and
   loaded under its own adapter name with ``PeftModel.from_pretrained`` / ``load_adapter`` -- the
   loader users already trust, with its rank/alpha pattern resolution and dtype handling;
2. every LoRA layer's ``scaling[name]`` (``alpha / r`` or ``alpha / sqrt(r)``, as PEFT resolved it)
   is multiplied by that adapter's weight, so the layer adds ``w * s * B @ A @ x``;
3. all adapters are activated together with ``LoraModel.set_adapter([names])``: each LoRA layer then
   sums its active adapters' outputs, giving ``W x + sum_i w_i s_i B_i A_i x``.

That is the merged model's ``(W + sum_i w_i s_i B_i A_i) x`` up to float rounding, so ``attach`` and
:func:`adapterkit.merging.merge` agree, at a cost per token proportional to ``sum_i r_i`` instead of a
new copy of the base. (With a tied embedding, PEFT's unmerged model changes only the side the
adapter targets; merging changes the one shared tensor. See :mod:`adapterkit.merging.streamed`.)

Weights other than 1 and several adapters at once need each adapter's change to be ``s * B @ A``:
DoRA, ``lora_bias``, ``modules_to_save``, trained biases and the like are refused then, naming the
field. A single adapter with weight 1 is loaded however PEFT loads it.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.config import carried_features, delta_blockers
from adapterkit.adapter.model import check_weights
from adapterkit.base_identity import BaseIdentity, reconcile
from adapterkit.errors import InvalidInputError, UnsupportedAdapterError
from adapterkit.weighting import check_finite_factors, check_weight_range, extra_trainable

if TYPE_CHECKING:
    from peft import PeftModel

    from adapterkit.adapter.model import Adapter

__all__ = ["attach"]

_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _names(count: int, adapter_names: Sequence[str] | None, taken: Sequence[str]) -> list[str]:
    if adapter_names is None:
        names = []
        index = 0
        while len(names) < count:
            candidate = f"adapter_{index}"
            if candidate not in taken:
                names.append(candidate)
            index += 1
        return names
    names = list(adapter_names)
    if len(names) != count:
        raise InvalidInputError(f"got {len(names)} adapter names for {count} adapters")
    for name in names:
        # PEFT keys nn.ModuleDicts by adapter name: a dot would be read as a submodule path.
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInputError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    if len(set(names)) != len(names):
        raise InvalidInputError("adapter names must be distinct")
    clash = sorted(set(names) & set(taken))
    if clash:
        raise InvalidInputError(f"the model already has an adapter named {clash[0]!r}")
    return names


def _model_identity(model: Any) -> BaseIdentity:
    """What a live model tells of its identity: the name transformers records (no fingerprint: no files to read)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return BaseIdentity(label="the model", name=name if isinstance(name, str) and name else None, is_base=True)


def _check(adapters: Sequence[Adapter], weights: list[float], model: Any, force: bool) -> None:
    import warnings

    import torch

    labels = [f"adapter {i + 1}" + (f" ({a.digest[:19]})" if a.digest else "") for i, a in enumerate(adapters)]
    sides = [BaseIdentity.of_adapter(adapter, label) for adapter, label in zip(adapters, labels, strict=True)]
    _, doubts = reconcile([*sides, _model_identity(model)], force=force, verb="attach")
    for doubt in doubts:
        warnings.warn(f"adapterkit: {doubt}", stacklevel=3)
    check_finite_factors(adapters, labels)
    if len(adapters) == 1 and weights[0] == 1.0:
        return  # PEFT runs it exactly as it would load it
    for index, adapter in enumerate(adapters):
        fields = delta_blockers(adapter.config) or carried_features(adapter.config)
        if fields:
            raise UnsupportedAdapterError(
                f"adapter {index + 1} sets {fields[0]!r}: its change is not scaling * B @ A, so it cannot be "
                "weighted or stacked with others"
            )
        trained = extra_trainable(adapter)
        if trained:
            # PEFT would apply these tensors at full strength while the LoRA part gets the weight.
            raise UnsupportedAdapterError(
                f"adapter {index + 1} trains more than its LoRA factors ({trained}); it cannot be weighted or "
                "stacked with others"
            )
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()] if hasattr(model, "parameters") else []
    narrowest = min(floating, key=lambda dtype: torch.finfo(dtype).max, default=torch.float32)
    check_weight_range(adapters, weights, labels, narrowest)  # PEFT adds the weighted change in the model's dtype


def attach(
    model: Any,
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    adapter_names: Sequence[str] | None = None,
    *,
    force: bool = False,
) -> PeftModel:
    """A PEFT model running ``adapters`` on ``model`` together, each scaled by its weight (default 1.0).

    ``model`` is a transformers (or any torch) model, which PEFT wraps in place, or a ``PeftModel``,
    to which the adapters are added. ``adapter_names`` (default ``adapter_0``, ``adapter_1``, ...)
    are the names PEFT knows them by. The adapters stay separate, so ``set_adapter``,
    ``disable_adapter()`` and ``merge_and_unload()`` work as usual on the result.

    The adapters must be for one base, and for this model as far as its recorded name tells
    (:func:`adapterkit.base_identity.reconcile`; ``force`` accepts a mismatch).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from adapterkit.formats.peft import write_adapter

    values = check_weights(adapters, weights, "attach")
    _check(adapters, values, model, force)
    wrapped = isinstance(model, PeftModel)
    names = _names(len(adapters), adapter_names, list(model.peft_config) if wrapped else [])

    peft_model = model if wrapped else None
    with tempfile.TemporaryDirectory(prefix="adapterkit-attach-") as tmp:
        for name, adapter in zip(names, adapters, strict=True):
            folder = write_adapter(adapter, Path(tmp) / name)
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(folder, adapter_name=name, is_trainable=False)
    assert peft_model is not None

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, weight in zip(names, values, strict=True):
                if name in module.scaling and weight != 1.0:
                    module.scaling[name] *= weight
    try:
        peft_model.base_model.set_adapter(names, inference_mode=True)
    except TypeError:  # PEFT before inference_mode= existed: activation makes the adapters trainable
        peft_model.base_model.set_adapter(names)
        for param_name, param in peft_model.named_parameters():
            if any(f".{name}." in param_name or param_name.endswith(f".{name}") for name in names):
                param.requires_grad_(False)
    return peft_model
