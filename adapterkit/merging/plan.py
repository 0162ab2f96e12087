"""What a merge will do, decided and checked before a byte is written (no torch maths here).

:func:`build_plan` reads the base's safetensors headers, resolves every adapter module to the base
tensor it changes (the common ``transformers`` layouts, tied embeddings, ``fan_in_fan_out``),
and refuses, naming the module and the base, anything that cannot be merged: a fingerprint
mismatch, a target the base lacks, a shape or dtype that does not fit, an adapter whose change is
not ``s * B @ A``. :mod:`adapterkit.merging.streamed` then writes what the plan says.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.config import KEY_PREFIX, carried_features, delta_blockers
from adapterkit.adapter.dtypes import DTYPE_SIZES, FLOAT_DTYPES, parse_dtype, torch_dtype
from adapterkit.adapter.model import check_weights
from adapterkit.base_identity import BaseIdentity, reconcile
from adapterkit.base_model import INDEX_NAME, BaseModel, open_base, resolve_target
from adapterkit.errors import (
    BaseModelError,
    UnsupportedAdapterError,
)
from adapterkit.files.safetensors import Header, TensorInfo
from adapterkit.files.sequential import pread_exact
from adapterkit.weighting import check_finite_factors, check_weight_range

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import Adapter, LoraModule

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


@dataclass(frozen=True)
class Contribution:
    """One adapter module's share of one base tensor: ``factor * B @ A`` laid out like the tensor."""

    adapter: int
    module: LoraModule
    factor: float  # weight * scaling


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided and checked before anything is written."""

    base_dir: Path
    weights: list[float]
    #: shard file -> its validated header, in the order the shards are written.
    shards: dict[Path, Header]
    #: base tensor name -> the contributions added to it.
    targets: dict[str, list[Contribution]]
    #: output dtype code (``"BF16"``...) when floating tensors are converted, else None.
    dtype: str | None
    base_structure_digest: str
    index: dict[str, Any] | None
    #: The base's config.json (None when it has none, or when it is copied unread).
    config: dict[str, Any] | None
    copy_files: list[Path]
    skipped_files: list[str]
    warnings: list[str] = field(default_factory=list)

    def out_dtype(self, info: TensorInfo) -> str:
        """The dtype ``info``'s tensor has in the output."""
        return self.dtype if self.dtype is not None and info.dtype in FLOAT_DTYPES else info.dtype

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data the output shards hold."""
        return sum(
            info.numel * DTYPE_SIZES[self.out_dtype(info)]
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
        blocking = delta_blockers(adapter.config)
        if blocking:
            raise UnsupportedAdapterError(
                f"{label} sets {blocking[0]!r}: its weight change is not scaling * B @ A, so it cannot be merged"
            )
        carried = carried_features(adapter.config)
        if carried:
            raise UnsupportedAdapterError(
                f"{label} sets {carried[0]!r}, which brings weights beyond the LoRA factors; merge cannot apply it"
            )
    return doubts


def _build_targets(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    tensors: _Shapes,
    tied: str | None,
    base_dir: Path,
) -> tuple[dict[str, list[Contribution]], list[str]]:
    """Pair every adapter module with the base tensor it changes (pure: names and shapes only)."""
    targets: dict[str, list[Contribution]] = {}
    warnings: list[str] = []
    for i, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        seen: dict[str, str] = {}
        ensure_tying = bool(adapter.config.get("ensure_weight_tying"))
        # Direct targets first, so that with ensure_weight_tying the embedding's own module is the one kept.
        resolved = []
        for name, module in adapter.modules.items():
            key, via_tie = resolve_target(name, tensors, tied)
            if key is None:
                raise BaseModelError(
                    f"{base_dir}: has no weight for module {name!r} of {_label(adapter, i)} "
                    "(is this the base the adapter was trained on?)"
                )
            resolved.append((via_tie, name, module, key))
        for _via_tie, name, module, key in sorted(resolved, key=lambda item: (item[0], item[1])):
            dtype, shape = tensors[key]
            if tuple(shape) != module.spec.base_shape:
                raise BaseModelError(
                    f"{base_dir}: {key} is {list(shape)} but module {name!r} of {_label(adapter, i)} changes a "
                    f"{list(module.spec.base_shape)} weight"
                )
            if dtype not in FLOAT_DTYPES:
                raise BaseModelError(
                    f"{base_dir}: {key} is stored as {dtype} (quantized?); merge adds LoRA deltas to floating "
                    "weights only"
                )
            if key in seen:
                if ensure_tying and key == tied:
                    continue  # one delta shared by both sides of the tie: PEFT runs it once per side, unmerged
                raise BaseModelError(
                    f"modules {seen[key]!r} and {name!r} of {_label(adapter, i)} both change {key} in {base_dir}"
                )
            seen[key] = name
            if key == tied and not ensure_tying:
                warnings.append(
                    f"module {name!r} of {_label(adapter, i)} changes {key}, which the base shares between its input "
                    "embedding and output layer: the merged model has the change on both (as PEFT's merge_and_unload "
                    "does), while the unmerged adapter changed only one"
                )
            factor = weight * module.spec.scaling
            if factor != 0.0:  # checked like the others, but a zero weight (or alpha) changes nothing
                targets.setdefault(key, []).append(Contribution(i, module, factor))
    return targets, warnings


def _check_extra_tensors(
    adapters: Sequence[Adapter],
    tensors: _Shapes,
    tied: str | None,
    read: Callable[[str], torch.Tensor],
) -> None:
    """Accept only extra tensors merging can ignore: PEFT's saved copies of embedding layers equal to the base's.

    ``save_embedding_layers`` makes PEFT store a targeted embedding's base weight beside the factors
    (``...embed_tokens.base_layer.weight``); loading the adapter puts that copy into the model. When
    it equals the base's, ignoring it changes nothing; otherwise (a resized vocabulary) merging
    would have to replace the base weight, which is refused rather than guessed.
    """
    import torch

    for i, adapter in enumerate(adapters):
        for key, value in adapter.extra_tensors.items():
            path = key.removeprefix(adapter.key_prefix or KEY_PREFIX)
            base_key = None
            if path.endswith(".base_layer.weight"):
                base_key, _ = resolve_target(path.removesuffix(".base_layer.weight"), tensors, tied)
            if base_key is None:
                bias = adapter.config.get("bias", "none")
                cause = (
                    f" (field 'bias' is {bias!r}: it trains the base's biases)" if bias not in (None, "none") else ""
                )
                raise UnsupportedAdapterError(
                    f"{_label(adapter, i)} carries tensor {key!r}, which is not a LoRA factor{cause}; "
                    "merge cannot apply it"
                )
            if tuple(value.shape) != tuple(tensors[base_key][1]):
                raise UnsupportedAdapterError(
                    f"{_label(adapter, i)} carries its own {list(value.shape)} copy of {base_key} "
                    f"(the base's is {list(tensors[base_key][1])}: a resized vocabulary?); merge cannot apply it"
                )
            base = read(base_key)
            if not (torch.equal(base.to(value.dtype), value) or torch.equal(value.to(base.dtype), base)):
                raise UnsupportedAdapterError(
                    f"{_label(adapter, i)} carries its own copy of {base_key} that differs from the base's; "
                    "merge cannot apply it"
                )


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
    targets, warnings = _build_targets(adapters, values, model.tensors, model.tied, base)
    # A tensor's additions run in float64 when it or its output is float64, else in float32: the tighter range decides.
    wide = bool(targets) and all("F64" in (model.tensors[key][0], code) for key in targets)
    check_weight_range(adapters, values, labels, torch_dtype("F64" if wide else "F32"))

    def read(name: str) -> torch.Tensor:
        path, header = model.shard_of(name)
        try:
            with path.open("rb") as fh:
                return _read_tensor(fh.fileno(), header, header.tensors[name], path)
        except (EOFError, OSError) as exc:
            raise BaseModelError(str(exc)) from None

    _check_extra_tensors(adapters, model.tensors, model.tied, read)
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
        warnings=[*doubts, *warnings],
    )


def _read_tensor(fd: int, header: Header, info: TensorInfo, path: Path) -> torch.Tensor:
    """One whole tensor of a shard (positional read; used only to compare an adapter's embedding copy)."""
    import torch

    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        pread_exact(fd, memoryview(buffer.numpy()), header.data_start + info.begin, f"{path}: tensor {info.name!r}")
    return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)
