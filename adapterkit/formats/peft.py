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
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapterkit.adapter.config import ModuleSpec, describe_modules, load_config_json, validate_lora_config
from adapterkit.errors import AdapterFormatError
from adapterkit.files.safetensors import (
    Header,
    canonical_size,
    iter_canonical_bytes,
    read_header,
)
from adapterkit.formats.base import AdapterFiles, ExportResult, Format
from adapterkit.params import Param
from adapterkit.store.store import CONFIG_NAME, README_NAME, WEIGHTS_NAME

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import Adapter

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "README_NAME",
    "WEIGHTS_NAME",
    "AdapterFolder",
    "PeftFormat",
    "config_bytes",
    "load_bin",
    "open_folder",
    "read_adapter",
    "write_adapter",
]

BIN_NAME = "adapter_model.bin"
#: The largest ``max_lora_rank`` vLLM accepts: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``
#: in vLLM's ``vllm/config/lora.py``. vLLM refuses an adapter whose rank exceeds its ``max_lora_rank``.
VLLM_MAX_LORA_RANK = 512


def _pad_rank_check(value: int) -> str | None:
    if isinstance(value, bool) or value < 1:
        return f"must be a positive integer, got {value!r}"
    if value > VLLM_MAX_LORA_RANK:
        return (
            f"must be at most {VLLM_MAX_LORA_RANK}, the largest max_lora_rank vLLM accepts "
            f"(vllm/config/lora.py, MaxLoRARanks), got {value}"
        )
    return None


def config_bytes(config: Mapping[str, Any]) -> bytes:
    """The config exactly as PEFT's ``save_pretrained`` writes it (indent 2, sorted keys).

    PEFT turns sets (``LoraConfig.target_modules`` is one) into lists in iteration order, which changes
    from run to run; sorting them keeps the bytes, and so the digest, the same every time.
    """
    return json.dumps(config, indent=2, sort_keys=True, default=_sorted_set).encode("utf-8")


def _sorted_set(value: object) -> list[Any]:
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


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
    try:
        data = config_path.read_bytes()
    except OSError as exc:
        raise AdapterFormatError(f"{config_path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    config = load_config_json(data, str(config_path))
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


def _one_line(text: str, limit: int = 160) -> str:
    """The informative line of a library error, without terminal escapes, cut to ``limit`` characters."""
    # torch's weights_only refusal wraps the reason ("Unsupported operand 149", "Trying to load unsupported
    # GLOBAL posix.system ...") in boilerplate about its defaults and documentation; keep only the reason.
    marker = "WeightsUnpickler error:"
    reasons = [line.split(marker, 1)[1].strip() for line in text.splitlines() if marker in line]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    lines = [r for r in reasons if r] + [
        line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)
    ]
    chosen = lines[0] if lines else text.strip().split("\n", 1)[0]
    chosen = chosen.split(". This is an internal miniz error", 1)[0]  # torch's advice on zip errors runs long
    chosen = re.sub(r"\x1b\[[0-9;]*m", "", chosen)
    chosen = "".join(ch if ch.isprintable() else " " for ch in chosen)
    return chosen if len(chosen) <= limit else chosen[: limit - 3] + "..."


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a legacy ``.bin`` through ``torch.load(weights_only=True)``; never unpickles.

    ``weights_only=True`` makes torch use its restricted unpickler, which builds tensors and plain
    containers only and never imports or calls anything named in the file, so a hostile pickle cannot
    run code. Anything it refuses, or any other failure to parse these untrusted bytes, becomes one
    :class:`AdapterFormatError` naming the file: a corrupt file must never escape as a torch internal.
    """
    import torch

    try:
        with path.open("rb") as fh:
            magic = fh.read(2)
    except OSError as exc:
        raise AdapterFormatError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if not magic:
        raise AdapterFormatError(f"{path}: empty file")
    # torch.save writes a zip archive ("PK") or, in the legacy format, a pickle (protocol 2+: 0x80).
    if magic != b"PK" and magic[:1] != b"\x80":
        raise AdapterFormatError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
    if magic[:1] == b"\x80" and len(magic) > 1 and magic[1] > 2:
        # pickle.dump, or torch.save(..., pickle_protocol=3+): torch's restricted unpickler reads only the protocol-2
        # stream torch writes by default, and fails on such a file with a warning and "Unsupported operand 149".
        raise AdapterFormatError(
            f"{path}: is a pickle of protocol {magic[1]}, which torch's safe loader cannot read; adapterkit never "
            "unpickles, so it is refused for safety: where you trust the file, convert it with "
            "torch.load(it, weights_only=False) and safetensors' save_file(state_dict, 'adapter_model.safetensors')"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes about pickle protocols: the refusal below says it all
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AdapterFormatError(
            f"{path}: needs unpickling beyond plain tensors, refused for safety ({_one_line(str(exc))})"
        ) from None
    except Exception as exc:  # untrusted bytes: torch raises RuntimeError, EOFError, KeyError, ... on corruption
        detail = _one_line(str(exc)) or type(exc).__name__
        raise AdapterFormatError(f"{path}: not a readable torch file ({detail})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterFormatError(f"{path}: is not a mapping of names to tensors")
    return state


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Load a PEFT adapter folder into memory."""
    from safetensors.torch import load as load_safetensors

    from adapterkit.adapter.model import Adapter

    folder = open_folder(path)
    if folder.is_bin:
        tensors = load_bin(folder.weights_path)
    else:
        # read_header has checked the layout; the Rust reader may still refuse what it cannot map to torch
        # (a dtype this torch lacks), and the file may have changed since. Neither may escape as its own type.
        try:
            tensors = load_safetensors(folder.weights_path.read_bytes())
        except Exception as exc:
            detail = f"{type(exc).__name__}: {_one_line(str(exc))}".rstrip(": ")
            raise AdapterFormatError(f"{folder.weights_path}: safetensors could not load it ({detail})") from None
    return Adapter.from_state_dict(folder.config, tensors, str(folder.weights_path))


def write_adapter(adapter: Adapter, path: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` as a PEFT folder that ``PeftModel.from_pretrained`` loads unchanged."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_bytes(config_bytes(adapter.config))
    from adapterkit.adapter.model import tensors_to_bytes

    (folder / WEIGHTS_NAME).write_bytes(tensors_to_bytes(adapter.state_dict()))
    return folder


class PeftFormat(Format):
    """PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).

    Reading streams the weights as canonical safetensors bytes without torch (a ``.bin`` needs
    torch's restricted loader). This is also how the store lays an adapter out, so exporting a
    stored adapter as ``peft`` copies its files byte for byte (:meth:`adapterkit.Store.export`).
    """

    name = "peft"
    description = "PEFT adapter folder (adapter_config.json + adapter_model.safetensors); what PeftModel loads"
    #: The files of a PEFT folder, for plugins that move them (the Hub remote).
    CONFIG, WEIGHTS, BIN, README = CONFIG_NAME, WEIGHTS_NAME, BIN_NAME, README_NAME

    def recognizes(self, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG_NAME).is_file()

    def read(self, path: Path) -> AdapterFiles:
        folder = open_folder(path)
        if folder.is_bin:
            from adapterkit.adapter.model import dtype_name, tensors_to_bytes  # a .bin needs torch to read at all

            tensors = load_bin(folder.weights_path)
            shapes = {key: (dtype_name(t, key), tuple(t.shape)) for key, t in tensors.items()}
            weights = tensors_to_bytes(tensors)
            chunks: Callable[[], Iterable[bytes]] = partial(iter, [weights])
            size, st_metadata = len(weights), {}
        else:
            assert folder.header is not None
            header = folder.header
            shapes = {name: (t.dtype, t.shape) for name, t in header.tensors.items()}
            chunks = partial(iter_canonical_bytes, folder.weights_path, header)
            size = canonical_size(header)
            st_metadata = header.metadata
        modules, extras, prefix = folder.describe(shapes)
        try:
            readme = folder.readme.read_bytes() if folder.readme else None
        except OSError as exc:
            raise AdapterFormatError(f"{folder.readme}: cannot read ({exc.strerror or exc})") from None
        return AdapterFiles(
            config=folder.config,
            modules=modules,
            extra_tensors=extras,
            weights=chunks,
            weights_size=size,
            safetensors_metadata=st_metadata,
            files={README_NAME: readme} if readme is not None else {},
            source=str(folder.path / CONFIG_NAME),
            weights_source=str(folder.weights_path),
            key_prefix=prefix,
        )

    options: ClassVar[dict[str, Param]] = {
        "pad_rank": Param(
            int,
            None,
            "Zero-pad every module to this rank and fold the scalings into one r/lora_alpha "
            "(for PEFT hotswapping and vLLM; at most 512, vLLM's largest max_lora_rank).",
            _pad_rank_check,
        ),
    }

    def load(self, path: Path) -> Adapter:
        return read_adapter(path)

    def write(self, adapter: Adapter, dest: Path, **options: Any) -> ExportResult:
        """Write a PEFT folder (padded with ``pad_rank``), then re-read it and certify every module's delta."""
        from adapterkit.adapter.equivalence import compare_adapters
        from adapterkit.adapter.transforms import pad_rank
        from adapterkit.devices import single_threaded

        opts = self.check_options(options)
        with single_threaded():
            written = adapter if opts["pad_rank"] is None else pad_rank(adapter, opts["pad_rank"])
            folder = write_adapter(written, dest)
            certificate = compare_adapters(
                adapter, read_adapter(folder), "peft: re-read, scalings as PEFT resolves them"
            )
        details: dict[str, Any] = {"format": self.name, "certificate": certificate.to_json()}
        if opts["pad_rank"] is not None:
            details.update(pad_rank=opts["pad_rank"], r=written.config["r"], lora_alpha=written.config["lora_alpha"])
        return ExportResult(path=folder, files=[folder / CONFIG_NAME, folder / WEIGHTS_NAME], details=details)
