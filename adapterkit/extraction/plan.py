"""What an extraction will do, decided from the two models' headers alone (no weight is read).

:func:`plan_extraction` opens both folders, checks they have the same structure, picks the
weights to factor (every linear projection of the decoder layers by default; embeddings and the
output layer on request, a tied pair once), and bounds each module's rank and the adapter's size
for the rank rule asked for. ``extract`` then runs the plan; ``extract --dry-run`` prints it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit.base_model import OUTPUT_EMBEDDINGS, BaseFingerprint, BaseModel, input_embedding, open_base
from adapterkit.errors import ExtractionError, InvalidInputError
from adapterkit.extraction.pair import Located, check_structure, locate
from adapterkit.files.safetensors import DTYPE_SIZES

__all__ = [
    "ALL_LINEAR",
    "ExtractionPlan",
    "PlannedModule",
    "Selection",
    "check_selection",
    "plan_extraction",
]

#: The ``targets`` value that means "every linear projection of the decoder layers" (PEFT's name for it).
ALL_LINEAR = "all-linear"
#: Weights a LoRA can be added to; anything else (quantized, integer) is never a target.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: Architectures whose layers are GPT-2 ``Conv1D``: weights stored (in, out), PEFT's ``fan_in_fan_out``.
_CONV1D_MODEL_TYPES = ("gpt2",)
_LAYER_INDEX = re.compile(r"\.\d+\.")
_DTYPE_ALIASES = {
    "float32": "F32",
    "fp32": "F32",
    "f32": "F32",
    "float": "F32",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "f16": "F16",
    "half": "F16",
    "float64": "F64",
    "fp64": "F64",
    "f64": "F64",
}
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


@dataclass(frozen=True)
class Selection:
    """The rank rule: one of a rank for every module, a fraction of each module's energy, or a parameter budget."""

    rank: int | None = None
    energy: float | None = None
    budget: int | None = None

    @property
    def kind(self) -> str:
        return "rank" if self.rank is not None else "energy" if self.energy is not None else "budget"

    @property
    def value(self) -> float:
        value = self.rank if self.rank is not None else self.energy if self.energy is not None else self.budget
        assert value is not None
        return value

    def to_json(self) -> dict[str, Any]:
        return {self.kind: self.value}


def check_selection(rank: int | None, energy: float | None, budget: int | None) -> Selection:
    """Exactly one rank rule, with a valid value."""
    given = [name for name, value in (("rank", rank), ("energy", energy), ("budget", budget)) if value is not None]
    if len(given) != 1:
        raise ExtractionError(
            "give exactly one of rank, energy or budget"
            + (f" (got {', '.join(given)})" if given else " (how many ranks to keep)")
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ExtractionError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not (isinstance(energy, int | float) and 0 < energy <= 1):
        raise ExtractionError(f"energy must be a fraction in (0, 1], got {energy!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ExtractionError(f"budget must be a positive number of parameters, got {budget!r}")
    return Selection(rank, float(energy) if energy is not None else None, budget)


@dataclass(frozen=True)
class PlannedModule:
    """One weight to factor: the LoRA module that will hold it and the matrix it factors.

    The factored matrix is ``out x in``: the weight itself for a linear layer, its transpose for an
    embedding (PEFT's ``lora_embedding_A`` is r x vocabulary) and for a GPT-2 ``Conv1D``.
    """

    name: str
    tensor: str
    kind: str  # "linear" or "embedding"
    out_features: int
    in_features: int
    fan_in_fan_out: bool
    #: the rank this module gets (``rank`` rule), else None (decided by the spectrum)
    rank: int | None
    #: the most it can get: min(out, in), and under a budget what one module alone could afford
    max_rank: int

    @property
    def cost(self) -> int:
        """Parameters one rank of this module costs (a column of B and a row of A)."""
        return self.out_features + self.in_features

    @property
    def transposed(self) -> bool:
        return self.kind == "embedding" or self.fan_in_fan_out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensor": self.tensor,
            "kind": self.kind,
            "in": self.in_features,
            "out": self.out_features,
            "rank": self.rank,
            "max_rank": self.max_rank,
        }


@dataclass(frozen=True)
class ExtractionPlan:
    """Everything an extraction will do, decided from headers before a weight is read."""

    base_dir: Path
    tuned_dir: Path
    selection: Selection
    modules: list[PlannedModule]
    #: tensors that are not factored: each is compared, and reported if it changed
    compared: list[str]
    #: the tensor shared by the input embedding and the output layer, when the base ties them
    tied: str | None
    targets: list[str] | None
    keep_changed: bool
    #: dtype code of the factors
    dtype: str
    base: BaseFingerprint
    tuned: BaseFingerprint
    base_name: str
    task_type: str | None
    #: bytes both models' tensors take together: what the extraction reads at least once
    read_bytes: int
    #: where each tensor is, in each model (in the base's shard order)
    base_tensors: dict[str, Located]
    tuned_tensors: dict[str, Located]

    @property
    def rank_range(self) -> tuple[int, int]:
        """The smallest and largest rank a module can end up with."""
        if self.selection.rank is not None:
            ranks = [m.rank or 0 for m in self.modules]
            return min(ranks), max(ranks)
        low = 0 if self.selection.budget is not None else 1
        return low, max(m.max_rank for m in self.modules)

    @property
    def parameter_range(self) -> tuple[int, int]:
        """Bounds on the factors' parameters (exact for ``rank``; fewer when weights did not change)."""
        if self.selection.rank is not None:
            total = sum((m.rank or 0) * m.cost for m in self.modules)
            return total, total
        if self.selection.budget is not None:
            return 0, min(self.selection.budget, sum(m.max_rank * m.cost for m in self.modules))
        return sum(m.cost for m in self.modules), sum(m.max_rank * m.cost for m in self.modules)

    def to_json(self) -> dict[str, Any]:
        low, high = self.parameter_range
        size = DTYPE_SIZES[self.dtype]
        return {
            "base_dir": str(self.base_dir),
            "tuned_dir": str(self.tuned_dir),
            "selection": self.selection.to_json(),
            "targets": self.targets,
            "keep_changed": self.keep_changed,
            "dtype": self.dtype,
            "num_modules": len(self.modules),
            "ranks": {"min": self.rank_range[0], "max": self.rank_range[1]},
            "parameters": {"min": low, "max": high},
            "adapter_bytes": {"min": low * size, "max": high * size},
            "compared_tensors": len(self.compared),
            "read_bytes": self.read_bytes,
            "tied_embedding": self.tied,
            "base_structure_digest": self.base.structure_digest,
            "tuned_structure_digest": self.tuned.structure_digest,
            "modules": [m.to_json() for m in self.modules],
        }


def _factor_dtype(dtype: str | None) -> str:
    if dtype is None:
        return "F32"
    text = str(dtype).removeprefix("torch.")
    code = text.upper() if text.upper() in _FLOAT_DTYPES else _DTYPE_ALIASES.get(text.lower())
    if code is None:
        raise InvalidInputError(f"dtype {text!r} cannot hold adapter factors; use float32, bfloat16 or float16")
    return code


def _matches(module: str, pattern: str) -> bool:
    """PEFT's rule for a ``target_modules`` list entry: the whole path, or its tail after a dot."""
    return module == pattern or module.endswith("." + pattern)


def _task_type(config: dict[str, Any] | None) -> str | None:
    for architecture in (config or {}).get("architectures") or []:
        for suffix, task in _TASK_TYPES:
            if isinstance(architecture, str) and architecture.endswith(suffix):
                return task
    return None


def _select(
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    targets: list[str] | None,
    tied: str | None,
    embedding: str | None,
    base_dir: Path,
) -> list[tuple[str, str]]:
    """``(module path, tensor)`` of every weight to factor, sorted by module path."""
    weights = {name.removesuffix(".weight"): name for name in tensors if name.endswith(".weight")}
    outputs = {module for module in weights if module.rsplit(".", 1)[-1] in OUTPUT_EMBEDDINGS}
    embedding_module = embedding.removesuffix(".weight") if embedding else None

    def is_projection(module: str) -> bool:
        dtype, shape = tensors[weights[module]]
        return (
            len(shape) == 2
            and dtype in _FLOAT_DTYPES
            and _LAYER_INDEX.search(f".{module}.") is not None
            and module != embedding_module
            and module not in outputs
        )

    chosen: dict[str, str] = {}
    for pattern in targets or [ALL_LINEAR]:
        if pattern == ALL_LINEAR:
            found = [m for m in weights if is_projection(m)]
            if not found:
                raise ExtractionError(f"{base_dir}: has no linear projections in numbered layers to extract")
        else:
            found = [m for m in weights if _matches(m, pattern)]
            if not found and tied is not None and pattern.rsplit(".", 1)[-1] in OUTPUT_EMBEDDINGS:
                found = [tied.removesuffix(".weight")]  # the output layer is the tied input embedding
            if not found:
                raise ExtractionError(f"target {pattern!r} matches no weight in {base_dir}")
        for module in found:
            dtype, shape = tensors[weights[module]]
            if len(shape) != 2:
                raise ExtractionError(
                    f"target {pattern!r} matches {weights[module]}, which is {list(shape)}: only 2-D weights are "
                    "extracted (norms and biases are carried whole with --keep-changed)"
                )
            if dtype not in _FLOAT_DTYPES:
                raise ExtractionError(
                    f"target {pattern!r} matches {weights[module]}, stored as {dtype} (quantized?): "
                    "only floating weights are extracted"
                )
            chosen[module] = weights[module]
    return sorted(chosen.items())


def plan_extraction(
    base_dir: str | os.PathLike[str] | BaseModel,
    tuned_dir: str | os.PathLike[str] | BaseModel,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: int | None = None,
    targets: list[str] | None = None,
    keep_changed: bool = False,
    dtype: str | None = None,
) -> ExtractionPlan:
    """Check the pair and decide what to extract, from headers only; see :func:`adapterkit.extract`."""
    selection = check_selection(rank, energy, budget)
    code = _factor_dtype(dtype)
    if targets is not None and not targets:
        raise ExtractionError("targets is empty; leave it out for every linear projection")
    base_model, tuned_model = open_base(base_dir), open_base(tuned_dir)  # each folder's headers, read once
    base, tuned = base_model.path, tuned_model.path
    base_tensors, tuned_tensors = locate(base_model.headers), locate(tuned_model.headers)
    check_structure(base_tensors, tuned_tensors, base, tuned)
    base_fp, tuned_fp = base_model.fingerprint(), tuned_model.fingerprint()
    config = base_model.require_config()
    tied = base_model.tied
    embedding = input_embedding(base_fp.tensors)
    conv1d = (config or {}).get("model_type") in _CONV1D_MODEL_TYPES
    modules = []
    for module, tensor in _select(base_fp.tensors, targets, tied, embedding, base):
        shape = base_fp.tensors[tensor][1]
        kind = "embedding" if tensor == embedding else "linear"
        fan_in_fan_out = conv1d and kind == "linear" and module.rsplit(".", 1)[-1] not in OUTPUT_EMBEDDINGS
        out_features, in_features = (shape[1], shape[0]) if kind == "embedding" or fan_in_fan_out else shape
        full = min(out_features, in_features)
        most = full if selection.budget is None else min(full, selection.budget // (out_features + in_features))
        modules.append(
            PlannedModule(
                name=module,
                tensor=tensor,
                kind=kind,
                out_features=out_features,
                in_features=in_features,
                fan_in_fan_out=fan_in_fan_out,
                rank=min(selection.rank, full) if selection.rank is not None else None,
                max_rank=most,
            )
        )
    if selection.budget is not None and all(m.max_rank == 0 for m in modules):
        cheapest = min(m.cost for m in modules)
        raise ExtractionError(
            f"budget {selection.budget:,} is less than one rank of any target costs (the cheapest, "
            f"{min(modules, key=lambda m: m.cost).name}, costs {cheapest:,} parameters)"
        )
    factored = {m.tensor for m in modules}
    return ExtractionPlan(
        base_dir=base,
        tuned_dir=tuned,
        selection=selection,
        modules=modules,
        compared=[name for name in base_fp.tensors if name not in factored],
        tied=tied,
        targets=list(targets) if targets is not None else None,
        keep_changed=keep_changed,
        dtype=code,
        base=base_fp,
        tuned=tuned_fp,
        base_name=str(base_dir),
        task_type=_task_type(config),
        read_bytes=sum(loc.info.nbytes for loc in (*base_tensors.values(), *tuned_tensors.values())),
        base_tensors=base_tensors,
        tuned_tensors=tuned_tensors,
    )
