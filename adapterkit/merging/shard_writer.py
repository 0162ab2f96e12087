"""Writing a merge's output shards: blocks of rows read, updated and written by a few threads.

Each shard is written tensor by tensor in the base's own order. A tensor no adapter touches is
copied without being decoded. A changed tensor goes through in blocks of whole rows: a worker
thread (one per core) reads a block (from the base, or from an adapter's own copy of the tensor),
widens it to float32 (float64 for a float64 base), applies the tensor's steps in place
(:mod:`adapterkit.merging.steps`: ``addmm_`` for each LoRA, so no dense delta is ever formed) and
rounds it back; the writer thread appends finished blocks in order to the output file
(:class:`~adapterkit.files.sequential.SequentialFile`), and a third flushes each finished shard
to disk while the next one is computed. A DoRA module whose norms run down the columns needs
them before its first block is written: they are summed block by block in one read of the base
tensor first. Memory stays at the adapters plus a few blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.adapter.dtypes import DTYPE_SIZES, all_finite, torch_dtype
from adapterkit.errors import NonFiniteError
from adapterkit.files.safetensors import CANONICAL_METADATA, Header, TensorInfo
from adapterkit.files.sequential import SequentialFile, pread_exact
from adapterkit.merging.plan import MergePlan
from adapterkit.merging.steps import PreparedStep, Replacement, apply_steps, column_norm_squares, prepare_steps

if TYPE_CHECKING:
    import torch

__all__ = [
    "BLOCK_ELEMENTS",
    "MAX_WORKERS",
    "WRITE_DEPTH",
    "MergeProgress",
    "shard_header",
    "write_shards",
]

#: ``progress(bytes_done, bytes_total, tensor_name)``, called as each tensor is handed to the writer (output bytes).
MergeProgress = Callable[[int, int, str], None]

# --- I/O ---------------------------------------------------------------------------------------------------------

#: Elements per block of a streamed tensor. Blocks of a megabyte or two stay in the CPU cache from
#: the read through the float32 update to the write, which makes the merge several times faster
#: than whole-tensor passes over memory, and keeps the scratch memory at a few megabytes; larger
#: ones also spend less time per byte in Python (measured on 2 cores: 512K elements 10% faster
#: than 256K).
BLOCK_ELEMENTS = 1 << 19
#: Output blocks in flight between the maths and the writer thread, beyond one per worker.
WRITE_DEPTH = 4
#: Write output shards with O_DIRECT where the file system allows it (see sequential_file).
_DIRECT_IO = True
#: Most compute threads a CPU merge uses: past a few, the copies in and out of the page cache bind.
MAX_WORKERS = 4


class _Scratch:
    """Buffers reused from block to block and tensor to tensor.

    A fresh allocation per block would make the kernel fault in (and zero) new pages every time;
    reusing a few small buffers keeps them resident, in cache and out of the peak-memory count.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        import torch

        slot = (key, dtype, str(device))
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(max(numel, BLOCK_ELEMENTS), dtype=dtype, device=device)
            self._buffers[slot] = buffer
        return buffer[:numel]


class _Writer:
    """Performs the writes of a merge, in order, on threads of their own.

    Writing a block costs about as much as computing it, and both release the GIL, so a writer
    thread overlaps them; a second thread flushes each finished shard to disk (``fsync``) while
    the next one is computed. Output blocks circulate through a small pool, which bounds the
    memory in flight. The first failure is raised in the caller's thread; :meth:`close` (always
    called) stops the threads and closes every file handed over.
    """

    def __init__(self, depth: int = WRITE_DEPTH) -> None:
        import queue

        self._ops: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._free: queue.Queue[torch.Tensor | None] = queue.Queue()
        for _ in range(depth):
            self._free.put(None)
        self._error: BaseException | None = None
        self._aborted = False
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterkit-fsync")
        self._syncs: list[Future[None]] = []
        self._thread = threading.Thread(target=self._run, name="adapterkit-writer", daemon=True)
        self._thread.start()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A free output buffer of at least ``nbytes`` bytes (waits while all are in flight)."""
        import torch

        buffer = self._free.get()
        self._check()
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, BLOCK_ELEMENTS * 8), dtype=torch.uint8)
        return buffer

    def write(self, out: SequentialFile, buffer: torch.Tensor | Future[torch.Tensor], nbytes: int) -> None:
        """Append ``nbytes`` of ``buffer`` to ``out``; a future is waited for (in order) by the writer thread."""
        self._check()
        self._ops.put(("write", out, buffer, nbytes))

    def copy(self, src: int, out: SequentialFile, offset: int, length: int, what: str) -> None:
        """Append ``length`` bytes of ``src`` at ``offset`` to ``out``."""
        self._check()
        self._ops.put(("copy", out, src, offset, length, what))

    def finish(self, out: SequentialFile) -> None:
        """Complete ``out`` once everything queued before is written, then fsync and close it."""
        self._ops.put(("finish", out))

    def close_fd(self, fd: int) -> None:
        """Close ``fd`` once every operation queued before (reads from it included) is done."""
        self._ops.put(("close", fd))

    def _run(self) -> None:
        while True:
            op = self._ops.get()
            if op is None:
                return
            kind = op[0]
            buffer = None
            live = self._error is None and not self._aborted
            try:
                if kind == "close":
                    os.close(op[1])
                elif kind == "finish":
                    if live:
                        op[1].finish()
                        self._syncs.append(self._syncer.submit(op[1].sync_and_close))
                    else:
                        op[1].close()
                elif kind == "write":
                    buffer = op[2].result() if isinstance(op[2], Future) else op[2]
                    if live:
                        op[1].write(memoryview(buffer[: op[3]].numpy()))
                elif live:
                    op[1].copy_from(*op[2:])
            except BaseException as exc:
                self._error = self._error or exc
                if kind == "finish":
                    with contextlib.suppress(OSError):
                        op[1].close()
            finally:
                if kind == "write":
                    self._free.put(buffer)

    def close(self, *, abort: bool = False) -> None:
        """Wait for every queued operation and flush; raise the first failure, if any.

        With ``abort`` (the caller is failing anyway, and its error is the one to report), queued
        writes are dropped, only the files are closed, and nothing is raised.
        """
        self._aborted = self._aborted or abort
        self._ops.put(None)
        self._thread.join()
        self._syncer.shutdown(wait=True)
        for future in self._syncs:
            error = future.exception()
            if error is not None:
                self._error = self._error or error
        if not abort:
            self._check()


def shard_header(order: Sequence[TensorInfo], plan: MergePlan) -> bytes:
    """A safetensors header for the tensors in ``order`` (the source's data order), metadata ``{"format":"pt"}``."""
    doc: dict[str, Any] = {"__metadata__": CANONICAL_METADATA}
    position = 0
    for info in order:
        code = plan.out_dtype(info)
        nbytes = plan.out_numel(info) * DTYPE_SIZES[code]
        shape = list(plan.out_shape(info))
        doc[info.name] = {"dtype": code, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _Progress:
    def __init__(self, callback: MergeProgress | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0

    def advance(self, nbytes: int, name: str) -> None:
        self.done += nbytes
        if self.callback is not None:
            self.callback(self.done, self.total, name)


@dataclass
class _Streams:
    """What every shard's writing shares: the device, the compute workers, the writer and the progress count."""

    plan: MergePlan
    device: torch.device
    workers: ThreadPoolExecutor
    writer: _Writer
    progress: _Progress
    local: threading.local = field(default_factory=threading.local)

    def scratch(self) -> _Scratch:
        """This worker thread's own scratch buffers."""
        mine = getattr(self.local, "scratch", None)
        if mine is None:
            mine = self.local.scratch = _Scratch()
        return mine


def _write_shard(src: Path, header: Header, dst: Path, streams: _Streams) -> int:
    """Write one output shard, tensor by tensor in the source's order; returns the bytes it will hold."""
    import torch

    order = sorted(header.tensors.values(), key=lambda info: (info.begin, info.end))
    prefix = shard_header(order, streams.plan)
    in_fd = os.open(src, os.O_RDONLY)
    try:
        out = SequentialFile(dst, direct=_DIRECT_IO)
    except BaseException:
        os.close(in_fd)
        raise
    try:
        buffer = streams.writer.buffer(len(prefix))
        buffer[: len(prefix)].copy_(torch.frombuffer(bytearray(prefix), dtype=torch.uint8))
        streams.writer.write(out, buffer, len(prefix))
        written = len(prefix)
        for info in order:
            nbytes = _write_tensor(in_fd, out, src, header, info, streams)
            written += nbytes
            streams.progress.advance(nbytes, info.name)
    finally:
        streams.writer.finish(out)
        streams.writer.close_fd(in_fd)  # after the reads and copies queued from it
    return written


def _write_tensor(
    in_fd: int, out: SequentialFile, src: Path, header: Header, info: TensorInfo, streams: _Streams
) -> int:
    """Queue one tensor's bytes: raw when nothing changes it, else block by block, updated and/or converted.

    A block is a run of whole rows: it is read (from the base, or from the adapter's copy that
    replaces the tensor), widened to float32 (float64 for float64 weights), put through the
    tensor's steps, and rounded once into the output dtype.
    """
    import torch

    plan, writer = streams.plan, streams.writer
    steps = plan.targets.get(info.name)
    out_code = plan.out_dtype(info)
    if not steps and out_code == info.dtype:
        writer.copy(in_fd, out, header.data_start + info.begin, info.nbytes, f"{src}: tensor {info.name!r}")
        return info.nbytes
    in_size, out_size = DTYPE_SIZES[info.dtype], DTYPE_SIZES[out_code]
    in_dtype, out_dtype = torch_dtype(info.dtype), torch_dtype(out_code)
    compute = torch.float64 if "F64" in (info.dtype, out_code) else torch.float32
    source = plan.replacement(info.name)
    prepared: list[PreparedStep] = []
    shape = plan.out_shape(info)
    if steps:
        prepared = prepare_steps(steps, streams.device, compute)  # the replacement is the source, not a step
        rows = shape[0] if shape else 1
        cols = plan.out_numel(info) // max(rows, 1)
    else:
        rows, cols = info.numel, 1  # a plain conversion: any run of elements will do
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    start = header.data_start + info.begin
    if any(p.kind == "dora" and p.axis == "columns" for p in prepared):
        prepared = _column_scales(
            prepared, _Block(in_fd, src, info.name, start, 0, rows, cols), in_dtype, compute, streams
        )
    for first in range(0, rows, step):
        count = min(rows, first + step) - first
        block = _Block(in_fd, src, info.name, start + first * cols * in_size, first, count, cols, source)
        out_buffer = writer.buffer(count * cols * out_size)
        task = streams.workers.submit(
            _compute_block, block, in_dtype, out_dtype, compute, prepared, out_buffer, streams
        )
        writer.write(out, task, count * cols * out_size)
    return rows * cols * out_size


@dataclass(frozen=True)
class _Block:
    """A run of whole rows of one tensor in a base shard (or of the adapter's copy that replaces it)."""

    fd: int
    path: Path
    name: str
    offset: int
    first_row: int
    rows: int
    cols: int
    source: Replacement | None = None


def _read_block(block: _Block, in_dtype: torch.dtype, streams: _Streams) -> torch.Tensor:
    """The block's base values, in the base's dtype, in this thread's scratch buffer."""
    import torch

    numel = block.rows * block.cols
    raw = streams.scratch().get("in", numel * in_dtype.itemsize, torch.uint8)
    pread_exact(block.fd, memoryview(raw.numpy()), block.offset, f"{block.path}: tensor {block.name!r}")
    return raw.view(in_dtype)


def _column_scales(
    prepared: list[PreparedStep], whole: _Block, in_dtype: torch.dtype, compute: torch.dtype, streams: _Streams
) -> list[PreparedStep]:
    """Each column-wise DoRA step with ``magnitude / || W + s B A ||`` per column, summed over one read of the base.

    Run in the caller's thread before the tensor's first block is queued; holds one block at a time.
    """
    import torch

    dora = [i for i, p in enumerate(prepared) if p.kind == "dora" and p.axis == "columns"]
    squares = {i: torch.zeros(whole.cols, dtype=torch.float64, device=streams.device) for i in dora}
    step = max(1, BLOCK_ELEMENTS // max(whole.cols, 1))
    in_size = in_dtype.itemsize
    for first in range(0, whole.rows, step):
        count = min(whole.rows, first + step) - first
        block = dataclasses.replace(
            whole, offset=whole.offset + first * whole.cols * in_size, first_row=first, rows=count
        )
        base = _read_block(block, in_dtype, streams).view(count, whole.cols).to(device=streams.device, dtype=compute)
        for i in dora:
            squares[i] += column_norm_squares(base, prepared[i], first)
    out = list(prepared)
    for i in dora:
        norms = squares[i].sqrt_().to(compute).view(1, -1)
        magnitude = prepared[i].magnitude
        assert magnitude is not None
        out[i] = dataclasses.replace(prepared[i], column_scale=magnitude / norms)
    return out


def _compute_block(
    block: _Block,
    in_dtype: torch.dtype,
    out_dtype: torch.dtype,
    compute: torch.dtype,
    steps: Sequence[PreparedStep],
    out_buffer: torch.Tensor,
    streams: _Streams,
) -> torch.Tensor:
    """Read one block, apply its rows of every step (in ``compute`` precision), round it into ``out_buffer``."""
    scratch = streams.scratch()
    numel = block.rows * block.cols
    if block.source is not None:
        value = block.source.value.reshape(-1, block.cols)
        values = value[block.first_row : block.first_row + block.rows].reshape(-1)
    else:
        values = _read_block(block, in_dtype, streams)
    out = out_buffer[: numel * out_dtype.itemsize].view(out_dtype)
    if steps or block.source is not None:
        work = scratch.get("work", numel, compute, streams.device).view(block.rows, block.cols)
        work.copy_(values.view(block.rows, block.cols))
        base = None
        if any(step.kind == "dora" and step.axis == "rows" for step in steps[1:]):
            base = scratch.get("base", numel, compute, streams.device).view(block.rows, block.cols)
            base.copy_(work)
        apply_steps(work, steps, block.first_row, base)
        out.copy_(work.view(-1))
    else:
        out.copy_(values)
    if not all_finite(out):  # a NaN is never written; the merge fails and publishes nothing
        raise _non_finite(block, values, bool(steps) or block.source is not None, out_dtype)
    return out_buffer


def _non_finite(block: _Block, values: torch.Tensor, updated: bool, out_dtype: torch.dtype) -> NonFiniteError:
    """Why a block came out non-finite: the base already was, the added change overflowed, or the conversion did."""
    dtype = str(out_dtype).removeprefix("torch.")
    if not all_finite(values):
        return NonFiniteError(
            f"{block.path}: tensor {block.name!r} already holds non-finite values (NaN or infinity); merge does not "
            "write them (is the base damaged?)"
        )
    if updated:
        return NonFiniteError(
            f"merging into {block.name!r} gives values beyond the range of {dtype} (the weighted change is too "
            "large); nothing was written"
        )
    return NonFiniteError(
        f"converting {block.name!r} to {dtype} overflows it (its values exceed the range of {dtype}); "
        "nothing was written"
    )


def write_shards(plan: MergePlan, tmp: Path, device: torch.device, progress: MergeProgress | None) -> int:
    """Write every output shard into ``tmp``; returns the bytes written.

    Blocks are computed by a few worker threads, each on one torch thread (blocks are small, and
    a torch thread pool spends more time waking up than computing on them), while the writer
    thread copies finished blocks into the page cache in order. All of them release the GIL.
    """
    import torch

    threads = torch.get_num_threads()
    count = _workers(device)
    workers = ThreadPoolExecutor(max_workers=count, thread_name_prefix="adapterkit-merge")
    writer: _Writer | None = None
    try:
        if device.type == "cpu":
            torch.set_num_threads(1)
        writer = _Writer(depth=WRITE_DEPTH + count)
        streams = _Streams(plan, device, workers, writer, _Progress(progress, plan.total_bytes))
        written = 0
        for src, header in plan.shards.items():
            written += _write_shard(src, header, tmp / src.name, streams)
    except BaseException:
        if writer is not None:
            writer.close(abort=True)
        raise
    else:
        writer.close()
    finally:
        workers.shutdown(wait=True)
        torch.set_num_threads(threads)
    return written


def _workers(device: torch.device) -> int:
    """Compute threads: one per core (the writer's copying overlaps them), one for a GPU's stream."""
    if device.type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))
