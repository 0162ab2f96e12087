"""A base model and its fine-tune, read side by side one tensor at a time from their safetensors.

The two folders may be sharded differently and stored in different floating dtypes; what must
agree is the structure, every tensor's name and shape, and :func:`check_structure` names the first
tensor that does not. Tensors are read with positional reads into buffers of their own (never a
memory map, whose pages would count against the process while the model is walked), so at any
time only the tensors being compared are in memory. A tensor that is not extracted is compared in
chunks of a few megabytes, bytes first: an unchanged tensor costs two reads and a ``memcmp``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapterkit.adapter.dtypes import all_finite
from adapterkit.errors import BaseModelError, ExtractionError
from adapterkit.files.safetensors import DTYPE_SIZES, Header, TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["Located", "ModelPair", "change_dtype", "check_structure", "locate", "torch_dtype"]

#: Elements read at a time (a few hundred kilobytes: each chunk is converted and summed while in cache).
_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class Located:
    """Where one tensor's bytes are: its shard, the shard's header and the tensor's entry."""

    path: Path
    header: Header
    info: TensorInfo

    @property
    def offset(self) -> int:
        return self.header.data_start + self.info.begin


def locate(headers: dict[Path, Header]) -> dict[str, Located]:
    """Every tensor of a model folder by name, in the order the shards store them."""
    out: dict[str, Located] = {}
    for path, header in headers.items():
        for info in sorted(header.tensors.values(), key=lambda t: t.begin):
            out[info.name] = Located(path, header, info)
    return out


def check_structure(base: dict[str, Located], tuned: dict[str, Located], base_dir: Path, tuned_dir: Path) -> None:
    """Refuse two models whose tensor names or shapes differ, naming the first tensor that does."""
    for name in sorted(set(base) | set(tuned)):
        if name not in tuned:
            raise ExtractionError(
                f"tensor {name!r} is in {base_dir} but not in {tuned_dir} (not the same architecture)"
            )
        if name not in base:
            raise ExtractionError(
                f"tensor {name!r} is in {tuned_dir} but not in {base_dir} (not the same architecture)"
            )
        base_shape, tuned_shape = base[name].info.shape, tuned[name].info.shape
        if base_shape != tuned_shape:
            raise ExtractionError(
                f"tensor {name!r} is {list(base_shape)} in {base_dir} but {list(tuned_shape)} in {tuned_dir} "
                "(a resized vocabulary?)"
            )


def change_dtype(base: Located, tuned: Located) -> torch.dtype:
    """The dtype a change is formed in: float32, or float64 when either model stores the tensor in float64."""
    import torch

    return torch.float64 if "F64" in (base.info.dtype, tuned.info.dtype) else torch.float32


def torch_dtype(code: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype code, or None when this torch has no such dtype."""
    from adapterkit.adapter.dtypes import torch_dtypes

    for dtype, name in torch_dtypes().items():
        if name == code:
            return dtype
    return None


class ModelPair:
    """The two models' shards, opened once; tensors are read on demand, by name."""

    def __init__(self, base: dict[str, Located], tuned: dict[str, Located]) -> None:
        self.base = base
        self.tuned = tuned
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> ModelPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise BaseModelError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
            self._fds[path] = fd
        return fd

    def _read_into(self, where: Located, into: memoryview, offset: int) -> None:
        fd = self._fd(where.path)
        done = 0
        while done < len(into):
            try:
                got = os.preadv(fd, [into[done:]], offset + done)
            except OSError as exc:
                raise BaseModelError(
                    f"{where.path}: cannot read tensor {where.info.name!r} ({exc.strerror or type(exc).__name__})"
                ) from None
            if got == 0:
                raise BaseModelError(f"{where.path}: ended inside tensor {where.info.name!r} (changed while reading?)")
            done += got

    def read(
        self, where: Located, start: int = 0, count: int | None = None, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements ``start:start+count`` of a tensor (all of it by default), flat, in its own dtype.

        ``into`` is a byte buffer to read into when it is large enough (reused from chunk to chunk,
        so a pass over a large tensor does not fault in fresh pages for every chunk).
        """
        import torch

        dtype = torch_dtype(where.info.dtype)
        if dtype is None:
            raise BaseModelError(f"{where.path}: tensor {where.info.name!r} has dtype {where.info.dtype}, unknown here")
        size = DTYPE_SIZES[where.info.dtype]
        count = where.info.numel - start if count is None else count
        if into is not None and into.numel() >= count * size:
            buffer = into[: count * size]
        else:
            buffer = torch.empty(count * size, dtype=torch.uint8)
        if count:
            self._read_into(where, memoryview(buffer.numpy()), where.offset + start * size)
        return buffer.view(dtype)

    def delta(
        self,
        name: str,
        into: torch.Tensor | None = None,
        rows_done: Callable[[slice, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """``tuned - base`` for one tensor (float32, float64 if either is float64), shaped like it; and its
        squared Frobenius norm.

        Formed a block of whole rows at a time from two small reused buffers; the norm is summed in
        float64, and ``rows_done(rows, block)`` is called, while each block is in cache. The change
        itself is the only full-size tensor, written into ``into`` (a flat buffer of the change's
        dtype) when that is large enough.
        """
        import torch

        base, tuned = self.base[name], self.tuned[name]
        wide = change_dtype(base, tuned)
        numel = base.info.numel
        if into is not None and into.dtype == wide and into.numel() >= numel:
            flat = into[:numel]
        else:
            flat = torch.empty(numel, dtype=wide)
        shape = base.info.shape
        out = flat.view(shape)
        width = max(1, numel // shape[0]) if shape and shape[0] else 1
        step = max(1, _CHUNK_ELEMENTS // width)
        scratch = _scratch(base, tuned, step * width)
        energy = 0.0
        for first in range(0, numel // width, step):
            rows = slice(first, min(first + step, numel // width))
            start, count = rows.start * width, (rows.stop - rows.start) * width
            piece = flat[start : start + count]
            piece.copy_(self.read(tuned, start, count, into=scratch[1]))
            piece.sub_(self.read(base, start, count, into=scratch[0]))
            energy += _square(piece)
            if rows_done is not None and len(shape) == 2:
                rows_done(rows, piece.view(-1, width))
        if not math.isfinite(energy):
            raise self.not_finite(name)
        return out, energy

    def relative_change(self, name: str) -> float:
        """``||tuned - base|| / ||base||`` of a tensor (``/ ||tuned||`` when the base's is zero); 0 when equal.

        Compared a chunk at a time, bytes first when the dtypes agree: an unchanged tensor is never
        decoded. From the first chunk that differs, the norms are summed over the whole tensor. A
        dtype with no arithmetic here (complex, exotic 8-bit floats) counts as changed by 1.
        """
        import numpy as np
        import torch

        base, tuned = self.base[name], self.tuned[name]
        scratch = _scratch(base, tuned)
        if base.info.dtype == tuned.info.dtype:
            for start, count in _chunks(base.info.numel):
                b = self.read(base, start, count, into=scratch[0]).view(torch.uint8).numpy()
                t = self.read(tuned, start, count, into=scratch[1]).view(torch.uint8).numpy()
                if not np.array_equal(b, t):
                    break
            else:
                return 0.0
        if torch_dtype(base.info.dtype) is None or torch_dtype(tuned.info.dtype) is None:
            return 1.0
        diff = norm_base = norm_tuned = 0.0
        for start, count in _chunks(base.info.numel):
            b = self.read(base, start, count, into=scratch[0]).to(torch.float64)
            t = self.read(tuned, start, count, into=scratch[1]).to(torch.float64)
            norm_base += _square(b)
            norm_tuned += _square(t)
            diff += _square(t.sub_(b))
        if not math.isfinite(diff + norm_base + norm_tuned):
            raise self.not_finite(name)
        if diff == 0.0:
            return 0.0  # the same numbers in two dtypes
        if norm_base > 0:
            return math.sqrt(diff / norm_base)
        return math.sqrt(diff / norm_tuned)

    def not_finite(self, name: str) -> ExtractionError:
        """The error for a tensor whose values are not all finite, naming the model that holds them."""
        for where in (self.base[name], self.tuned[name]):
            values = self.read(where)
            if not all_finite(values):
                return ExtractionError(f"{where.path}: tensor {name!r} holds NaN or infinite values")
        return ExtractionError(f"tensor {name!r}: its change overflows (values too large to subtract)")


def _square(values: torch.Tensor) -> float:
    """The sum of squares of one chunk: torch's cascade summation keeps it to ~1e-7 relative in float32
    (the chunks' sums are added in Python floats), at a third of the cost of widening to float64."""
    return float(values.square().sum())


def _scratch(base: Located, tuned: Located, elements: int = _CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Two byte buffers, ``elements`` of each tensor long (at most the whole tensor)."""
    import torch

    count = min(elements, base.info.numel)
    return (
        torch.empty(count * DTYPE_SIZES[base.info.dtype], dtype=torch.uint8),
        torch.empty(count * DTYPE_SIZES[tuned.info.dtype], dtype=torch.uint8),
    )


def _chunks(numel: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, _CHUNK_ELEMENTS):
        yield start, min(_CHUNK_ELEMENTS, numel - start)
