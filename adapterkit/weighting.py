"""What must hold before an adapter's change is multiplied by a weight: compose, attach, inspect and merge ask here.

A weighted blend scales ``scaling * B @ A`` and nothing else, so it must be exact or refused:

* an adapter that trains tensors beyond its factors (the base's biases with ``bias="all"`` or
  ``"lora_only"``, ``modules_to_save`` copies, trainable tokens) would have those tensors applied
  at full weight while its LoRA part gets the weight asked for; :func:`extra_trainable` names the
  field (or the tensor) so the refusal can say which;
* a NaN or infinity in a factor spreads to every entry of the module's delta, and a weight so
  large that ``w * s * B @ A`` overflows the working dtype makes one; both are refused, naming
  the module, before any maths runs (:func:`check_finite_factors`, :func:`check_weight_range`).

Copies of base weights that PEFT saves beside the factors (``save_embedding_layers``:
``...embed_tokens.base_layer.weight``) are not changes and are not counted here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from adapterkit.adapter.dtypes import all_finite
from adapterkit.errors import NonFiniteError

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import Adapter

__all__ = ["BASE_COPY_SUFFIX", "check_finite_factors", "check_weight_range", "extra_trainable"]

#: Keys of the base weights PEFT saves beside the factors (``save_embedding_layers``): copies, not changes.
BASE_COPY_SUFFIX = ".base_layer.weight"


def extra_trainable(adapter: Adapter) -> str | None:
    """What ``adapter`` trains beyond its LoRA factors, as a phrase naming the field or tensor; None when nothing."""
    trained = sorted(key for key in adapter.extra_tensors if not key.endswith(BASE_COPY_SUFFIX))
    if not trained:
        return None
    bias = adapter.config.get("bias", "none")
    if bias not in (None, "none"):
        return f"field 'bias' is {bias!r}: it trains the base's biases ({trained[0]!r})"
    return f"it carries tensor {trained[0]!r}, which is not a LoRA factor"


def check_finite_factors(adapters: Sequence[Adapter], labels: Sequence[str]) -> None:
    """Refuse a factor holding NaN or infinity, naming the adapter, module and factor."""
    for adapter, label in zip(adapters, labels, strict=True):
        for name, module in adapter.modules.items():
            for role, factor in (("lora_A", module.A), ("lora_B", module.B)):
                if not all_finite(factor):
                    raise NonFiniteError(
                        f"{label}: module {name!r} holds a non-finite value (NaN or infinity) in {role}; "
                        "adapterkit refuses to compute with it (re-add the adapter: add refuses such files)"
                    )


def check_weight_range(
    adapters: Sequence[Adapter], weights: Sequence[float], labels: Sequence[str], dtype: torch.dtype
) -> None:
    """Refuse a weight whose products with a module's factors would overflow ``dtype``, the maths' working dtype.

    Every entry of ``w * s * B @ A`` is at most ``|w s| * r * max|A| * max|B|`` in size; when that
    bound, or ``|w s| * max|A|`` (the weighted factor itself), passes the largest finite value of
    ``dtype``, the result could hold infinities. The bound exceeds the real maximum by at most a
    factor of ``r``, and real adapters sit many orders of magnitude below it, so this refuses
    only weights that are absurd for the dtype (``-w 1e39`` in float32, ``1e308`` in float64).
    """
    import math

    import torch

    limit = torch.finfo(dtype).max
    for adapter, weight, label in zip(adapters, weights, labels, strict=True):
        for name, module in adapter.modules.items():
            factor = abs(weight * module.spec.scaling)
            if factor == 0:
                continue
            a_max = float(module.A.abs().max()) if module.A.numel() else 0.0
            b_max = float(module.B.abs().max()) if module.B.numel() else 0.0
            bound = factor * module.spec.r * a_max * b_max
            if not (math.isfinite(factor) and factor * a_max <= limit and bound <= limit):
                raise NonFiniteError(
                    f"weight {weight:g} of {label} makes module {name!r} overflow {str(dtype).removeprefix('torch.')} "
                    f"(its weighted change could reach {bound:.3g}; the largest finite value is {limit:.3g}); "
                    "give a smaller weight"
                )
