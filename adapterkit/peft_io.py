"""Read and write PEFT adapter folders (``adapter_config.json`` + weights).

Reading a folder's description needs no torch: the config is JSON and a safetensors header is
JSON. Only loading tensors does, and a legacy ``adapter_model.bin`` is read solely through
``torch.load(weights_only=True)``: anything that would need real unpickling is refused.
Writing is canonical (tensors sorted by name, metadata ``{"format": "pt"}``, config dumped the
way PEFT dumps it), so the same adapter always gives the same bytes.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import AdapterFormatError
from adapterkit.lora_config import ModuleSpec, describe_modules, load_config_json, validate_lora_config
from adapterkit.safetensors_io import Header, read_header, serialize

if TYPE_CHECKING:
    import torch

    from adapterkit.lora import Adapter

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "README_NAME",
    "WEIGHTS_NAME",
    "AdapterFolder",
    "config_bytes",
    "load_bin",
    "open_folder",
    "read_adapter",
    "tensors_to_bytes",
    "write_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
README_NAME = "README.md"


def config_bytes(config: Mapping[str, Any]) -> bytes:
    """The config exactly as PEFT's ``save_pretrained`` writes it (indent 2, sorted keys)."""
    return json.dumps(config, indent=2, sort_keys=True).encode("utf-8")


@dataclass(frozen=True)
class AdapterFolder:
    """A PEFT adapter folder, checked and described without loading its tensors."""

    path: Path
    config: dict[str, Any]
    weights_path: Path
    #: The safetensors header; None for a ``.bin`` file, whose shapes need torch to read.
    header: Header | None
    readme: Path | None

    @property
    def is_bin(self) -> bool:
        return self.header is None

    def describe(
        self, shapes: Mapping[str, tuple[str, tuple[int, ...]]] | None = None
    ) -> tuple[list[ModuleSpec], list[str], str]:
        """Modules, carried keys and key prefix (``shapes`` is required for a ``.bin``)."""
        if shapes is None:
            if self.header is None:
                raise ValueError("a .bin folder needs its tensor shapes")
            shapes = {name: (t.dtype, t.shape) for name, t in self.header.tensors.items()}
        return describe_modules(self.config, shapes, str(self.weights_path))


def open_folder(path: str | os.PathLike[str]) -> AdapterFolder:
    """Check that ``path`` is a LoRA adapter folder adapterkit can represent."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder}: not a directory (expected a PEFT adapter folder)")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFormatError(f"{folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    config = load_config_json(config_path.read_bytes(), str(config_path))
    validate_lora_config(config, str(config_path))
    readme = folder / README_NAME
    safetensors_path = folder / WEIGHTS_NAME
    if safetensors_path.is_file():
        return AdapterFolder(folder, config, safetensors_path, read_header(safetensors_path), _file(readme))
    bin_path = folder / BIN_NAME
    if bin_path.is_file():
        return AdapterFolder(folder, config, bin_path, None, _file(readme))
    raise AdapterFormatError(f"{folder}: no {WEIGHTS_NAME} or {BIN_NAME}")


def _file(path: Path) -> Path | None:
    return path if path.is_file() else None


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a legacy ``.bin`` through ``torch.load(weights_only=True)``; never unpickles."""
    import torch

    if path.stat().st_size == 0:
        raise AdapterFormatError(f"{path}: empty file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling refused"
        raise AdapterFormatError(
            f"{path}: needs unpickling beyond plain tensors, refused for safety ({first[:160]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterFormatError(f"{path}: not a readable torch file ({first[:160]})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterFormatError(f"{path}: is not a mapping of names to tensors")
    return state


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes for ``tensors`` (tensors sorted by name, fixed metadata)."""
    import torch

    from adapterkit.lora import dtype_name

    raw: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for key, tensor in tensors.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        raw[key] = (dtype_name(tensor, key), tuple(tensor.shape), data)
    return serialize(raw)


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Load a PEFT adapter folder into memory."""
    from safetensors.torch import load as load_safetensors

    from adapterkit.lora import Adapter

    folder = open_folder(path)
    if folder.is_bin:
        tensors = load_bin(folder.weights_path)
    else:
        tensors = load_safetensors(folder.weights_path.read_bytes())
    return Adapter.from_state_dict(folder.config, tensors, str(folder.weights_path))


def write_adapter(adapter: Adapter, path: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` as a PEFT folder that ``PeftModel.from_pretrained`` loads unchanged."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_bytes(config_bytes(adapter.config))
    (folder / WEIGHTS_NAME).write_bytes(tensors_to_bytes(adapter.state_dict()))
    return folder
