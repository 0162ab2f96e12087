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

What else an adapter carries is run by PEFT too, and accepted where PEFT runs it correctly:

* ``lora_bias``: PEFT computes ``lora_B(lora_A(x)) * scaling``, so lora_B's bias is scaled with the
  factors and the layer adds ``w * s * (B A x + b)``: any weight, any company.
* DoRA (``use_dora``): weight 1 only. A DoRA layer rescales ``W + s B A`` to the norms its magnitude
  vector gives, so its change is not a multiple of anything; scaling ``s B A`` (or the magnitudes) by
  ``w`` is not "w of the adapter". Stacked, PEFT's forward runs the active adapters in order and a
  DoRA layer rescales the running result (its norms taken on the base weight plus its own change),
  as PEFT's ``merge_and_unload`` and adapterkit's ``merge`` apply them: the order of ``adapters``
  matters there, and is the order they are activated in.
* ``modules_to_save`` copies, trained biases (``bias`` other than ``"none"``) and trainable tokens
  replace base values, so weight 1 only; stacked, PEFT runs one ``modules_to_save`` copy of a module
  at a time, one adapter's trainable tokens at a time, and one adapter with trained biases (it
  loads them into the model itself), and cannot put a LoRA layer on a module another adapter
  replaces. Those cases are refused, naming the adapters, the module and PEFT's rule.

Two PEFT loading quirks are worked around by the order the adapters are loaded in (activation
keeps the order given): an adapter with trained biases is loaded first (PEFT loads ``X.bias`` into
the model by name, and drops it when another adapter has already wrapped ``X``), and one with
trainable tokens last (PEFT 0.21 fails to load any adapter after one). Other fields that make a
module's change something else (PiSSA-style inits, aLoRA, ...) still run only alone, at weight 1,
however PEFT loads them.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.config import MERGEABLE_FIELDS, carried_features
from adapterkit.adapter.extras import WEIGHT_ONE_REASONS, Extra, classify_extras
from adapterkit.adapter.model import check_weights
from adapterkit.base_identity import BaseIdentity, reconcile
from adapterkit.errors import InvalidInputError, UnsupportedAdapterError
from adapterkit.weighting import check_finite_factors, check_weight_range

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


#: How attach's messages name each kind of tensor that replaces base values (``REPLACING_KINDS``): weight 1 only.
_REPLACING = {
    "modules_to_save": "a modules_to_save copy of",
    "trained_bias": "a trained bias of",
    "trainable_tokens": "trainable tokens of",
}


def _overlaps(first: str, second: str) -> bool:
    """Whether two module paths are one module or one holds the other."""
    return first == second or first.startswith(second + ".") or second.startswith(first + ".")


def _check_alone(index: int, adapter: Adapter, weight: float, extras: list[Extra]) -> None:
    """Refuse what PEFT cannot run stacked or weighted for this adapter on its own account."""
    name = f"adapter {index + 1}"
    # carried_features holds every delta_blockers field too; MERGEABLE_FIELDS are the ones PEFT runs stacked
    blocking = [f for f in carried_features(adapter.config) if f not in MERGEABLE_FIELDS]
    if blocking:
        raise UnsupportedAdapterError(
            f"{name} sets {blocking[0]!r}: its change is not scaling * B @ A, so it cannot be weighted or stacked "
            "with others"
        )
    unknown = [extra.key for extra in extras if extra.kind == "other"]
    if unknown:
        raise UnsupportedAdapterError(
            f"{name} carries tensor {unknown[0]!r}, which is not a LoRA factor; it cannot be weighted or stacked "
            "with others"
        )
    if weight == 1.0:
        return
    if adapter.config.get("use_dora"):
        raise UnsupportedAdapterError(
            f"{name} is a DoRA adapter (field 'use_dora'): it attaches at weight 1 only, since "
            f"{WEIGHT_ONE_REASONS['dora']}; got weight {weight:g}"
        )
    for extra in extras:
        if extra.kind in _REPLACING:
            raise UnsupportedAdapterError(
                f"{name} carries {_REPLACING[extra.kind]} {extra.module!r}: it attaches at weight 1 only, since "
                f"{WEIGHT_ONE_REASONS['replace']}; got weight {weight:g}"
            )


def _check_together(adapters: Sequence[Adapter], extras: list[list[Extra]]) -> None:
    """Refuse stacks PEFT cannot run: two replacements of one module, a LoRA on a replaced module, two bias trainers."""
    biased = [i for i, adapter in enumerate(adapters) if adapter.config.get("bias", "none") not in (None, "none")]
    if len(biased) > 1:
        i, j = biased[:2]
        raise UnsupportedAdapterError(
            f"adapters {i + 1} and {j + 1} both set field 'bias': PEFT loads trained biases into the model itself "
            "and allows one adapter with bias at a time"
        )
    tokens = [i for i, found in enumerate(extras) if any(e.kind == "trainable_tokens" for e in found)]
    if len(tokens) > 1:
        i, j = tokens[:2]
        raise UnsupportedAdapterError(
            f"adapters {i + 1} and {j + 1} both carry trainable tokens: PEFT runs one adapter's trainable tokens "
            "at a time"
        )
    claims = [(i, e) for i, found in enumerate(extras) for e in found if e.kind in _REPLACING]
    for pos, (i, first) in enumerate(claims):
        for j, second in claims[pos + 1 :]:
            if i != j and _overlaps(first.module, second.module):
                same = first.kind == second.kind == "modules_to_save"
                rule = (
                    "PEFT runs one modules_to_save copy of a module at a time"
                    if same
                    else "each would replace the other's values"
                )
                raise UnsupportedAdapterError(
                    f"adapter {i + 1} carries {_REPLACING[first.kind]} {first.module!r} and adapter {j + 1} "
                    f"{_REPLACING[second.kind]} {second.module!r}: {rule}"
                )
    for i, extra in claims:
        if extra.kind == "trained_bias":
            continue  # the bias goes into the base layer, which a LoRA wraps as usual
        for j, adapter in enumerate(adapters):
            inside = next((name for name in adapter.modules if _overlaps(name, extra.module)), None)
            if j != i and inside is not None:
                raise UnsupportedAdapterError(
                    f"adapter {j + 1} puts a LoRA on {inside!r}, which adapter {i + 1} replaces with "
                    f"{_REPLACING[extra.kind]} {extra.module!r}: PEFT cannot wrap one module for both"
                )


def _load_order(adapters: Sequence[Adapter], extras: list[list[Extra]]) -> list[int]:
    """The order to load the adapters in: trained biases first, trainable tokens last (see the module docstring)."""

    def rank(i: int) -> int:
        if any(e.kind == "trainable_tokens" for e in extras[i]):
            return 2
        return 0 if any(e.kind == "trained_bias" for e in extras[i]) else 1

    return sorted(range(len(adapters)), key=lambda i: (rank(i), i))


def _check_loading(
    adapters: Sequence[Adapter], extras: list[list[Extra]], order: list[int], model: Any, wrapped: bool
) -> None:
    """Refuse what PEFT would load wrongly or not at all into ``model`` in ``order``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:  # a PEFT before trainable tokens (< 0.15): no model holds them
        TrainableTokensWrapper = None  # type: ignore[assignment,misc]

    taken: set[str] = set()  # modules some PEFT layer wraps before the next adapter is loaded
    if wrapped:
        inner = model.base_model.model
        taken = {name for name, module in inner.named_modules() if isinstance(module, BaseTunerLayer)}
        if TrainableTokensWrapper is not None and any(
            isinstance(module, TrainableTokensWrapper) for module in inner.modules()
        ):
            raise UnsupportedAdapterError(
                "the model already holds trainable tokens: PEFT cannot load another adapter after them; "
                "attach every adapter in one call, to the plain model"
            )
        biased = [n for n, c in model.peft_config.items() if getattr(c, "bias", "none") not in (None, "none")]
        for i, adapter in enumerate(adapters):
            if biased and adapter.config.get("bias", "none") not in (None, "none"):
                raise UnsupportedAdapterError(
                    f"adapter {i + 1} sets field 'bias' and the model's adapter {biased[0]!r} does too: PEFT loads "
                    "trained biases into the model itself and allows one adapter with bias at a time"
                )
    for i in order:
        for extra in extras[i]:
            bare = extra.key.removeprefix(adapters[i].key_prefix).removesuffix(".bias")
            if extra.kind == "trained_bias" and bare == extra.module and extra.module in taken:
                raise UnsupportedAdapterError(
                    f"adapter {i + 1} trains the bias of {extra.module!r}, which another adapter on the model "
                    "already wraps: PEFT would load that bias nowhere; attach this adapter first, to the plain model"
                )
        taken |= set(adapters[i].modules) | {e.module for e in extras[i] if e.kind == "modules_to_save"}


def _check(adapters: Sequence[Adapter], weights: list[float], model: Any, force: bool) -> list[int]:
    """Refuse what PEFT cannot run as asked; returns the order to load the adapters in."""
    import warnings

    import torch
    from peft import PeftModel

    labels = [f"adapter {i + 1}" + (f" ({a.digest[:19]})" if a.digest else "") for i, a in enumerate(adapters)]
    sides = [BaseIdentity.of_adapter(adapter, label) for adapter, label in zip(adapters, labels, strict=True)]
    _, doubts = reconcile([*sides, _model_identity(model)], force=force, verb="attach")
    for doubt in doubts:
        warnings.warn(f"adapterkit: {doubt}", stacklevel=3)
    check_finite_factors(adapters, labels)
    extras = [classify_extras(a.extra_tensors, a.config, a.key_prefix) for a in adapters]
    wrapped = isinstance(model, PeftModel)
    order = _load_order(adapters, extras)
    if len(adapters) == 1 and weights[0] == 1.0:
        _check_loading(adapters, extras, order, model, wrapped)
        return order  # PEFT runs it exactly as it would load it
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        _check_alone(index, adapter, weight, extras[index])
    _check_together(adapters, extras)
    _check_loading(adapters, extras, order, model, wrapped)
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()] if hasattr(model, "parameters") else []
    narrowest = min(floating, key=lambda dtype: torch.finfo(dtype).max, default=torch.float32)
    check_weight_range(adapters, weights, labels, narrowest)  # PEFT adds the weighted change in the model's dtype
    return order


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
    are the names PEFT knows them by, activated in the order given (which matters with DoRA). The
    adapters stay separate, so ``set_adapter``, ``disable_adapter()`` and ``merge_and_unload()``
    work as usual on the result (trained biases excepted: PEFT loads them into the model itself).

    The adapters must be for one base, and for this model as far as its recorded name tells
    (:func:`adapterkit.base_identity.reconcile`; ``force`` accepts a mismatch).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from adapterkit.formats.peft import write_adapter

    values = check_weights(adapters, weights, "attach")
    order = _check(adapters, values, model, force)
    wrapped = isinstance(model, PeftModel)
    names = _names(len(adapters), adapter_names, list(model.peft_config) if wrapped else [])

    peft_model = model if wrapped else None
    with tempfile.TemporaryDirectory(prefix="adapterkit-attach-") as tmp:
        for index in order:  # loaded in the order PEFT needs, activated below in the order given
            name, adapter = names[index], adapters[index]
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
