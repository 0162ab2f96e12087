"""A third-party plugin as a user would write one: a strategy, a format and a command, through the public API only.

Installed in tests through a real ``adapterkit`` entry point (see tests/test_plugins.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import click
import torch

import adapterkit
from adapterkit import AdapterFiles, ExportResult, Format, ModuleInput, ModuleResult, Param, Strategy, hookimpl


def normalized_linear(module: ModuleInput) -> ModuleResult:
    """The exact weighted sum with weights rescaled to sum to one (in absolute value)."""
    total = sum(abs(w) for w in module.weights) or 1.0
    A = torch.cat([(w / total) * A for (A, _), w in zip(module.factors, module.weights, strict=True)], dim=0)
    B = torch.cat([B for _, B in module.factors], dim=1)
    return ModuleResult(A=A, B=B)


class FlatFormat(Format):
    """One ``.lora.safetensors`` file: PEFT's tensors, with the PEFT config in the header's metadata."""

    name = "flat"
    description = "one .lora.safetensors file, config in its metadata"
    options: ClassVar[dict[str, Param]] = {"note": Param(str, None, "a note kept in the file's metadata")}

    def recognizes(self, path: Path) -> bool:
        return path.is_file() and path.name.endswith(".lora.safetensors")

    def load(self, path: Path) -> adapterkit.Adapter:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as fh:
            config = json.loads(fh.metadata()["peft_config"])
        return adapterkit.Adapter.from_state_dict(config, load_file(str(path)), str(path))

    def read(self, path: Path) -> AdapterFiles:
        return AdapterFiles.from_adapter(self.load(path), source=str(path))

    def write(self, adapter: adapterkit.Adapter, dest: Path, **options: Any) -> ExportResult:
        from safetensors.torch import save_file

        metadata = {"peft_config": json.dumps(adapter.config, sort_keys=True)}
        if options.get("note"):
            metadata["note"] = options["note"]
        tensors = {key: tensor.contiguous() for key, tensor in adapter.state_dict().items()}
        save_file(tensors, str(dest), metadata=metadata)
        return ExportResult(path=dest, files=[dest])


@hookimpl
def register_strategies(register: Any) -> None:
    register(Strategy(name="normalized_linear", function=normalized_linear, description="Weights sum to one."))


@hookimpl
def register_formats(register: Any) -> None:
    register(FlatFormat())


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command(name="normalized-hello")
    def hello() -> None:
        """Say hello from a plugin."""
        click.echo(f"hello from adapterkit-normalized on adapterkit {adapterkit.__version__}")
