"""What the tensors beside an adapter's LoRA factors are: one classification for attach, inspect and show.

PEFT saves more than ``lora_A`` / ``lora_B`` for some adapters, and each kind means something
different to an operation that runs or describes the adapter:

* ``dora_magnitude``: DoRA's ``<module>.lora_magnitude_vector``, the norm each output feature of
  ``W + s·B·A`` is rescaled to;
* ``lora_bias``: ``<module>.lora_B.bias`` (``lora_bias=True``), added as ``s * b`` like the factors;
* ``modules_to_save``: a full copy of a module (``lm_head.weight``), which replaces the base's;
* ``trained_bias``: a base bias trained with ``bias="all"`` or ``"lora_only"`` (``<module>.bias``
  or ``<module>.base_layer.bias``), which PEFT loads into the model itself;
* ``trainable_tokens``: ``<embedding>.token_adapter.trainable_tokens_delta``, rows that replace
  those of the embedding (``trainable_token_indices``);
* ``base_copy``: a base weight PEFT saves beside the factors (``save_embedding_layers``:
  ``<embedding>.base_layer.weight``), a copy rather than a change;
* ``other``: anything else, which no operation should guess at.

Only key names and the config are read, so the torch-free ``show`` can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adapterkit.adapter.config import KEY_PREFIX

__all__ = [
    "DORA_NOT_A_DELTA",
    "EXTRA_KINDS",
    "REPLACING_KINDS",
    "WEIGHT_ONE_REASONS",
    "Extra",
    "classify_extras",
    "extras_by_kind",
    "token_counts",
]

#: Why a DoRA adapter has no delta to compose, and the way to one (compose and ``Adapter.delta`` say it).
DORA_NOT_A_DELTA = (
    "a DoRA module's change depends on the base weight's norms (m * (W + sBA) / norm(W + sBA) - W), so it is not a "
    "low-rank delta that can be blended; to compose it, merge it into the base (adapterkit merge) and extract a "
    "plain LoRA from the result (adapterkit extract --base BASE --tuned MERGED)"
)

#: Kinds whose tensors take the place of base values instead of adding to them: merged and attached at weight 1.
REPLACING_KINDS = ("modules_to_save", "trained_bias", "trainable_tokens")
#: Why an adapter that sets norms (``dora``) or replaces values (``replace``) has no meaning at a weight other
#: than 1: merge and attach give the same reason.
WEIGHT_ONE_REASONS = {
    "dora": "its magnitude vectors set each feature's norm outright, so a weight has no defined meaning",
    "replace": "it replaces the base's values instead of adding to them, so a weight has no defined meaning",
}

#: Every kind, in the order ``show`` lists them.
EXTRA_KINDS = (
    "dora_magnitude",
    "lora_bias",
    "modules_to_save",
    "trained_bias",
    "trainable_tokens",
    "base_copy",
    "other",
)
_SUFFIXES = (
    (".lora_magnitude_vector", "dora_magnitude"),
    (".lora_B.bias", "lora_bias"),
    (".token_adapter.trainable_tokens_delta", "trainable_tokens"),
    (".base_layer.weight", "base_copy"),
)


@dataclass(frozen=True)
class Extra:
    """One extra tensor: its key in the weights file, its kind and the module (path in the base) it belongs to."""

    key: str
    kind: str
    module: str


def _copy_owner(path: str, targets: list[str]) -> str | None:
    """The module ``path`` belongs to when it is a ``modules_to_save`` copy, else None.

    PEFT wraps every module whose name ends with one of ``modules_to_save`` (a plain string
    ``endswith``, as ``_set_trainable`` tests it) and saves the copy's tensors under the wrapped
    module's path; the longest such prefix of ``path`` names the module.
    """
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        owner = ".".join(parts[:end])
        if any(owner.endswith(target) for target in targets):
            return owner
    return None


def classify_extras(keys: Iterable[str], config: Mapping[str, Any], prefix: str = KEY_PREFIX) -> list[Extra]:
    """Each key of ``keys`` (tensors that are not LoRA factors) with its kind, in the order given."""
    targets = config.get("modules_to_save") or []
    targets = [targets] if isinstance(targets, str) else [t for t in targets if isinstance(t, str)]
    bias = config.get("bias", "none")
    trains_biases = bias not in (None, "none")
    out = []
    for key in keys:
        path = key.removeprefix(prefix) if prefix else key
        kind, module = "other", path.rpartition(".")[0]
        for suffix, name in _SUFFIXES:
            if path.endswith(suffix):
                kind, module = name, path.removesuffix(suffix)
                break
        else:
            owner = _copy_owner(path, targets) if targets else None
            if owner is not None:
                kind, module = "modules_to_save", owner
            elif trains_biases and path.endswith(".bias"):
                kind, module = "trained_bias", path.removesuffix(".bias").removesuffix(".base_layer")
        out.append(Extra(key, kind, module))
    return out


def extras_by_kind(keys: Iterable[str], config: Mapping[str, Any], prefix: str = KEY_PREFIX) -> dict[str, list[str]]:
    """Kind -> the sorted modules carrying tensors of that kind; only the kinds present, in ``EXTRA_KINDS`` order."""
    found: dict[str, set[str]] = {}
    for extra in classify_extras(keys, config, prefix):
        found.setdefault(extra.kind, set()).add(extra.module)
    return {kind: sorted(found[kind]) for kind in EXTRA_KINDS if kind in found}


def token_counts(config: Mapping[str, Any], modules: Iterable[str]) -> dict[str, int]:
    """How many token rows ``trainable_token_indices`` trains in each of ``modules`` (those it names)."""
    indices = config.get("trainable_token_indices")
    out: dict[str, int] = {}
    for module in modules:
        if isinstance(indices, list):
            out[module] = len(indices)  # a bare list applies to the input embedding
        elif isinstance(indices, dict):
            for name, values in indices.items():
                if isinstance(name, str) and module.endswith(name) and isinstance(values, list):
                    out[module] = len(values)
                    break
    return out
