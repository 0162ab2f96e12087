"""``merge --dry-run``: what a merge would write, touch and cost, from the very plan the merge runs.

Reads headers only (and the few embedding rows a check needs); nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.dtypes import DTYPE_SIZES
from adapterkit.devices import resolve_device
from adapterkit.merging.plan import build_plan
from adapterkit.merging.shard_writer import BLOCK_ELEMENTS, MAX_WORKERS, WRITE_DEPTH, shard_header
from adapterkit.merging.steps import Contribution, Replacement, RowReplacement, Step, dora_axis

if TYPE_CHECKING:
    import torch

    from adapterkit.adapter.model import Adapter

__all__ = ["plan_merge"]


def _operation(step: Step, rows: int, cols: int) -> tuple[dict[str, Any], int]:
    """What one step does to a ``rows x cols`` tensor, as JSON, and its multiply-adds (FLOPs)."""
    if isinstance(step, Contribution):
        r = step.module.spec.r
        flops = 2 * rows * cols * r
        doc: dict[str, Any] = {
            "op": "lora",
            "adapter": step.adapter,
            "module": step.module.name,
            "r": r,
            "factor": step.factor,
        }
        if step.magnitude is not None:
            axis = dora_axis(step.module)
            doc.update(op="dora", norms=axis)
            # the norms: a second product for a row norm after other steps, and for columns a pass over the base
            flops += 2 * rows * cols * r + 3 * rows * cols
        return doc, flops
    if isinstance(step, Replacement):
        return {"op": "replace", "adapter": step.adapter, "source": step.source, "what": step.what,
                "shape": list(step.value.shape)}, 0  # fmt: skip
    if isinstance(step, RowReplacement):
        return {"op": "rows", "adapter": step.adapter, "source": step.source, "rows": len(step.rows)}, 0
    return {"op": "bias", "adapter": step.adapter, "source": step.source, "factor": step.factor}, rows


def plan_merge(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None,
    base_dir: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """What ``merge`` with the same arguments would write and cost, from the plan merge itself makes.

    Raises exactly what ``merge`` raises before writing (it runs the same plan). Keys shared with
    ``MergeReport.to_json`` mean the same: ``merged_tensors`` is the sorted list of base tensors
    that change and ``bytes_written`` the output shards' size (headers included).

    ``touched`` lists, per changed tensor, its ``contributions`` in order, each with its ``op``
    (:mod:`adapterkit.merging.steps`): ``lora`` (``factor * B @ A`` added), ``dora`` (the same,
    then each row or column, as ``norms`` says, rescaled to its magnitude), ``replace`` (the
    adapter's own copy: ``modules_to_save``, a trained bias; with the ``base_shape`` beside the
    tensor's when it resizes it), ``rows`` (trainable tokens) and ``bias`` (``lora_bias``);
    ``operations`` counts each ``op`` over the whole merge.

    ``flops`` is the sum over changed tensors of ``2 * rows * cols * r`` per LoRA module with a
    non-zero weight (one ``addmm_`` each; the plan leaves zero-weight contributions out), twice
    that plus the norms for a DoRA module. ``peak_bytes`` follows merge's streaming: it holds the
    adapters' tensors (factors and the copies they carry), one tensor's factors converted to the
    compute dtype (float32, float64 for a float64 base or output), and reusable buffers sized by
    the largest row block (``shard_writer.BLOCK_ELEMENTS`` elements or one whole row, whichever is
    larger): a raw input block and a compute block per worker thread (two for a DoRA module after
    other steps, which needs the base rows apart), and ``shard_writer.WRITE_DEPTH`` plus one per
    worker output blocks in flight. The number of workers depends on the machine's cores; the
    estimate takes the most a CPU merge uses (``shard_writer.MAX_WORKERS``; 1 on a GPU), so it does
    not change from machine to machine. Whole tensors are never held, so ``largest_tensor`` is
    there for reference only.
    """
    plan = build_plan(adapters, weights, base_dir, dtype=dtype, force=force)
    touched: dict[str, Any] = {}
    operations: dict[str, int] = {}
    converted = copied = 0
    headers = 0
    flops = 0
    update_peak = in_peak = writer_peak = 0
    work_peak: dict[str, int] = {}
    largest: dict[str, Any] | None = None
    for path, header in plan.shards.items():
        order = sorted(header.tensors.values(), key=lambda info: (info.begin, info.end))
        headers += len(shard_header(order, plan))
        for info in order:
            out_code = plan.out_dtype(info)
            if largest is None or info.numel > largest["numel"]:
                largest = {"name": info.name, "shape": list(info.shape), "numel": info.numel, "bytes": info.nbytes}
            steps = plan.targets.get(info.name)
            if not steps and out_code == info.dtype:
                copied += 1
                continue
            compute = "F64" if "F64" in (info.dtype, out_code) else "F32"
            shape = plan.out_shape(info)
            if steps:
                rows = shape[0] if shape else 1
                cols = plan.out_numel(info) // max(rows, 1)
            else:
                converted += 1
                rows, cols = info.numel, 1
            block = min(rows, max(1, BLOCK_ELEMENTS // max(cols, 1))) * cols
            # buffers are allocated at a minimum size, but only the bytes a block fills are ever touched
            in_peak = max(in_peak, block * DTYPE_SIZES[info.dtype])
            writer_peak = max(writer_peak, block * DTYPE_SIZES[out_code])
            if steps:
                apart = any(isinstance(s, Contribution) and s.magnitude is not None for s in steps[1:])
                work = block * DTYPE_SIZES[compute] * (2 if apart else 1)
                work_peak[compute] = max(work_peak.get(compute, 0), work)
                described = [_operation(step, rows, cols) for step in steps]
                tensor_flops = sum(cost for _, cost in described)
                update_peak = max(
                    update_peak,
                    sum(
                        (rows + cols) * s.module.spec.r * DTYPE_SIZES[compute]
                        for s in steps
                        if isinstance(s, Contribution)
                    ),
                )
                flops += tensor_flops
                for doc, _ in described:
                    operations[doc["op"]] = operations.get(doc["op"], 0) + 1
                touched[info.name] = {
                    "shard": path.name,
                    "shape": list(shape),
                    "dtype": info.dtype,
                    "out_dtype": out_code,
                    "flops": tensor_flops,
                    "contributions": [doc for doc, _ in described],
                }
                if shape != info.shape:
                    touched[info.name]["base_shape"] = list(info.shape)
    adapter_bytes = sum(
        a.factor_bytes + sum(t.numel() * t.element_size() for t in a.extra_tensors.values()) for a in adapters
    )
    workers = MAX_WORKERS if resolve_device(device).type == "cpu" else 1
    buffers = workers * (in_peak + sum(work_peak.values())) + (WRITE_DEPTH + workers) * writer_peak
    if largest is not None:
        largest["float32_bytes"] = largest.pop("numel") * 4
    return {
        "base_dir": str(plan.base_dir),
        "base_structure_digest": plan.base_structure_digest,
        "adapters": [{"digest": a.digest, "weight": w} for a, w in zip(adapters, plan.weights, strict=True)],
        "dtype": plan.dtype,
        "shards": len(plan.shards),
        "tensors": sum(len(header.tensors) for header in plan.shards.values()),
        "merged_tensors": sorted(plan.targets),
        "converted_tensors": converted,
        "copied_tensors": copied,
        "output_bytes": plan.total_bytes,
        "bytes_written": plan.total_bytes + headers,
        "copied_files": [path.name for path in plan.copy_files],
        "skipped_files": plan.skipped_files,
        "config_updates": plan.config_updates,
        "warnings": plan.warnings,
        "operations": operations,
        "flops": flops,
        "adapter_bytes": adapter_bytes,
        "peak_bytes": adapter_bytes + update_peak + buffers,
        "largest_tensor": largest,
        "touched": touched,
    }
