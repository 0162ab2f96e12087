"""What an adapter format is: one object that recognises, reads and writes adapters of one kind.

As a mergekit merge method owns everything about itself, a :class:`Format` owns its file layout:
how to tell a path is its own, how to read it for the store (described without loading tensors,
its weights streamed as canonical safetensors bytes so that adding hashes while it copies), how to
load it into memory, and how to write an adapter out with the options it declares. PEFT folders are
the built-in format, registered through ``register_formats`` like any third-party one.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapterkit.adapter.config import KEY_PREFIX
from adapterkit.errors import AdapterFormatError, UnsupportedAdapterError
from adapterkit.params import Param, check_params

if TYPE_CHECKING:
    from adapterkit.adapter.config import ModuleSpec
    from adapterkit.adapter.model import Adapter

__all__ = ["AdapterFiles", "ExportResult", "Format"]


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter as a format read it for the store: described, its weights not yet read.

    ``weights()`` yields the canonical safetensors bytes (tensors sorted by name, metadata
    ``{"format": "pt"}``) in chunks, ``weights_size`` bytes in all; the store hashes them as it
    writes them, so adding an adapter reads its weights once. ``config`` is the PEFT config that
    gives every module its scaling; ``files`` are small extra files kept beside it (a model card).
    """

    config: dict[str, Any]
    modules: list[ModuleSpec]
    extra_tensors: list[str]
    weights: Callable[[], Iterable[bytes]]
    weights_size: int
    safetensors_metadata: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    #: What messages name: the file the adapter was read from, and the file its weights came from.
    source: str = "adapter"
    weights_source: str = "adapter weights"
    #: What the tensor names start with before the module paths (``base_model.model.`` for PEFT).
    key_prefix: str = KEY_PREFIX

    @classmethod
    def from_adapter(
        cls, adapter: Adapter, *, source: str = "adapter", files: dict[str, bytes] | None = None
    ) -> AdapterFiles:
        """The files of an adapter already in memory (what a format that can only load tensors returns from ``read``).

        The config is resolved against the tensors first, so what is stored is exactly what PEFT
        will load: a config that would give a module another scaling than it has is refused.
        """
        import math

        from adapterkit.adapter.config import describe_modules, validate_lora_config
        from adapterkit.adapter.model import dtype_name, tensors_to_bytes

        tensors = adapter.state_dict()
        shapes = {key: (dtype_name(t, key), tuple(t.shape)) for key, t in tensors.items()}
        validate_lora_config(adapter.config, f"{source} config")
        modules, extras, _ = describe_modules(adapter.config, shapes, source)
        for spec in modules:
            own = adapter.modules[spec.name].spec.scaling
            if not math.isclose(spec.scaling, own, rel_tol=1e-12):
                raise AdapterFormatError(
                    f"{source} config gives module {spec.name!r} scaling {spec.scaling:g}, but the module has {own:g}"
                )
        weights = tensors_to_bytes(tensors)
        return cls(
            config=dict(adapter.config),
            modules=modules,
            extra_tensors=extras,
            weights=lambda: [weights],
            weights_size=len(weights),
            safetensors_metadata=dict((adapter.metadata or {}).get("safetensors_metadata") or {}),
            files=dict(files or {}),
            source=source,
            weights_source=source,
            key_prefix=adapter.key_prefix,
        )


@dataclass(frozen=True)
class ExportResult:
    """What a format wrote: the folder or file, and any report of its own (JSON-able)."""

    path: Path
    files: list[Path]
    details: dict[str, Any] = field(default_factory=dict)


class Format(ABC):
    """One adapter format. Subclass it, set ``name``, and override what the format supports.

    A format that cannot be read (an export-only target such as GGUF) leaves :meth:`read` and
    :meth:`load` alone, and one that cannot be written leaves :meth:`write` alone: the defaults
    refuse with a message naming the format. ``options`` declares the keyword options of
    :meth:`write` (their types, defaults and checks), as a strategy declares its parameters.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Param]] = {}

    def recognizes(self, path: Path) -> bool:
        """Whether ``path`` (a file or a folder) holds an adapter in this format; cheap, never raises."""
        return False

    def read(self, path: Path) -> AdapterFiles:
        """Describe the adapter at ``path`` for the store, streaming its weights later."""
        raise UnsupportedAdapterError(f"format {self.name!r} cannot be read, only written")

    def load(self, path: Path) -> Adapter:
        """Load the adapter at ``path`` into memory (tensors included)."""
        raise UnsupportedAdapterError(f"format {self.name!r} cannot be read, only written")

    def write(self, adapter: Adapter, dest: Path, **options: Any) -> ExportResult:
        """Write ``adapter`` at ``dest`` (a new folder or file, as the format lays it out)."""
        raise UnsupportedAdapterError(f"format {self.name!r} cannot be written")

    @property
    def can_read(self) -> bool:
        return type(self).read is not Format.read

    @property
    def can_write(self) -> bool:
        return type(self).write is not Format.write

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The full option set (defaults filled in), or ValueError naming the unknown or ill-typed one."""
        return check_params(f"format {self.name!r}", self.options, options)
