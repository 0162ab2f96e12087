"""What a merge will do, decided and checked before a byte is written (no torch maths here).

:func:`build_plan` reads the base's safetensors headers, resolves every adapter module to the base
tensor it changes (the common ``transformers`` layouts, tied embeddings, ``fan_in_fan_out``),
and turns each adapter into ordered steps per tensor (:mod:`adapterkit.merging.steps`): LoRA and
DoRA modules, ``lora_bias`` vectors, and the tensors an adapter carries in full
(``modules_to_save`` copies, trained biases, trainable tokens). It refuses, naming the adapter and
the tensor, anything that cannot be merged: a fingerprint mismatch, a target the base lacks, a
shape or dtype that does not fit, a weight other than 1 where an adapter replaces values or sets
norms outright, a change that is not one of those. :mod:`adapterkit.merging.streamed` then
writes what the plan says.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.config import KEY_PREFIX, MERGEABLE_FIELDS, carried_features, delta_blockers
from adapterkit.adapter.dtypes import DTYPE_SIZES, FLOAT_DTYPES, all_finite, parse_dtype, torch_dtype
from adapterkit.adapter.extras import REPLACING_KINDS, WEIGHT_ONE_REASONS, Extra, classify_extras
from adapterkit.adapter.model import check_weights
from adapterkit.base_identity import BaseIdentity, reconcile
from adapterkit.base_model import (
    INDEX_NAME,
    OUTPUT_EMBEDDINGS,
    BaseModel,
    base_weight_key,
    input_embedding,
    is_vocabulary_tensor,
    open_base,
    resolve_target,
)
from adapterkit.errors import (
    BaseModelError,
    NonFiniteError,
    UnsupportedAdapterError,
)
from adapterkit.files.safetensors import Header, TensorInfo
from adapterkit.files.sequential import pread_exact
from adapterkit.merging.steps import BiasAddition, Contribution, Replacement, RowReplacement, Step, dora_axis
from adapterkit.weighting import check_finite_factors, check_weight_range

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import Adapter

__all__ = [
    "CONFIG_NAME",
    "Contribution",
    "MergePlan",
    "build_plan",
]

CONFIG_NAME = "config.json"
#: Files in a model folder that hold weights in some other format: copying them would ship unmerged weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
#: tensor name -> (dtype, shape), as :func:`~adapterkit.base_model.fingerprint` lists a base's tensors.
_Shapes = dict[str, tuple[str, tuple[int, ...]]]
_MAGNITUDE_SUFFIX = ".lora_magnitude_vector"


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided and checked before anything is written."""

    base_dir: Path
    weights: list[float]
    #: shard file -> its validated header, in the order the shards are written.
    shards: dict[Path, Header]
    #: base tensor name -> the steps that make its merged value, in order.
    targets: dict[str, list[Step]]
    #: output dtype code (``"BF16"``...) when floating tensors are converted, else None.
    dtype: str | None
    base_structure_digest: str
    index: dict[str, Any] | None
    #: The base's config.json (None when it has none, or when it is copied unread).
    config: dict[str, Any] | None
    copy_files: list[Path]
    skipped_files: list[str]
    warnings: list[str] = field(default_factory=list)
    #: config.json fields the output changes (``vocab_size`` when the vocabulary was resized).
    config_updates: dict[str, Any] = field(default_factory=dict)

    def out_dtype(self, info: TensorInfo) -> str:
        """The dtype ``info``'s tensor has in the output."""
        return self.dtype if self.dtype is not None and info.dtype in FLOAT_DTYPES else info.dtype

    def replacement(self, name: str) -> Replacement | None:
        """The adapter's copy that replaces tensor ``name``, if any: always its first step (the planner refuses
        a replacement after other changes to the same tensor)."""
        steps = self.targets.get(name)
        return steps[0] if steps and isinstance(steps[0], Replacement) else None

    def out_shape(self, info: TensorInfo) -> tuple[int, ...]:
        """The shape ``info``'s tensor has in the output: its replacement's (tokens added), else the base's."""
        replaced = self.replacement(info.name)
        return tuple(replaced.value.shape) if replaced is not None else info.shape

    def out_numel(self, info: TensorInfo) -> int:
        """The number of elements ``info``'s tensor has in the output."""
        shape = self.out_shape(info)
        count = 1
        for size in shape:
            count *= size
        return count

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data the output shards hold."""
        return sum(
            self.out_numel(info) * DTYPE_SIZES[self.out_dtype(info)]
            for header in self.shards.values()
            for info in header.tensors.values()
        )


# --- checks and planning -----------------------------------------------------------------------------------------


def _label(adapter: Adapter, index: int) -> str:
    return f"adapter {index + 1} ({adapter.digest[:19]})" if adapter.digest else f"adapter {index + 1}"


def _check_adapters(adapters: Sequence[Adapter], model: BaseModel, force: bool) -> list[str]:
    """Refuse adapters made for another base, or whose weight change is not ``scaling * B @ A``; returns warnings.

    The base rule is :func:`adapterkit.base_identity.reconcile`, over the adapters and the base
    folder itself (its structure fingerprint, the ``_name_or_path`` its config.json may record,
    and its content digest, computed only when an adapter carries one to compare it with).
    """
    labels = [_label(adapter, i) for i, adapter in enumerate(adapters)]
    sides = [BaseIdentity.of_adapter(adapter, label) for adapter, label in zip(adapters, labels, strict=True)]
    content = None
    if any(side.content_digest for side in sides):
        content = model.content_digest  # reads the whole base: only when an adapter has one to compare with
    name = (model.config or {}).get("_name_or_path")
    base = BaseIdentity(
        label=str(model.path),
        name=name if isinstance(name, str) and name else None,
        structure_digest=model.structure_digest,
        content_digest=content,
        is_base=True,
    )
    _, doubts = reconcile([*sides, base], force=force, verb="merge")
    for label, adapter in zip(labels, adapters, strict=True):
        blocking = [name for name in delta_blockers(adapter.config) if name not in MERGEABLE_FIELDS]
        if blocking:
            raise UnsupportedAdapterError(
                f"{label} sets {blocking[0]!r}: its weight change is not scaling * B @ A, so it cannot be merged"
            )
        carried = [name for name in carried_features(adapter.config) if name not in MERGEABLE_FIELDS]
        if carried:
            raise UnsupportedAdapterError(
                f"{label} sets {carried[0]!r}, which brings weights beyond the LoRA factors; merge cannot apply it"
            )
    return doubts


class _Planner:
    """Turns the adapters, in order, into each base tensor's steps, checking each against the base as it goes.

    ``shapes`` follows the tensors as the steps so far leave them, so a later adapter's LoRA on a
    resized embedding is checked against the new shape.
    """

    def __init__(
        self, model: BaseModel, weights: Sequence[float], read: Callable[[str], torch.Tensor], labels: Sequence[str]
    ) -> None:
        self.model = model
        self.weights = weights
        self.read = read
        self.labels = labels
        self.tensors = model.tensors
        self.shapes: dict[str, tuple[int, ...]] = {name: tuple(shape) for name, (_, shape) in model.tensors.items()}
        self.targets: dict[str, list[Step]] = {}
        self.warnings: list[str] = []

    def add(self, key: str, step: Step) -> None:
        earlier = self.targets.get(key, [])
        if isinstance(step, Contribution) and step.magnitude is not None and earlier:
            replaced = [other for other in earlier if isinstance(other, Replacement)]
            if replaced:
                raise UnsupportedAdapterError(
                    f"{self.labels[step.adapter]} is a DoRA adapter on {key}, which {self.labels[replaced[0].adapter]} "
                    "replaces with its own copy: DoRA's norms are those of the base weight, which the copy discards"
                )
        if isinstance(step, Replacement) and earlier:
            other = self.labels[earlier[-1].adapter]
            raise UnsupportedAdapterError(
                f"{self.labels[step.adapter]} replaces {key} with its own {step.what}, which {other} also changes: "
                "the replacement would discard that change (merge them one at a time, or leave one out)"
            )
        self.targets.setdefault(key, []).append(step)

    def plan_adapter(self, i: int, adapter: Adapter) -> None:
        """Every step of adapter ``i``: its full copies first (PEFT loads them before it merges), then its modules."""
        label, weight = self.labels[i], self.weights[i]
        extras = classify_extras(sorted(adapter.extra_tensors), adapter.config, adapter.key_prefix or KEY_PREFIX)
        dora = bool(adapter.config.get("use_dora"))
        if weight != 1.0 and dora:
            raise UnsupportedAdapterError(
                f"{label} is a DoRA adapter (field 'use_dora'): it merges at weight 1 only, since "
                f"{WEIGHT_ONE_REASONS['dora']}; got weight {weight:g}"
            )
        replacing = [extra for extra in extras if extra.kind in REPLACING_KINDS]
        if weight != 1.0 and replacing:
            raise UnsupportedAdapterError(
                f"{label} carries {self._replaces_what(adapter, replacing[0])}: it merges at weight 1 only, since "
                f"{WEIGHT_ONE_REASONS['replace']}; got weight {weight:g}"
            )
        for extra in extras:
            value = adapter.extra_tensors[extra.key]
            if extra.kind == "other":
                bias = adapter.config.get("bias", "none")
                cause = f" (field 'bias' is {bias!r})" if bias not in (None, "none") else ""
                raise UnsupportedAdapterError(
                    f"{label} carries tensor {extra.key!r}, which is not a LoRA factor, nor anything its config "
                    f"explains{cause}; merge cannot apply it"
                )
            if extra.kind == "trainable_tokens":
                self._plan_tokens(i, adapter, extra, value)
            elif extra.kind in REPLACING_KINDS:
                self._plan_copy(i, adapter, extra, value)
        self._plan_modules(i, adapter)
        for extra in extras:
            value = adapter.extra_tensors[extra.key]
            if extra.kind == "lora_bias":
                self._plan_lora_bias(i, adapter, extra, value)
            elif extra.kind == "base_copy":
                self._check_base_copy(i, extra, value)
            elif extra.kind == "dora_magnitude":
                if extra.module not in adapter.modules:
                    raise UnsupportedAdapterError(
                        f"{label} carries DoRA magnitudes {extra.key!r} for {extra.module!r}, which has no LoRA factors"
                    )
                if not dora:
                    raise UnsupportedAdapterError(
                        f"{label} carries DoRA magnitudes ({extra.key!r}) but its config does not set 'use_dora'"
                    )

    @staticmethod
    def _replaces_what(adapter: Adapter, extra: Extra) -> str:
        if extra.kind == "trainable_tokens":
            return f"trainable tokens ({extra.key!r})"
        if extra.kind == "trained_bias":
            return f"trained biases (field 'bias' is {adapter.config['bias']!r}: {extra.key!r})"
        return f"its own copy of a base tensor ({extra.key!r}, modules_to_save)"

    def _plan_copy(self, i: int, adapter: Adapter, extra: Extra, value: torch.Tensor) -> None:
        """A full copy (modules_to_save, a trained bias) replacing a base tensor."""
        label, key = self.labels[i], extra.key
        path = key.removeprefix(adapter.key_prefix or KEY_PREFIX)
        module, _, param = path.rpartition(".")
        module = module.removesuffix(".base_layer")
        base_key = base_weight_key(module, self.tensors, param) if module else None
        if base_key is None:
            if self.model.tied is not None and module.rsplit(".", 1)[-1] in OUTPUT_EMBEDDINGS:
                raise UnsupportedAdapterError(
                    f"{label} carries its own {module} ({key!r}), but the base ties its output layer to its input "
                    f"embedding ({self.model.tied}, stored once): the copy would untie them, which merge cannot write"
                )
            bias = adapter.config.get("bias", "none")
            cause = f" (field 'bias' is {bias!r}: it trains the base's biases)" if bias not in (None, "none") else ""
            raise UnsupportedAdapterError(
                f"{label} carries tensor {key!r}{cause}, which matches no tensor of the base {self.model.path}; "
                "merge cannot apply it"
            )
        what = "trained bias" if extra.kind == "trained_bias" else "modules_to_save copy"
        self._check_floating(base_key)
        current = self.shapes[base_key]
        if tuple(value.shape) != current:
            if not (
                value.dim() == 2
                and len(current) == 2
                and value.shape[1] == current[1]
                and is_vocabulary_tensor(base_key, self.tensors)
            ):
                raise UnsupportedAdapterError(
                    f"{label} carries its own {list(value.shape)} copy of {base_key} (the base's is {list(current)}); "
                    "merge cannot apply it"
                )
            self.shapes[base_key] = tuple(value.shape)
        if base_key == self.model.tied:
            self.warnings.append(
                f"{label}'s own copy of {base_key} replaces the tensor the base shares between its input embedding "
                "and output layer: the merged model has it on both, as PEFT's saved merge does"
            )
        self._check_finite(i, key, value)
        self.add(base_key, Replacement(i, key, value, what))

    def _plan_tokens(self, i: int, adapter: Adapter, extra: Extra, value: torch.Tensor) -> None:
        """Trainable tokens: trained rows in place of the embedding's rows ``trainable_token_indices`` names."""
        label, key, module = self.labels[i], extra.key, extra.module
        base_key, _ = resolve_target(module, self.tensors, self.model.tied)
        if base_key is None:
            raise BaseModelError(f"{self.model.path}: has no weight for the trainable tokens of {module!r} of {label}")
        indices = adapter.config.get("trainable_token_indices")
        if isinstance(indices, dict):
            matching = [v for k, v in indices.items() if module == k or module.endswith("." + k)]
            indices = matching[0] if len(matching) == 1 else None
        if not isinstance(indices, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in indices):
            raise UnsupportedAdapterError(
                f"{label} carries trainable tokens for {module!r} but its 'trainable_token_indices' gives no list of "
                "token ids for it"
            )
        rows = self.shapes[base_key][0]
        if value.dim() != 2 or value.shape[0] != len(indices) or value.shape[1] != self.shapes[base_key][1]:
            raise UnsupportedAdapterError(
                f"{label} carries trainable tokens {list(value.shape)} for {module!r}, which do not fit "
                f"{len(indices)} token ids of {base_key} {list(self.shapes[base_key])}"
            )
        if len(set(indices)) != len(indices):
            raise UnsupportedAdapterError(f"{label} lists a token id twice in 'trainable_token_indices'")
        outside = [v for v in indices if not 0 <= v < rows]
        if outside:
            raise UnsupportedAdapterError(
                f"{label} trains token {outside[0]}, beyond the {rows} rows of {base_key} (was the vocabulary resized "
                "for training? merge into the resized base)"
            )
        self._check_floating(base_key)
        self._check_finite(i, key, value)
        self.add(base_key, RowReplacement(i, key, tuple(indices), value))

    def _plan_modules(self, i: int, adapter: Adapter) -> None:
        """Pair every LoRA module with the base tensor it changes (names and shapes only)."""
        label, weight = self.labels[i], self.weights[i]
        seen: dict[str, str] = {}
        ensure_tying = bool(adapter.config.get("ensure_weight_tying"))
        dora = bool(adapter.config.get("use_dora"))
        tied = self.model.tied
        # Direct targets first, so that with ensure_weight_tying the embedding's own module is the one kept.
        resolved = []
        for name, module in adapter.modules.items():
            key, via_tie = resolve_target(name, self.tensors, tied)
            if key is None:
                raise BaseModelError(
                    f"{self.model.path}: has no weight for module {name!r} of {label} "
                    "(is this the base the adapter was trained on?)"
                )
            resolved.append((via_tie, name, module, key))
        for _via_tie, name, module, key in sorted(resolved, key=lambda item: (item[0], item[1])):
            shape = self.shapes[key]
            if tuple(shape) != module.spec.base_shape:
                raise BaseModelError(
                    f"{self.model.path}: {key} is {list(shape)} but module {name!r} of {label} changes a "
                    f"{list(module.spec.base_shape)} weight"
                )
            self._check_floating(key)
            if key in seen:
                if ensure_tying and key == tied:
                    continue  # one delta shared by both sides of the tie: PEFT runs it once per side, unmerged
                raise BaseModelError(
                    f"modules {seen[key]!r} and {name!r} of {label} both change {key} in {self.model.path}"
                )
            seen[key] = name
            if key == tied and not ensure_tying:
                self.warnings.append(
                    f"module {name!r} of {label} changes {key}, which the base shares between its input "
                    "embedding and output layer: the merged model has the change on both (as PEFT's merge_and_unload "
                    "does), while the unmerged adapter changed only one"
                )
            factor = weight * module.spec.scaling
            if dora:
                magnitude_key = f"{adapter.key_prefix or KEY_PREFIX}{name}{_MAGNITUDE_SUFFIX}"
                magnitude = adapter.extra_tensors.get(magnitude_key)
                if magnitude is None:
                    raise UnsupportedAdapterError(
                        f"{label} sets 'use_dora' but carries no magnitude vector for module {name!r}"
                    )
                axis = dora_axis(module)
                length = shape[0] if axis == "rows" else shape[1]
                if magnitude.numel() != length:
                    raise UnsupportedAdapterError(
                        f"{label}: the DoRA magnitude vector of module {name!r} has {magnitude.numel()} entries, but "
                        f"{key} {list(shape)} has {length} {axis}"
                    )
                self._check_finite(i, magnitude_key, magnitude)
                self.add(key, Contribution(i, module, factor, magnitude))
            elif factor != 0.0:  # checked like the others, but a zero weight (or alpha) changes nothing
                self.add(key, Contribution(i, module, factor))

    def _plan_lora_bias(self, i: int, adapter: Adapter, extra: Extra, value: torch.Tensor) -> None:
        """PEFT's ``lora_bias``: ``scaling * lora_B.bias`` added to the base layer's bias."""
        label, key, name = self.labels[i], extra.key, extra.module
        module = adapter.modules.get(name)
        if module is None:
            raise UnsupportedAdapterError(
                f"{label} carries a LoRA bias {key!r} for {name!r}, which has no LoRA factors"
            )
        weight_key, _ = resolve_target(name, self.tensors, self.model.tied)
        bias_key = base_weight_key(name, self.tensors, "bias")
        if bias_key is None or weight_key is None or bias_key.rsplit(".", 1)[0] != weight_key.rsplit(".", 1)[0]:
            raise UnsupportedAdapterError(
                f"{label} sets 'lora_bias' but the base's {name} has no bias to add lora_B's bias to "
                "(PEFT cannot merge it either)"
            )
        if tuple(value.shape) != self.shapes[bias_key]:
            raise UnsupportedAdapterError(
                f"{label}: the LoRA bias {key!r} is {list(value.shape)} but {bias_key} is {list(self.shapes[bias_key])}"
            )
        self._check_floating(bias_key)
        self._check_finite(i, key, value)
        factor = self.weights[i] * module.spec.scaling
        if factor != 0.0:
            self.add(bias_key, BiasAddition(i, key, value, factor))

    def _check_base_copy(self, i: int, extra: Extra, value: torch.Tensor) -> None:
        """PEFT's saved copy of a targeted embedding's base weight: fine when it equals the base's.

        ``save_embedding_layers`` makes PEFT store a targeted embedding's base weight beside the factors
        (``...embed_tokens.base_layer.weight``); loading the adapter puts that copy into the model. When
        it equals the base's, ignoring it changes nothing; otherwise (a resized vocabulary) merging
        would have to replace the base weight under the LoRA, which is refused rather than guessed.
        """
        import torch

        label, key = self.labels[i], extra.key
        base_key, _ = resolve_target(extra.module, self.tensors, self.model.tied)
        if base_key is None:
            raise UnsupportedAdapterError(
                f"{label} carries tensor {key!r}, which matches no tensor of the base {self.model.path}; "
                "merge cannot apply it"
            )
        if tuple(value.shape) != tuple(self.tensors[base_key][1]):
            raise UnsupportedAdapterError(
                f"{label} carries its own {list(value.shape)} copy of {base_key} "
                f"(the base's is {list(self.tensors[base_key][1])}: a resized vocabulary?); merge cannot apply it"
            )
        base = self.read(base_key)
        if not (torch.equal(base.to(value.dtype), value) or torch.equal(value.to(base.dtype), base)):
            raise UnsupportedAdapterError(
                f"{label} carries its own copy of {base_key} that differs from the base's; merge cannot apply it"
            )

    def _check_floating(self, key: str) -> None:
        dtype = self.tensors[key][0]
        if dtype not in FLOAT_DTYPES:
            raise BaseModelError(
                f"{self.model.path}: {key} is stored as {dtype} (quantized?); merge changes floating weights only"
            )

    def _check_finite(self, i: int, key: str, value: torch.Tensor) -> None:
        if not all_finite(value):
            raise NonFiniteError(
                f"{self.labels[i]}: tensor {key!r} holds a non-finite value (NaN or infinity); adapterkit refuses "
                "to compute with it"
            )

    def vocabulary(self) -> dict[str, Any]:
        """config.json's new ``vocab_size``, if any; refuses a vocabulary resized on one side only.

        ``resize_token_embeddings`` gives the input embedding and an untied output layer new rows
        together; an adapter that carries only one of them leaves the other's new rows unknown.
        """
        resized = {key: shape for key, shape in self.shapes.items() if shape != tuple(self.tensors[key][1])}
        if not resized:
            return {}
        sides = [key for key in self.tensors if is_vocabulary_tensor(key, self.tensors)]
        rows = {key: self.shapes[key][0] for key in sides}
        if len(set(rows.values())) > 1:
            changed = next(key for key in sides if key in resized)
            other = next(key for key in sides if rows[key] != rows[changed])
            raise UnsupportedAdapterError(
                f"the adapters resize {changed} to {rows[changed]} rows but leave {other} at {rows[other]}: the new "
                f"rows of {other} were whatever resize_token_embeddings gave them in training, which the adapter does "
                "not carry (save both in modules_to_save)"
            )
        updates: dict[str, Any] = {}
        embedding = input_embedding(self.tensors)
        config = self.model.config or {}
        if embedding in resized and isinstance(config.get("vocab_size"), int):
            updates["vocab_size"] = resized[embedding][0]
        return updates


def _other_files(base_dir: Path, shards: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Files to copy beside the weights (config, tokenizer, ...) and the entries left out."""
    weights = {path.name for path in shards} | {INDEX_NAME}
    copy: list[Path] = []
    skipped: list[str] = []
    for entry in sorted(base_dir.iterdir()):
        if entry.name in weights:
            continue
        if entry.name.startswith(".") or not entry.is_file() or entry.name.lower().endswith(_WEIGHT_SUFFIXES):
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
            continue
        copy.append(entry)
    return copy, skipped


def build_plan(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None,
    base_dir: str | os.PathLike[str] | BaseModel,
    *,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
) -> MergePlan:
    """Check everything a merge needs and decide what it will do; reads headers only (plus embedding copies).

    Raises the same errors :func:`merge` raises before writing: a missing or corrupt shard, a base
    that does not fit (fingerprint, missing target, shape, quantized weight), unsupported adapters.
    ``base_dir`` may be a :class:`BaseModel` already opened; the folder is read once either way.
    """
    values = check_weights(adapters, weights, "merge")
    code = parse_dtype(dtype)
    model = open_base(base_dir)
    base = model.path
    # An unreadable config.json is copied as it is (only the tie default is lost), unless its dtype must change.
    config = model.require_config() if code is not None else model.config
    doubts = _check_adapters(adapters, model, force)
    labels = [_label(adapter, i) for i, adapter in enumerate(adapters)]
    check_finite_factors(adapters, labels)

    def read(name: str) -> torch.Tensor:
        path, header = model.shard_of(name)
        try:
            with path.open("rb") as fh:
                return _read_tensor(fh.fileno(), header, header.tensors[name], path)
        except (EOFError, OSError) as exc:
            raise BaseModelError(str(exc)) from None

    planner = _Planner(model, values, read, labels)
    for i, adapter in enumerate(adapters):
        planner.plan_adapter(i, adapter)
    targets = planner.targets
    config_updates = planner.vocabulary()
    if config_updates and config is None:
        config = model.require_config()
    # A tensor's additions run in float64 when it or its output is float64, else in float32: the tighter range decides.
    wide = bool(targets) and all("F64" in (model.tensors[key][0], code) for key in targets)
    check_weight_range(adapters, values, labels, torch_dtype("F64" if wide else "F32"))
    copy, skipped = _other_files(base, list(model.headers))
    return MergePlan(
        base_dir=base,
        weights=values,
        shards=model.headers,
        targets=targets,
        dtype=code,
        base_structure_digest=model.structure_digest,
        index=model.index,
        config=config,
        copy_files=copy,
        skipped_files=skipped,
        warnings=[*doubts, *planner.warnings],
        config_updates=config_updates,
    )


def _read_tensor(fd: int, header: Header, info: TensorInfo, path: Path) -> torch.Tensor:
    """One whole tensor of a shard (positional read; used only to compare an adapter's embedding copy)."""
    import torch

    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        pread_exact(fd, memoryview(buffer.numpy()), header.data_start + info.begin, f"{path}: tensor {info.name!r}")
    return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)
