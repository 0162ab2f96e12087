"""GGUF LoRA adapters for llama.cpp and Ollama (``ADAPTER``): an export-only format.

llama.cpp applies an adapter tensor pair as ``scale * B @ A`` with ``scale = alpha / rank`` when
the file's ``adapter.lora.alpha`` is non-zero (``rank`` read per tensor from ``lora_b``) and
``scale = 1`` (times the user's adapter scale) when it is zero. One alpha per file cannot give
every module of an adapter with rank or alpha patterns, rsLoRA or blend weights its own scaling,
which is how llama.cpp's own ``convert_lora_to_gguf.py`` loses them. adapterkit writes alpha 0 and
folds each module's true scaling into its ``B``, so what llama.cpp applies is the stored delta for
any mix of ranks and alphas.

What else a GGUF adapter needs comes from the base model's ``config.json`` (no network): the
architecture llama.cpp knows the model as, its tensor names (the ``gguf`` package's own map from
Hugging Face names), and the head counts of the row permutation llama.cpp's converter applies to
the q and k projections of Llama-family models (the adapter's ``B`` of those modules gets the same
permutation, or it loads and gives wrong outputs). Embedding LoRAs are written as llama.cpp reads
them (``token_embd.lora_a`` transposed). What a GGUF LoRA cannot hold (DoRA magnitudes, full
module copies, LoRA biases, trainable tokens, conv layers, an output layer tied to the embedding)
is refused, naming the modules.

After writing, the file is read back with the ``gguf`` reader and each module's delta, under
llama.cpp's scale rule, is compared with the stored one (the equivalence certificate).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapterkit.adapter.config import KEY_PREFIX, delta_blockers
from adapterkit.adapter.dtypes import all_finite
from adapterkit.adapter.extras import classify_extras
from adapterkit.base_model import BaseModel, open_base
from adapterkit.errors import ExportError
from adapterkit.formats.base import ExportResult, Format
from adapterkit.params import Param, one_of

if TYPE_CHECKING:
    import numpy as np
    import torch

    from adapterkit.adapter.equivalence import Certificate
    from adapterkit.adapter.model import Adapter, LoraModule

__all__ = ["ARCHITECTURES", "FILE_NAME", "GgufFormat", "GgufTarget", "plan_gguf"]

#: The file written inside the export folder (a destination ending in ``.gguf`` is the file itself).
FILE_NAME = "adapter.gguf"

#: Hugging Face architecture -> (llama.cpp architecture, whether q/k rows are permuted), as llama.cpp's
#: converter maps them (``conversion/llama.py``: LlamaModel with ``undo_permute``; ``conversion/qwen.py``).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}

_DTYPES = ("f32", "f16", "bf16")
#: What a refusal calls each kind of extra tensor (:mod:`adapterkit.adapter.extras`).
_EXTRA_LABELS = {
    "dora_magnitude": "DoRA magnitudes",
    "lora_bias": "LoRA biases (lora_bias)",
    "trainable_tokens": "trainable tokens",
    "trained_bias": "trained biases (bias)",
    "base_copy": "resized base layers (a vocabulary resized after training?)",
}
_COPIES = "full module copies (modules_to_save)"


@dataclass(frozen=True)
class GgufTarget:
    """One module as it goes into the GGUF file."""

    module: LoraModule
    base_key: str
    #: The base tensor's GGUF name (``blk.0.attn_q.weight``); the pair is ``NAME.lora_a`` / ``NAME.lora_b``.
    gguf_name: str
    #: Head count of llama.cpp's row permutation of this module's output rows, None when not permuted.
    heads: int | None = None

    @property
    def embedding(self) -> bool:
        return self.module.spec.kind == "embedding"


def _names(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def refuse_unholdable(adapter: Adapter, base: BaseModel) -> None:
    """ExportError naming what a GGUF LoRA cannot hold, module by module, when the adapter has any.

    PEFT saves an embedding LoRA's base layer beside it (``embed_tokens.base_layer.weight``) in case
    the vocabulary was resized; a copy shaped like the base's own tensor is the base's, which the
    GGUF base model already holds, so it is left out (as llama.cpp's converter leaves it out).
    """
    found: dict[str, list[str]] = {}
    for extra in classify_extras(sorted(adapter.extra_tensors), adapter.config, adapter.key_prefix or KEY_PREFIX):
        if extra.kind == "base_copy":
            target, _ = base.resolve(extra.module)
            if target is not None and tuple(adapter.extra_tensors[extra.key].shape) == base.tensors[target][1]:
                continue
        label = _EXTRA_LABELS.get(extra.kind, _COPIES)
        if extra.module not in found.setdefault(label, []):
            found[label].append(extra.module)
    config = adapter.config
    if config.get("use_dora") and "DoRA magnitudes" not in found:
        found["DoRA magnitudes"] = ["(use_dora)"]
    if config.get("modules_to_save") and _COPIES not in found:
        found[_COPIES] = [str(m) for m in config["modules_to_save"]]
    if config.get("trainable_token_indices") and "trainable tokens" not in found:
        found["trainable tokens"] = ["(trainable_token_indices)"]
    for field in delta_blockers(config):
        if field not in ("use_dora", "lora_bias"):
            found.setdefault(f"field {field!r} (its delta is not scaling * B @ A)", [])
    convs = [m.name for m in adapter.modules.values() if m.spec.kind.startswith("conv")]
    if convs:
        found["LoRAs of conv layers"] = convs
    if found:
        parts = [f"{label} ({_names(mods)})" if mods else label for label, mods in found.items()]
        raise ExportError(f"GGUF LoRA cannot hold {'; '.join(parts)}")


def architecture(base: BaseModel) -> tuple[str, bool, dict[str, Any]]:
    """``(llama.cpp architecture, permute q/k, config)`` for the base, from its config.json."""
    config = base.require_config()
    if config is None:
        raise ExportError(f"{base.path}: no config.json, which GGUF export reads the architecture from")
    archs = config.get("architectures") or []
    hf_arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if hf_arch not in ARCHITECTURES:
        raise ExportError(
            f"{base.path}: architecture {hf_arch!r} is not one adapterkit exports to GGUF "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    arch, permute = ARCHITECTURES[hf_arch]
    return arch, permute, config


def _int_field(config: dict[str, Any], name: str, base: BaseModel) -> int:
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExportError(f"{base.path}/config.json: field {name!r} must be a positive integer, got {value!r}")
    return value


def plan_gguf(adapter: Adapter, base: BaseModel) -> tuple[str, list[GgufTarget]]:
    """Check that ``adapter`` fits a GGUF LoRA for ``base`` and map each module to its GGUF tensor."""
    import gguf

    refuse_unholdable(adapter, base)
    arch, permute, config = architecture(base)
    blocks = _int_field(config, "num_hidden_layers", base)
    n_head = _int_field(config, "num_attention_heads", base)
    n_kv = _int_field(config, "num_key_value_heads", base) if "num_key_value_heads" in config else n_head
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, blocks)
    targets: list[GgufTarget] = []
    for module in adapter.modules.values():
        key, tied = base.resolve(module.name)
        if key is None:
            raise ExportError(f"{base.path}: has no weight for adapter module {module.name!r}")
        if tied:
            raise ExportError(
                f"module {module.name!r}: the base ties its output layer to the input embedding ({key}), "
                "and llama.cpp cannot apply a LoRA to a tied output layer"
            )
        shape = base.tensors[key][1]
        if shape != module.spec.base_shape:
            raise ExportError(
                f"{base.path}: {key} is {list(shape)} but adapter module {module.name!r} changes a "
                f"{list(module.spec.base_shape)} weight"
            )
        gguf_name = names.get_name(key, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ExportError(f"module {module.name!r}: llama.cpp's {arch} architecture has no tensor for {key}")
        heads = None
        if permute and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = n_head if gguf_name.endswith("attn_q.weight") else n_kv
            if module.spec.out_features % (2 * heads):
                raise ExportError(
                    f"module {module.name!r}: {module.spec.out_features} rows do not split into {heads} heads"
                )
        targets.append(GgufTarget(module, key, gguf_name, heads))
    return arch, targets


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's q/k row order: each head's two rotary halves interleaved."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows`."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _tensors(target: GgufTarget, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pair of one module in GGUF's layout, scaling folded into B."""
    from adapterkit.adapter.transforms import fold_into_b

    module = target.module
    a = module.A.reshape(module.A.shape[0], -1)
    b = fold_into_b(module, module.spec.scaling, dtype).reshape(module.B.shape[0], -1)
    if target.heads is not None:
        b = permute_rows(b, target.heads)
    if target.embedding:
        a = a.T  # llama.cpp gathers rows of token_embd.lora_a by token id: (vocab, r)
    a = a.to(dtype)
    if not all_finite(a):
        raise ExportError(
            f"module {module.name!r}: its factor A does not fit {str(dtype)[6:]}; export with --dtype f32"
        )
    yield f"{target.gguf_name}.lora_a", a.contiguous()
    yield f"{target.gguf_name}.lora_b", b.contiguous()


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def _output_paths(dest: Path) -> tuple[Path, Path | None]:
    """``(file, folder to create or None)`` for an export destination."""
    if dest.suffix == ".gguf":
        if dest.exists():
            raise ExportError(f"{dest}: already exists")
        return dest, None
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest}: already exists and is not an empty directory")
    return dest / FILE_NAME, dest


class GgufFormat(Format):
    """GGUF LoRA adapters that llama.cpp (``--lora``, ``llama_adapter_lora_init``) and Ollama (``ADAPTER``) load."""

    name: ClassVar[str] = "gguf"
    description: ClassVar[str] = "GGUF LoRA for llama.cpp and Ollama (export only; needs the base's config.json)"
    options: ClassVar[dict[str, Param]] = {
        "base": Param(
            (str, os.PathLike),
            None,
            "The base model folder (its config.json and safetensors headers are read).",
        ),
        "dtype": Param(str, "f32", "Tensor type of the factors: f32, f16 or bf16.", one_of(*_DTYPES)),
    }

    def recognizes(self, path: Path) -> bool:
        return False

    def write(self, adapter: Adapter, dest: Path, **options: Any) -> ExportResult:
        """Write ``adapter`` as ``dest/adapter.gguf`` (or as ``dest`` itself when it ends in ``.gguf``)."""
        import torch

        from adapterkit.devices import single_threaded

        opts = self.check_options(options)
        if opts["base"] is None:
            raise ExportError(
                "GGUF export needs the base model folder (--base BASE_DIR): llama.cpp names tensors by it"
            )
        try:
            import gguf
        except ImportError:
            raise ExportError("GGUF export needs the gguf package: pip install 'adapterkit[gguf]'") from None
        base = open_base(opts["base"])
        arch, targets = plan_gguf(adapter, base)
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[opts["dtype"]]
        raw = {"f32": None, "f16": None, "bf16": gguf.GGMLQuantizationType.BF16}[opts["dtype"]]
        file_type = {"f32": 0, "f16": 1, "bf16": 32}[opts["dtype"]]
        out, folder = _output_paths(Path(dest))
        made_folder = folder is not None and not folder.exists()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.adapterkit-{uuid.uuid4().hex[:8]}"
        with single_threaded():
            try:
                self._write_file(tmp, adapter, base, arch, targets, dtype, raw, file_type)
                os.replace(tmp, out)
            except BaseException:
                tmp.unlink(missing_ok=True)
                if made_folder and folder is not None:
                    folder.rmdir()
                raise
            certificate = read_back(out, targets)
        return ExportResult(
            path=folder if folder is not None else out,
            files=[out],
            details={
                "format": self.name,
                "architecture": arch,
                "dtype": opts["dtype"],
                "alpha": 0.0,
                "tensors": 2 * len(targets),
                "certificate": certificate.to_json(),
            },
        )

    @staticmethod
    def _write_file(
        path: Path,
        adapter: Adapter,
        base: BaseModel,
        arch: str,
        targets: list[GgufTarget],
        dtype: torch.dtype,
        raw: Any,
        file_type: int,
    ) -> None:
        """Header and tensor infos first, then each module's tensors computed and written one at a time."""
        import gguf
        import numpy as np

        writer = gguf.GGUFWriter(path=None, arch=arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        base_name = _base_name(adapter, base)
        if base_name:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, base_name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if adapter.digest:
            writer.add_string("adapterkit.digest", adapter.digest)
        item = np.dtype(np.int16) if raw is not None else np.dtype({4: np.float32, 2: np.float16}[dtype.itemsize])
        for target in targets:
            m = target.module
            r, n_in, n_out = m.spec.r, m.spec.in_features, m.spec.out_features
            a_shape = (n_in, r) if target.embedding else (r, m.A[0].numel())
            for name, shape in ((f"{target.gguf_name}.lora_a", a_shape), (f"{target.gguf_name}.lora_b", (n_out, r))):
                writer.add_tensor_info(name, shape, item, item.itemsize * shape[0] * shape[1], raw_dtype=raw)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        try:
            for target in targets:
                for _, tensor in _tensors(target, dtype):
                    writer.write_tensor_data(_numpy(tensor))
            assert writer.fout is not None
            for fh in writer.fout:
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            writer.close()


def _base_name(adapter: Adapter, base: BaseModel) -> str | None:
    recorded = (adapter.metadata or {}).get("base_model") or {}
    for value in (
        recorded.get("name"),
        adapter.config.get("base_model_name_or_path"),
        (base.config or {}).get("_name_or_path"),
    ):
        if isinstance(value, str) and value:
            return value
    return None


def _read_tensor(tensor: Any, fh: Any) -> torch.Tensor:
    """One tensor of the file, read with a plain read (not through the reader's memory map, whose pages
    would stay resident: reading a file back would then cost its size in memory)."""
    import gguf
    import numpy as np
    import torch

    kinds = {
        gguf.GGMLQuantizationType.F32: (np.float32, None),
        gguf.GGMLQuantizationType.F16: (np.float16, None),
        gguf.GGMLQuantizationType.BF16: (np.int16, torch.bfloat16),
    }
    item, view = kinds[tensor.tensor_type]
    fh.seek(tensor.data_offset)
    data = np.frombuffer(bytearray(fh.read(tensor.n_bytes)), dtype=item)
    out = torch.from_numpy(data.reshape(tuple(int(d) for d in reversed(tensor.shape.tolist()))))
    return out.view(view) if view is not None else out


def read_back(path: Path, targets: list[GgufTarget]) -> Certificate:
    """Re-read ``path`` and compare each module's delta, as llama.cpp applies it, with the stored delta.

    llama.cpp's scale: ``alpha / rank`` (float32, rank from ``lora_b``) when the file's alpha is
    non-zero, else 1; the q/k permutation is undone before comparing, and a pair missing from the
    file counts as a relative difference of 1 (nothing applied).
    """
    import gguf

    from adapterkit.adapter.equivalence import Certificate

    reader = gguf.GGUFReader(path)
    field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(field.parts[field.data[0]][0]) if field is not None else 0.0
    tensors = {t.name: t for t in reader.tensors}
    certificate = Certificate(method="gguf: re-read with the gguf reader, llama.cpp's scale rule")
    with path.open("rb") as fh:
        for target in targets:
            _certify(certificate, target, tensors, alpha, fh)
    del reader
    return certificate


def _certify(certificate: Certificate, target: GgufTarget, tensors: dict[str, Any], alpha: float, fh: Any) -> None:
    """One module's line of the certificate."""
    import numpy as np

    from adapterkit.adapter.equivalence import Factors

    module = target.module
    stored = Factors(module.A, module.B, module.spec.scaling)
    pair = tensors.get(f"{target.gguf_name}.lora_a"), tensors.get(f"{target.gguf_name}.lora_b")
    if pair[0] is None or pair[1] is None:
        certificate.modules[module.name] = 1.0
        return
    a, b = _read_tensor(pair[0], fh), _read_tensor(pair[1], fh)
    if target.embedding:
        a = a.T
    if target.heads is not None:
        b = unpermute_rows(b, target.heads)
    rank = b.shape[1]
    scale = float(np.float32(alpha) / np.float32(rank)) if alpha else 1.0
    certificate.add(module.name, stored, Factors(a, b, scale))
