"""Pre-flight: will this adapter do what it says on this base? Checked from headers alone.

Runtimes fail quietly on the faults users keep reporting: vLLM and TGI serve base-model output for
an adapter whose keys miss the base (vllm #34186, TGI #2505), PEFT warns and moves on when keys do
not match, a vocabulary resized after training breaks the embedding LoRA, a GPT-2 ``Conv1D`` layer
takes its delta transposed. This module compares what the store recorded about an adapter (its
modules, factor shapes and dtypes, extra tensors, base fingerprint) with a base model's
safetensors headers and ``config.json``; no weights are read, of either, so a check of an 8B
base takes milliseconds.

Every problem is one line naming the module (or the fingerprint, name or revision) at fault.
Modules are matched to base tensors as loaders match them: the module path plus ``.weight``,
allowing the one leading component transformers adds or strips (``model.``); a module that a
lenient suffix match would find but an exact loader would not is reported as a key-prefix
problem, because PEFT and vLLM would silently leave it out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.config import KEY_PREFIX, ModuleSpec
from adapterkit.base_identity import repo_id
from adapterkit.base_model import (
    OUTPUT_EMBEDDINGS,
    BaseModel,
    is_vocabulary_tensor,
    open_base,
    structure_digest,
)

if TYPE_CHECKING:
    from adapterkit.store import Store

__all__ = ["CheckReport", "Problem", "check", "check_modules"]

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_HALF = ("F16", "BF16")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXTRA_MARKERS = (
    ".lora_magnitude_vector",
    ".lora_B.bias",
    ".token_adapter.",
    ".base_layer.weight",
    ".modules_to_save.",
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong: what kind, which module (None for adapter-wide ones), and the line to show."""

    kind: str  #: fingerprint | name | revision | prefix | missing | shape | orientation | vocab | dtype | kind
    module: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "module": self.module, "message": self.message}


@dataclass
class CheckReport:
    """The problems found (empty when the adapter fits the base)."""

    base: str
    modules: int
    problems: list[Problem] = field(default_factory=list)
    #: The adapter checked, when it came from a store.
    digest: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "base": self.base,
            "modules": self.modules,
            "ok": self.ok,
            "problems": [p.to_json() for p in self.problems],
        }


def _short(digest: str) -> str:
    return digest[:19]


def _same_model_in(base: BaseModel, recorded: str) -> str | None:
    """The float dtype in which this base's tensors hash to ``recorded``, if converting explains the mismatch."""
    for dtype in _FLOAT_DTYPES:
        converted = {name: (dtype if d in _FLOAT_DTYPES else d, shape) for name, (d, shape) in base.tensors.items()}
        if structure_digest(converted) == recorded:
            return dtype
    return None


def _float_dtypes(base: BaseModel) -> str:
    found = sorted({d for d, _ in base.tensors.values() if d in _FLOAT_DTYPES})
    return "/".join(found) or "none"


def _hub_name_and_revision(base: BaseModel) -> tuple[str | None, str | None]:
    """The Hub id and commit a base folder came from, when it lies in a Hugging Face cache snapshot."""
    path = base.path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        repo = path.parent.parent.name.removeprefix("models--").replace("--", "/")
        return repo, path.name
    name = (base.config or {}).get("_name_or_path")
    return (name if isinstance(name, str) and _HUB_ID.match(name) else None), None


def _base_identity(problems: list[Problem], recorded: Mapping[str, Any] | None, base: BaseModel) -> None:
    if not recorded:
        return
    digest = recorded.get("structure_digest")
    if digest and digest != base.structure_digest:
        dtype = _same_model_in(base, digest)
        if dtype is not None:
            problems.append(
                Problem(
                    "dtype",
                    None,
                    f"base dtype: the adapter was recorded against this model in {dtype}, but {base.path} holds "
                    f"{_float_dtypes(base)} weights",
                )
            )
        else:
            problems.append(
                Problem(
                    "fingerprint",
                    None,
                    f"fingerprint: the adapter was recorded against base {_short(digest)}, but {base.path} is "
                    f"{_short(base.structure_digest)} (another model, or other tensor names or shapes)",
                )
            )
    hub_name, hub_revision = _hub_name_and_revision(base)
    name = recorded.get("name")
    recorded_id = repo_id(name) if isinstance(name, str) else None
    if recorded_id and hub_name and hub_name.lower() != recorded_id:  # Hub ids compare case-insensitively
        problems.append(
            Problem("name", None, f"base name: the adapter was trained on {name!r}, the base is {hub_name!r}")
        )
    revision = recorded.get("revision")
    known = isinstance(revision, str) and _HEX40.match(revision) and hub_revision and _HEX40.match(hub_revision)
    if known and revision != hub_revision:
        problems.append(
            Problem(
                "revision",
                None,
                f"base revision: the adapter was trained on revision {revision[:12]}, "
                f"the base is {str(hub_revision)[:12]}",
            )
        )


def _exact_key(module: str, base: BaseModel) -> tuple[str | None, bool]:
    """The base tensor a loader matching names exactly would find for ``module`` (and whether via the tie).

    transformers loads a checkpoint of the bare model (``layers.0...``) into the task model
    (``model.layers.0...``), so a module path may carry one leading component the checkpoint lacks,
    but only when no tensor of the checkpoint has it: ``model.model.layers.0...`` on a checkpoint
    that names ``model.layers.0...`` is a doubled prefix, which PEFT would not match.
    """
    if f"{module}.weight" in base.tensors:
        return f"{module}.weight", False
    first, _, rest = module.partition(".")
    if rest and f"{rest}.weight" in base.tensors and not any(name.startswith(first + ".") for name in base.tensors):
        return f"{rest}.weight", False
    if base.tied is not None and module.rsplit(".", 1)[-1] in OUTPUT_EMBEDDINGS:
        return base.tied, True
    return None, False


def _suffix_match(module: str, base: BaseModel) -> str | None:
    """A base tensor whose name ends with the module path minus some leading components (a wrong prefix).

    Only leading components without a layer index may differ (``model.``, ``decoder.``,
    ``base_model.``): a module of layer 5 never stands for a tensor of layer 0.
    """
    parts = module.split(".")
    for start in range(1, len(parts)):
        if any(part.isdigit() for part in parts[:start]):
            break
        tail = ".".join(parts[start:]) + ".weight"
        matches = [name for name in base.tensors if name == tail or name.endswith("." + tail)]
        matches = [name for name in matches if not any(p.isdigit() for p in name[: -len(tail)].split("."))]
        if len(matches) == 1 and "." in tail.removesuffix(".weight"):
            return matches[0]
    return None


def _prefixes(module: str, key: str) -> tuple[str, str]:
    """``(adapter prefix, base prefix)``: the leading parts of ``module`` and ``key`` before their common tail."""
    a, b = module.split("."), key.removesuffix(".weight").split(".")
    common = 0
    while common < min(len(a), len(b)) and a[-1 - common] == b[-1 - common]:
        common += 1
    return ".".join(a[: len(a) - common]), ".".join(b[: len(b) - common])


def _vocab_size(base: BaseModel) -> int | None:
    size = (base.config or {}).get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _is_vocab_module(spec: ModuleSpec, key: str, base: BaseModel) -> bool:
    return spec.kind == "embedding" or is_vocabulary_tensor(key, base.tensors)


def _check_shape(problems: list[Problem], spec: ModuleSpec, key: str, base: BaseModel) -> None:
    shape = base.tensors[key][1]
    want = spec.base_shape
    if len(shape) != len(want):
        what = {2: "a linear or embedding weight", 3: "a conv1d weight", 4: "a conv2d weight", 5: "a conv3d weight"}
        problems.append(
            Problem(
                "kind",
                spec.name,
                f"module {spec.name}: a {spec.kind} LoRA, but base tensor {key} {list(shape)} is "
                f"{what.get(len(shape), f'{len(shape)}-dimensional')}",
            )
        )
        return
    if shape != want:
        if spec.kind == "linear" and len(shape) == 2 and shape == want[::-1]:
            if spec.fan_in_fan_out:
                fix = "the adapter sets fan_in_fan_out, but this base stores an nn.Linear weight [out, in]"
            else:
                fix = "the base stores a GPT-2 style Conv1D weight [in, out]: the adapter needs fan_in_fan_out=true"
            problems.append(
                Problem(
                    "orientation",
                    spec.name,
                    f"module {spec.name}: its delta is laid out {list(want)} but base tensor {key} is "
                    f"{list(shape)}; {fix}",
                )
            )
            return
        # embeddings [vocab, dim] and output layers [vocab, hidden] both keep the vocabulary on axis 0
        if _is_vocab_module(spec, key, base) and shape[1] == want[1]:
            problems.append(
                Problem(
                    "vocab",
                    spec.name,
                    f"module {spec.name}: made for a vocabulary of {want[0]} tokens, but base tensor {key} "
                    f"has {shape[0]} (config vocab_size {_vocab_size(base)}): the vocabulary was resized; "
                    "resize the base's embeddings to match",
                )
            )
            return
        problems.append(
            Problem(
                "shape",
                spec.name,
                f"module {spec.name}: changes a {list(want)} weight, but base tensor {key} is {list(shape)}",
            )
        )
        return
    if _is_vocab_module(spec, key, base):
        vocab = _vocab_size(base)
        if vocab is not None and shape[0] != vocab:
            problems.append(
                Problem(
                    "vocab",
                    spec.name,
                    f"module {spec.name}: base tensor {key} has {shape[0]} rows but config.json says "
                    f"vocab_size {vocab}",
                )
            )


def _check_dtype(problems: list[Problem], spec: ModuleSpec, key: str, base: BaseModel) -> None:
    base_dtype = base.tensors[key][0]
    if spec.dtype not in _FLOAT_DTYPES:
        problems.append(
            Problem("dtype", spec.name, f"module {spec.name}: its factors are {spec.dtype}, not a float type")
        )
    elif base_dtype not in _FLOAT_DTYPES:
        problems.append(
            Problem(
                "dtype",
                spec.name,
                f"module {spec.name}: base tensor {key} is stored as {base_dtype} (quantized?), not a float type",
            )
        )
    elif spec.dtype in _HALF and base_dtype in _HALF and spec.dtype != base_dtype:
        problems.append(
            Problem(
                "dtype",
                spec.name,
                f"module {spec.name}: factors are {spec.dtype} but base tensor {key} is {base_dtype}; a loader that "
                "casts the adapter to the base's dtype (vLLM does by default) rounds or overflows them",
            )
        )


def _extra_module(key: str) -> str:
    path = key.removeprefix(KEY_PREFIX)
    for marker in _EXTRA_MARKERS:
        if marker in path:
            return path.split(marker, 1)[0]
    return path.rsplit(".", 1)[0] if path.endswith((".weight", ".bias")) else path


def check_modules(
    modules: Sequence[ModuleSpec],
    extra_tensors: Mapping[str, tuple[str, tuple[int, ...]] | None],
    recorded_base: Mapping[str, Any] | None,
    base: BaseModel,
) -> CheckReport:
    """Check an adapter, described by its modules, extra tensors (key -> (dtype, shape) or None) and
    recorded base, against ``base``: the problems a loader would meet or hide."""
    problems: list[Problem] = []
    _base_identity(problems, recorded_base, base)
    wrong_prefix: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for spec in modules:
        key, _ = _exact_key(spec.name, base)
        if key is None:
            near = _suffix_match(spec.name, base)
            if near is not None:
                wrong_prefix.setdefault(_prefixes(spec.name, near), []).append((spec.name, near))
            else:
                problems.append(
                    Problem(
                        "missing",
                        spec.name,
                        f"module {spec.name}: the base has no tensor {spec.name}.weight (a layer it lacks)",
                    )
                )
            continue
        _check_shape(problems, spec, key, base)
        _check_dtype(problems, spec, key, base)
    flagged = {p.module for p in problems}
    for key, described in sorted(extra_tensors.items()):
        module = _extra_module(key)
        target, _ = _exact_key(module, base)
        if target is None:
            near = _suffix_match(module, base) if module else None
            if near is not None:
                wrong_prefix.setdefault(_prefixes(module, near), []).append((key.removeprefix(KEY_PREFIX), near))
            else:
                problems.append(
                    Problem(
                        "missing", module, f"tensor {key}: the base has no module {module} for it, so it is ignored"
                    )
                )
            continue
        if described is None or module in flagged:
            continue  # a module already reported is not reported again through its extra tensors
        _, shape = described
        base_shape = base.tensors[target][1]
        if (key.endswith(".weight") and ".lora_" not in key) and ".token_adapter." not in key and shape != base_shape:
            if len(shape) == 2 and len(base_shape) == 2 and shape[1] == base_shape[1]:
                problems.append(
                    Problem(
                        "vocab",
                        module,
                        f"tensor {key}: a copy of {target} with {shape[0]} rows, but the base has {base_shape[0]}: "
                        "the vocabulary was resized; resize the base's embeddings to match",
                    )
                )
            else:
                problems.append(
                    Problem(
                        "shape", module, f"tensor {key}: {list(shape)}, but base tensor {target} is {list(base_shape)}"
                    )
                )
    for (adapter_prefix, base_prefix), found in sorted(wrong_prefix.items()):
        ours = adapter_prefix + "." if adapter_prefix else ""
        theirs = base_prefix + "." if base_prefix else ""
        name, key = found[0]
        problems.append(
            Problem(
                "prefix",
                name,
                f"key prefix: {len(found)} name(s) have prefix {ours!r} where the base has {theirs!r} "
                f"(e.g. {name} for {key}); PEFT and vLLM match names exactly and would ignore them",
            )
        )
    return CheckReport(base=str(base.path), modules=len(modules), problems=problems)


def describe_extras(
    header_tensors: Mapping[str, Any], extras: Sequence[str]
) -> dict[str, tuple[str, tuple[int, ...]] | None]:
    """key -> (dtype, shape) of each extra tensor, from a safetensors header's tensor table."""
    out: dict[str, tuple[str, tuple[int, ...]] | None] = {}
    for key in extras:
        info = header_tensors.get(key)
        out[key] = (info.dtype, tuple(info.shape)) if info is not None else None
    return out


def check(store: Store, ref: str, base: str | os.PathLike[str] | BaseModel) -> CheckReport:
    """Check the stored adapter ``ref`` against the base model folder ``base`` (headers only).

    What is compared comes from the store's metadata document and the header of the stored
    weights file (for the shapes of extra tensors); the base's tensors are never read.
    """
    from adapterkit.files.safetensors import read_header
    from adapterkit.store.store import WEIGHTS_NAME

    model = open_base(base)
    digest = store.resolve(ref)
    metadata = store.metadata(digest)
    modules = [ModuleSpec.from_json(doc) for doc in metadata["modules"]]
    extras: dict[str, tuple[str, tuple[int, ...]] | None] = dict.fromkeys(metadata["extra_tensors"])
    if extras:
        _, layers = store.manifest(digest)
        weights = next(layer for layer in layers if layer.title == WEIGHTS_NAME)
        header = read_header(store.blob_path(weights.digest))
        extras = describe_extras(header.tensors, list(extras))
    report = check_modules(modules, extras, metadata.get("base_model"), model)
    report.digest = digest
    return report
