"""The one dtype table: safetensors codes, their sizes, torch dtypes, config names and the names users type.

Everything that reads or writes tensors (the safetensors reader, the merge, the formats) speaks
safetensors codes (``"BF16"``); torch dtypes are looked up here only where tensors exist, so
this module itself never imports torch at import time.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from adapterkit.errors import AdapterFormatError, InvalidInputError
from adapterkit.files.safetensors import DTYPE_SIZES

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG_DTYPE_NAMES",
    "DTYPE_SIZES",
    "FLOAT_DTYPES",
    "all_finite",
    "code_of",
    "parse_dtype",
    "torch_dtype",
    "torch_dtypes",
]

#: Floating dtypes a LoRA delta can be added to (and ``dtype=`` may convert between).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: The names transformers writes into config.json's ``torch_dtype`` / ``dtype``.
CONFIG_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_ALIASES = {
    "float32": "F32",
    "fp32": "F32",
    "f32": "F32",
    "float": "F32",
    "float16": "F16",
    "fp16": "F16",
    "f16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
    "fp64": "F64",
    "f64": "F64",
    "double": "F64",
}


@functools.cache
def torch_dtypes() -> dict[torch.dtype, str]:
    """safetensors codes of the torch dtypes adapters use (imports torch on first call)."""
    import torch

    table: dict[torch.dtype, str] = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
    }
    # Unsigned wide integers arrived in torch 2.3; safetensors.torch loads U16/U32/U64 into them.
    for name, code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
        if isinstance(getattr(torch, name, None), torch.dtype):
            table[getattr(torch, name)] = code
    return table


def code_of(dtype: torch.dtype, what: str) -> str:
    """The safetensors code of ``dtype``; ``what`` names the tensor in the error when there is none."""
    try:
        return torch_dtypes()[dtype]
    except KeyError:
        raise AdapterFormatError(f"tensor {what!r} has dtype {dtype}, which safetensors cannot hold") from None


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of the safetensors code ``code``."""
    return {value: key for key, value in torch_dtypes().items()}[code]


def parse_dtype(dtype: str | torch.dtype | None) -> str | None:
    """The code for a float dtype a user names (``"bf16"``, ``torch.bfloat16``...); None keeps the base's."""
    if dtype is None:
        return None
    text = str(dtype).removeprefix("torch.")
    if text.lower() == "auto":
        return None
    if text.upper() in FLOAT_DTYPES:
        return text.upper()
    code = _ALIASES.get(text.lower())
    if code is None:
        raise InvalidInputError(
            f"dtype {text!r} is not one a merged model can be written in; use float32, float16 or bfloat16"
        )
    return code


def all_finite(values: torch.Tensor) -> bool:
    """Whether every value of ``values`` is finite (no NaN, no infinity).

    NaN and infinity propagate through a sum, so a finite sum proves every value finite; on CPU
    the sum costs a twentieth of ``isfinite(values).all()`` (which builds a boolean tensor: 2 ms
    per 512K values, a third of a 2 GB merge's time). Only a sum that overflows (huge but finite
    values) is checked value by value.
    """
    if not values.is_floating_point() or values.numel() == 0:
        return True
    return bool(values.sum().isfinite()) or bool(values.isfinite().all())
