"""The adapter in memory: LoRA factors per module, with the scaling PEFT would give them.

Pure tensor maths, no files. A module's weight change is ``scaling * B @ A`` laid out like the
base weight it changes (transposed for embeddings and GPT-2 style ``fan_in_fan_out`` layers,
reshaped for convolutions). What a LoRA cannot express (DoRA magnitudes, ``modules_to_save``
copies, trainable tokens) rides along in :attr:`Adapter.extra_tensors`, untouched.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterkit.adapter.config import (
    KEY_PREFIX,
    MERGEABLE_FIELDS,
    ModuleSpec,
    carried_features,
    delta_blockers,
    describe_modules,
    validate_lora_config,
)
from adapterkit.adapter.dtypes import code_of
from adapterkit.adapter.extras import DORA_NOT_A_DELTA
from adapterkit.errors import AdapterFormatError, CompositionError, UnsupportedAdapterError
from adapterkit.files.safetensors import parse_header, serialize

__all__ = ["Adapter", "LoraModule", "check_weights", "dtype_name", "tensors_from_buffer", "tensors_to_bytes"]


def dtype_name(tensor: torch.Tensor, key: str) -> str:
    """The safetensors code of ``tensor``'s dtype; ``key`` names it in the error."""
    return code_of(tensor.dtype, key)


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes for ``tensors`` (tensors sorted by name, fixed metadata)."""
    raw: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for key, tensor in tensors.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        raw[key] = (dtype_name(tensor, key), tuple(tensor.shape), data)
    return serialize(raw)


def tensors_from_buffer(buffer: bytearray, source: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors bytes in ``buffer``, sharing its memory (no copy).

    ``safetensors.torch.load`` copies every tensor out of the bytes it is given, so loading an
    adapter would hold its weights twice at the peak; views of one buffer hold them once. A tensor
    whose data is not aligned to its element size (only a hand-made file has one) is copied.
    """
    from adapterkit.adapter.dtypes import torch_dtype

    if len(buffer) < 8:
        raise AdapterFormatError(f"{source}: not a safetensors file ({len(buffer)} bytes, too short)")
    (length,) = struct.unpack_from("<Q", buffer)
    if 8 + length > len(buffer):
        raise AdapterFormatError(f"{source}: safetensors header claims {length} bytes but the file holds {len(buffer)}")
    header = parse_header(bytes(buffer[8 : 8 + length]), data_size=len(buffer) - 8 - length, source=source)
    start = 8 + length
    out: dict[str, torch.Tensor] = {}
    for name, info in header.tensors.items():
        try:
            dtype = torch_dtype(info.dtype)
        except KeyError:
            raise AdapterFormatError(
                f"{source}: safetensors could not load it (tensor {name!r} has dtype {info.dtype}, which this torch "
                "lacks)"
            ) from None
        offset = start + info.begin
        if info.numel == 0:
            out[name] = torch.empty(info.shape, dtype=dtype)
        elif offset % dtype.itemsize:
            raw = torch.frombuffer(buffer, dtype=torch.uint8, count=info.nbytes, offset=offset)
            out[name] = raw.clone().view(dtype).reshape(info.shape)
        else:
            out[name] = torch.frombuffer(buffer, dtype=dtype, count=info.numel, offset=offset).reshape(info.shape)
    return out


@dataclass
class LoraModule:
    """One module's factors: A is (r, in, *kernel), B is (out, r, *ones)."""

    spec: ModuleSpec
    A: torch.Tensor
    B: torch.Tensor

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def scaling(self) -> float:
        return self.spec.scaling

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scaling * B @ A`` in ``dtype``, shaped like the base weight."""
        a = self.A.to(dtype).flatten(1)
        b = self.B.to(dtype).flatten(1)
        product = (b @ a) * self.spec.scaling
        if self.spec.kind == "embedding" or self.spec.fan_in_fan_out:
            return product.T
        return product.reshape(self.spec.base_shape)


@dataclass
class Adapter:
    """A LoRA adapter: its PEFT config, its modules and whatever else its weights file held."""

    config: dict[str, Any]
    modules: dict[str, LoraModule]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    key_prefix: str = KEY_PREFIX
    #: adapterkit's metadata document when the adapter came from a store (base, lineage, ...).
    metadata: dict[str, Any] | None = None
    digest: str | None = None

    @classmethod
    def from_state_dict(
        cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str = "adapter"
    ) -> Adapter:
        """Build an adapter from a PEFT config and the tensors of its weights file."""
        validate_lora_config(config, source)
        shapes = {key: (dtype_name(t, key), tuple(t.shape)) for key, t in tensors.items()}
        specs, extras, prefix = describe_modules(config, shapes, source)
        modules = {
            spec.name: LoraModule(spec, tensors[spec.a_key(prefix)], tensors[spec.b_key(prefix)]) for spec in specs
        }
        return cls(
            config=dict(config),
            modules=modules,
            extra_tensors={key: tensors[key] for key in extras},
            key_prefix=prefix,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor under the key PEFT saves it as."""
        out = dict(self.extra_tensors)
        for module in self.modules.values():
            out[module.spec.a_key(self.key_prefix)] = module.A
            out[module.spec.b_key(self.key_prefix)] = module.B
        return out

    @property
    def carried(self) -> list[str]:
        """Config fields this adapter sets that adapterkit carries through without interpreting."""
        return carried_features(self.config)

    @property
    def num_parameters(self) -> int:
        """Parameters in the LoRA factors (extra tensors not counted)."""
        return sum(module.spec.num_parameters for module in self.modules.values())

    @property
    def factor_bytes(self) -> int:
        """Bytes the LoRA factors take in memory (extra tensors not counted)."""
        return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values())

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The change module ``name`` makes to its base weight, shaped like that weight."""
        blocking = delta_blockers(self.config)
        if blocking:
            value = repr(self.config[blocking[0]])
            value = value if len(value) <= 40 else value[:37] + "..."
            # The digest the store gave it, cut as merging and inspection cut it; hashing the weights to name
            # an adapter read from a folder would cost more than the refusal is worth.
            which = f"adapter {self.digest[:19]}" if self.digest else "this adapter"
            if blocking[0] == "use_dora":
                after = DORA_NOT_A_DELTA
            elif blocking[0] in MERGEABLE_FIELDS:
                after = "it can be stored, exported, attached and merged, but not composed"
            else:
                after = "it can be stored and exported, but not composed or merged"
            raise UnsupportedAdapterError(
                f"the weight change of {which} is not scaling * B @ A (field {blocking[0]!r} is {value}); {after}"
            )
        try:
            module = self.modules[name]
        except KeyError:
            raise KeyError(f"adapter has no LoRA module {name!r}") from None
        return module.delta(dtype)


def check_weights(adapters: Sequence[Adapter], weights: Sequence[float] | None, what: str) -> list[float]:
    """One finite weight per adapter (1.0 each by default); ``what`` names the operation in the message."""
    if not adapters:
        raise CompositionError(f"{what} needs at least one adapter")
    values = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(values) != len(adapters):
        raise CompositionError(f"got {len(values)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in values):
        raise CompositionError("weights must be finite numbers")
    return values
