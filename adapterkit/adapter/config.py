"""What a PEFT LoRA config means, module by module, without torch.

PEFT decides each module's rank and alpha at load time: ``rank_pattern`` and ``alpha_pattern``
keys are regular expressions tried in order against the module's path, and the first that
matches its tail wins. adapterkit must reach the same numbers or a blend silently changes the
model, so :func:`resolve_rank_alpha` mirrors ``peft.utils.other.get_pattern_key`` exactly.
Everything here works on plain dicts and shapes, so the store can describe an adapter without
importing torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapterkit.errors import AdapterFormatError, UnsupportedAdapterError

__all__ = [
    "DELTA_CHANGING_FIELDS",
    "KEY_PREFIX",
    "MERGEABLE_FIELDS",
    "ModuleSpec",
    "canonical_config",
    "carried_features",
    "delta_blockers",
    "describe_modules",
    "load_config_json",
    "parse_key",
    "resolve_rank_alpha",
    "rewrites_base",
    "scaling_for",
    "validate_lora_config",
]

#: PEFT saves LoRA weights under the wrapped model's path: ``base_model.model.<module>.lora_A.weight``.
KEY_PREFIX = "base_model.model."
_SUFFIXES: tuple[tuple[str, str, bool], ...] = (
    (".lora_A.weight", "A", False),
    (".lora_B.weight", "B", False),
    (".lora_embedding_A", "A", True),
    (".lora_embedding_B", "B", True),
)
_NON_LORA_TYPES = ("IA3", "LOHA", "LOKR", "ADALORA", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "OFT", "BOFT")
#: Config fields under which a module's weight change is no longer ``scaling * B @ A``. Adapters that
#: set them are stored and exported unchanged, but their deltas are refused rather than guessed.
#: (``use_qalora`` gives lora_A a pooled input of ``in / qalora_group_size`` features on GPTQ layers.)
DELTA_CHANGING_FIELDS = (
    "use_dora",
    "lora_bias",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "use_bdlora",
    "monteclora_config",
    "use_qalora",
)
#: ``init_lora_weights`` values under which PEFT rewrites the *base* weights when it loads the adapter
#: (``PeftModel.from_pretrained`` runs the init again: PiSSA/CorDA/OLoRA/LoRA-GA subtract the initial
#: factors from the base, LoftQ replaces it with a quantised residual). The effective change to the original
#: base is then ``scaling * B @ A`` minus something adapterkit cannot know, so deltas are refused.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
#: Fields whose tensors ``merge`` applies as PEFT does (:mod:`adapterkit.merging.steps`), though the change is
#: not (only) ``scaling * B @ A``.
MERGEABLE_FIELDS = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices")
#: Fields that bring tensors or structure beyond the LoRA factors; carried through unchanged.
_CARRIED_FIELDS = ("modules_to_save", "trainable_token_indices", "layer_replication", *DELTA_CHANGING_FIELDS)


def load_config_json(data: bytes, source: str) -> dict[str, Any]:
    """Parse ``adapter_config.json`` bytes, with a clear message for the usual wrong files."""
    if data.startswith(b"version https://git-lfs"):
        raise AdapterFormatError(f"{source}: is a Git LFS pointer, not the config itself (run `git lfs pull`)")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFormatError(f"{source}: not valid JSON ({exc})") from None
    except RecursionError:
        raise AdapterFormatError(f"{source}: not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise AdapterFormatError(f"{source}: not a JSON object")
    return canonical_config(doc)


#: Config fields PEFT turns into sets: their order means nothing, and PEFT saves them in hash order.
_SET_FIELDS = ("target_modules", "exclude_modules")


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with set-valued lists sorted and de-duplicated, so one adapter has one digest.

    PEFT saves ``target_modules`` in set iteration order, which changes from run to run: the same
    adapter saved twice would otherwise get two digests.
    """
    out = dict(config)
    for field in _SET_FIELDS:
        value = out.get(field)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            out[field] = sorted(set(value))
    return out


def validate_lora_config(config: Mapping[str, Any], source: str) -> None:
    """Refuse configs adapterkit cannot represent, naming the field that is at fault."""
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterFormatError(f"{source}: not a PEFT adapter config (no 'peft_type' field)")
    if peft_type != "LORA":
        kind = "a non-LoRA PEFT type" if peft_type in _NON_LORA_TYPES else "not a PEFT type adapterkit knows"
        raise UnsupportedAdapterError(
            f"{source}: field 'peft_type' is {_short(peft_type)} ({kind}); adapterkit handles LoRA adapters only"
        )
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterFormatError(f"{source}: field 'r' must be a positive integer, got {_short(r)}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterFormatError(f"{source}: field 'lora_alpha' must be a number, got {_short(alpha)}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterFormatError(f"{source}: field 'use_rslora' must be true or false")
    for field, kind in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise AdapterFormatError(f"{source}: field {field!r} must be an object")
        for key, value in pattern.items():
            if kind == "rank":
                ok = isinstance(value, int) and value >= 1
            else:
                ok = isinstance(value, int | float) and math.isfinite(value)
            if isinstance(value, bool) or not ok:
                raise AdapterFormatError(
                    f"{source}: field '{field}' key {_short(key)} must map to a "
                    f"{'positive integer' if kind == 'rank' else 'finite number'}, got {_short(value)}"
                )
            try:
                re.compile(key)
            except (re.error, RecursionError, OverflowError) as exc:
                raise AdapterFormatError(
                    f"{source}: field '{field}' key {_short(key)} is not a valid regex ({exc})"
                ) from None
    if config.get("target_parameters"):
        raise UnsupportedAdapterError(
            f"{source}: field 'target_parameters' (LoRA on bare nn.Parameter tensors) is not supported"
        )
    if config.get("fan_in_fan_out") not in (None, True, False):
        raise AdapterFormatError(f"{source}: field 'fan_in_fan_out' must be true or false")


def _short(value: Any) -> str:
    """``value`` for an error message: JSON (so one line, as it appears in the file), cut to a readable length."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _pattern_key(pattern_keys: Any, module: str) -> str | None:
    # Mirrors peft.utils.other.get_pattern_key: the first key whose regex matches the path's tail.
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def resolve_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The (r, lora_alpha) PEFT gives ``module`` (its path inside the base model)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = _pattern_key(rank_pattern.keys(), module)
    a_key = _pattern_key(alpha_pattern.keys(), module)
    r = rank_pattern[r_key] if r_key is not None else config.get("r", 8)
    alpha = alpha_pattern[a_key] if a_key is not None else config.get("lora_alpha", 8)
    return int(r), alpha


def scaling_for(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def parse_key(key: str) -> tuple[str, str, bool] | None:
    """``(module path, "A" | "B", is_embedding)`` for a LoRA factor key, else None."""
    for suffix, role, embedding in _SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return module.removeprefix(KEY_PREFIX), role, embedding
    return None


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA module as its config and factor shapes describe it."""

    name: str
    kind: str  # linear | embedding | conv1d | conv2d | conv3d
    r: int
    alpha: float
    scaling: float
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()
    fan_in_fan_out: bool = False
    dtype: str = "F32"

    @property
    def a_shape(self) -> tuple[int, ...]:
        return (self.r, self.in_features, *self.kernel)

    @property
    def b_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.r, *(1 for _ in self.kernel))

    @property
    def base_shape(self) -> tuple[int, ...]:
        """The shape of the base weight this module changes."""
        if self.kind == "embedding" or self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def num_parameters(self) -> int:
        return math.prod(self.a_shape) + math.prod(self.b_shape)

    def a_key(self, prefix: str) -> str:
        return f"{prefix}{self.name}.{'lora_embedding_A' if self.kind == 'embedding' else 'lora_A.weight'}"

    def b_key(self, prefix: str) -> str:
        return f"{prefix}{self.name}.{'lora_embedding_B' if self.kind == 'embedding' else 'lora_B.weight'}"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "r": self.r,
            "alpha": self.alpha,
            "scaling": self.scaling,
            "in": self.in_features,
            "out": self.out_features,
            "dtype": self.dtype,
        }
        if self.kernel:
            doc["kernel"] = list(self.kernel)
        if self.fan_in_fan_out:
            doc["fan_in_fan_out"] = True
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModuleSpec:
        return cls(
            name=doc["name"],
            kind=doc["kind"],
            r=doc["r"],
            alpha=doc["alpha"],
            scaling=doc["scaling"],
            in_features=doc["in"],
            out_features=doc["out"],
            kernel=tuple(doc.get("kernel", ())),
            fan_in_fan_out=doc.get("fan_in_fan_out", False),
            dtype=doc.get("dtype", "F32"),
        )


_KINDS = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}


def describe_modules(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[str, tuple[int, ...]]], source: str
) -> tuple[list[ModuleSpec], list[str], str]:
    """Pair the LoRA factors in ``shapes`` (key -> (dtype, shape)) into modules.

    Returns the modules sorted by name, the keys that are not LoRA factors (carried through
    unchanged: ``modules_to_save`` copies, DoRA magnitudes, trainable tokens), and the key
    prefix the file uses. Each factor's shape is checked against the rank the config resolves.
    """
    factors: dict[str, dict[str, tuple[str, str, tuple[int, ...], bool]]] = {}
    extras: list[str] = []
    prefixes: set[str] = set()
    for key, (dtype, shape) in shapes.items():
        parsed = parse_key(key)
        if parsed is None:
            extras.append(key)
            continue
        module, role, embedding = parsed
        prefixes.add(KEY_PREFIX if key.startswith(KEY_PREFIX) else "")
        factors.setdefault(module, {})[role] = (key, dtype, shape, embedding)
    if not factors:
        raise AdapterFormatError(f"{source}: holds no LoRA weights (no keys ending in .lora_A.weight)")
    if len(prefixes) > 1:
        raise AdapterFormatError(f"{source}: mixes keys with and without the {KEY_PREFIX!r} prefix")
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules = []
    for name in sorted(factors):
        parts = factors[name]
        for role in ("A", "B"):
            if role not in parts:
                other = "B" if role == "A" else "A"
                raise AdapterFormatError(f"{source}: module {name!r} has lora_{other} but no lora_{role}")
        _, a_dtype, a_shape, embedding = parts["A"]
        _, b_dtype, b_shape, _ = parts["B"]
        kind = "embedding" if embedding else _KINDS.get(len(a_shape))
        if kind is None or len(b_shape) != len(a_shape) or any(d != 1 for d in b_shape[2:]):
            raise AdapterFormatError(
                f"{source}: module {name!r} has factor shapes {list(a_shape)} and {list(b_shape)} "
                "that are not a LoRA pair"
            )
        r, alpha = resolve_rank_alpha(config, name)
        if a_shape[0] != r or b_shape[1] != r:
            raise AdapterFormatError(
                f"{source}: module {name!r} has lora_A {list(a_shape)} and lora_B {list(b_shape)} "
                f"but its config gives r={r} (check 'r' and 'rank_pattern')"
            )
        if a_dtype != b_dtype:
            raise AdapterFormatError(f"{source}: module {name!r} mixes dtypes {a_dtype} and {b_dtype}")
        modules.append(
            ModuleSpec(
                name=name,
                kind=kind,
                r=r,
                alpha=alpha,
                scaling=scaling_for(r, alpha, use_rslora),
                in_features=a_shape[1],
                out_features=b_shape[0],
                kernel=tuple(a_shape[2:]),
                fan_in_fan_out=fan_in_fan_out and kind == "linear",
                dtype=a_dtype,
            )
        )
    return modules, sorted(extras), prefixes.pop()


def rewrites_base(config: Mapping[str, Any]) -> bool:
    """Whether PEFT changes the base weights themselves when it loads this adapter (see ``init_lora_weights``)."""
    init = config.get("init_lora_weights")
    return isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS)


def delta_blockers(config: Mapping[str, Any]) -> list[str]:
    """The config fields that make a module's weight change something other than ``scaling * B @ A``."""
    fields = [field for field in DELTA_CHANGING_FIELDS if config.get(field)]
    if rewrites_base(config):
        fields.append("init_lora_weights")
    return fields


def carried_features(config: Mapping[str, Any]) -> list[str]:
    """Config fields set to something adapterkit carries through rather than interprets."""
    fields = [field for field in _CARRIED_FIELDS if config.get(field)]
    if rewrites_base(config):
        fields.append("init_lora_weights")
    return fields
