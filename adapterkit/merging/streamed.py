"""``merge``: bake LoRA adapters into a base model's weights, streamed tensor by tensor.

PEFT's ``merge_and_unload`` needs the whole model instantiated, so merging a 70B adapter needs
the RAM of a 70B model. A LoRA only changes the weights it targets, and each change depends on
nothing but that one weight and the adapter's factors, so a merge never builds a model: it
reads the base's safetensors headers and checks every target before writing a byte
(:mod:`adapterkit.merging.plan`), then walks each shard in its own order
(:mod:`adapterkit.merging.shard_writer`). A tensor no adapter touches is copied byte for byte, kernel to kernel,
without being decoded; a targeted tensor is streamed through in blocks of whole rows, each
widened to float32 (float64 for a float64 base), given its rows of ``sum_i w_i s_i B_i A_i`` in
place (``addmm_``: no dense delta is ever formed) and rounded back, while a writer thread copies the
previous blocks out. Peak memory is therefore the adapters plus a few megabytes of blocks, whatever
the model's size. The output keeps the base's tensor-to-shard layout and index, so tools that read
the base read the result the same way.

The output folder is built next to ``out_dir`` under a hidden temporary name and renamed into
place only when complete: a merge that fails or is interrupted leaves nothing at ``out_dir``.

Beyond LoRA factors, a merge applies what PEFT's ``merge_and_unload`` applies (see
:mod:`adapterkit.merging.steps`): DoRA modules (each row or column rescaled to the norm its
magnitude vector gives, the norms taken on the base plus that module's own change, as PEFT's
multi-adapter merge and forward take them), ``lora_bias`` vectors, ``modules_to_save`` copies
(an embedding and output layer resized for added tokens included: config.json's ``vocab_size``
follows), trained biases and trainable tokens. Adapters are applied in the order given. Those
that replace values or set norms outright merge at weight 1 only.

Semantics follow PEFT's ``merge_and_unload`` on the same inputs, with two deliberate notes:

* The sum is formed in float32 and rounded once into the base's dtype, where PEFT rounds each
  adapter's delta to a half-precision base's dtype and then adds in that dtype. The two agree to
  within one rounding of the base dtype; this one is the more exact.
* Tied embeddings (the output layer shares the input embedding, so only one tensor is stored):
  a module on either side changes that one tensor, as PEFT's merge does, and the report says so,
  because without ``ensure_weight_tying`` the unmerged adapter changed only one side. With
  ``ensure_weight_tying`` PEFT keeps one delta for both sides but merges it twice (once per side);
  here it is added once, which matches the adapter as PEFT runs it unmerged.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.dtypes import CONFIG_DTYPE_NAMES
from adapterkit.base_model import INDEX_NAME, fingerprint
from adapterkit.devices import resolve_device
from adapterkit.errors import InvalidInputError, MergeError
from adapterkit.files.fsutil import fsync_dir, fsync_file
from adapterkit.merging.plan import CONFIG_NAME, MergePlan, build_plan
from adapterkit.merging.shard_writer import MergeProgress, write_shards

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import Adapter

__all__ = [
    "MergeError",
    "MergePlan",
    "MergeProgress",
    "MergeReport",
    "merge",
]


@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote."""

    out_dir: Path
    base_dir: Path
    #: digests of the merged adapters (None for one never stored), in order.
    adapters: list[str | None]
    weights: list[float]
    #: the output dtype code (``"BF16"``...) when one was asked for, else None (each tensor keeps its own).
    dtype: str | None
    device: str
    shards: int
    tensors: int
    #: base tensors that received a delta, sorted.
    merged_tensors: list[str]
    bytes_written: int
    copied_files: list[str]
    #: files in the base folder not copied (other weight formats, subfolders, hidden files).
    skipped_files: list[str]
    base_structure_digest: str
    structure_digest: str
    warnings: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "base_dir": str(self.base_dir),
            "adapters": [{"digest": d, "weight": w} for d, w in zip(self.adapters, self.weights, strict=True)],
            "dtype": self.dtype,
            "device": self.device,
            "shards": self.shards,
            "tensors": self.tensors,
            "merged_tensors": self.merged_tensors,
            "bytes_written": self.bytes_written,
            "copied_files": self.copied_files,
            "skipped_files": self.skipped_files,
            "base_structure_digest": self.base_structure_digest,
            "structure_digest": self.structure_digest,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


def _write_index(plan: MergePlan, tmp: Path) -> None:
    assert plan.index is not None
    index = dict(plan.index)
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = plan.total_bytes
    index["metadata"] = metadata
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_files(plan: MergePlan, tmp: Path) -> list[str]:
    """Copy config, tokenizer and the like; config.json gets the new dtype and vocabulary size when they change."""
    copied = []
    for path in plan.copy_files:
        target = tmp / path.name
        if path.name == CONFIG_NAME and (plan.dtype is not None or plan.config_updates):
            config = dict(plan.config or {})
            if plan.dtype is not None:
                name = CONFIG_DTYPE_NAMES[plan.dtype]
                keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["dtype"]
                for key in keys:
                    config[key] = name
            config.update(plan.config_updates)
            target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(path, target)
        copied.append(path.name)
    return copied


def merge(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None,
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    force: bool = False,
    progress: MergeProgress | None = None,
) -> MergeReport:
    """Write the base model in ``base_dir`` with ``adapters`` (weighted by ``weights``) baked in, to ``out_dir``.

    ``weights`` (None: 1.0 each; negative allowed) scale each adapter's delta. ``dtype`` converts
    every floating tensor of the output (and config.json's dtype); ``device`` runs the additions
    there (CPU by default). Everything is checked before anything is written; the output appears
    at ``out_dir`` only once complete. ``force`` merges adapters whose recorded base fingerprint
    differs from this base's. ``progress(bytes_done, bytes_total, tensor_name)`` is called, in the
    caller's thread, as each tensor is handed to the writer (counting output tensor bytes; the
    writer is at most a few blocks behind).

    While it runs, torch's CPU thread count is set to 1 (and restored): the maths goes in small
    blocks, which a thread pool slows down, and a writer thread uses the second core.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        raise InvalidInputError(f"{out}: already exists; merge writes a new folder")
    if not out.parent.is_dir():
        # Creating the parents would hide a typo in the path (a whole new tree under the wrong name).
        raise InvalidInputError(f"{out}: the folder it goes in, {out.parent}, does not exist; create it first")
    chosen = resolve_device(device)
    plan = build_plan(adapters, weights, base_dir, dtype=dtype, force=force)
    tmp = out.parent / f".{out.name}.merging-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise InvalidInputError(f"{out}: cannot create it ({exc.strerror or type(exc).__name__})") from None
    try:
        written = write_shards(plan, tmp, chosen, progress)
        if plan.index is not None:
            _write_index(plan, tmp)
        copied = _copy_files(plan, tmp)
        for name in [INDEX_NAME] * (plan.index is not None) + copied:
            fsync_file(tmp / name)  # the shards were synced as they were closed
        fsync_dir(tmp)
        if out.exists() or out.is_symlink():
            raise InvalidInputError(f"{out}: appeared while merging; the merge was not published")
        os.rename(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, EOFError):  # a base shard shrank or was replaced while it was read
            raise MergeError(str(exc)) from None
        if isinstance(exc, OSError):
            raise MergeError(f"{out}: writing the merged model failed ({exc.strerror or exc})") from None
        raise
    fsync_dir(out.parent)
    return MergeReport(
        out_dir=out,
        base_dir=plan.base_dir,
        adapters=[adapter.digest for adapter in adapters],
        weights=plan.weights,
        dtype=plan.dtype,
        device=str(chosen),
        shards=len(plan.shards),
        tensors=sum(len(header.tensors) for header in plan.shards.values()),
        merged_tensors=sorted(plan.targets),
        bytes_written=written,
        copied_files=copied,
        skipped_files=plan.skipped_files,
        base_structure_digest=plan.base_structure_digest,
        structure_digest=fingerprint(out).structure_digest,
        warnings=plan.warnings,
        seconds=time.perf_counter() - started,
    )
