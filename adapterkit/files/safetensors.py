"""safetensors headers and canonical bytes, without torch.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the raw
tensor bytes. Everything the registry needs (names, dtypes, shapes, a canonical re-serialisation)
lives in that header, so reading it with the standard library keeps registry commands fast and
free of torch. Every length in the header is checked against the file before it is trusted.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapterkit.errors import AdapterFormatError, NonFiniteError

__all__ = [
    "CANONICAL_METADATA",
    "DTYPE_SIZES",
    "FLOAT_BITS",
    "MAX_HEADER_BYTES",
    "Header",
    "TensorInfo",
    "TensorScan",
    "canonical_header",
    "canonical_size",
    "iter_canonical_bytes",
    "parse_header",
    "read_header",
    "scanned",
    "serialize",
]

#: Bytes per element of every dtype safetensors defines with a whole-byte width.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
#: Headers larger than this are refused before being read (the Rust reader's own limit).
MAX_HEADER_BYTES = 100_000_000
CANONICAL_METADATA = {"format": "pt"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie, relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int

    @property
    def data_bytes(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_header(raw: bytes, *, data_size: int, source: str) -> Header:
    """Validate the JSON header ``raw`` against a data section of ``data_size`` bytes."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFormatError(f"{source}: safetensors header is not valid JSON ({exc})") from None
    except RecursionError:
        # A hostile header of deeply nested arrays exhausts the JSON parser's stack.
        raise AdapterFormatError(f"{source}: safetensors header is not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise AdapterFormatError(f"{source}: safetensors header is not a JSON object")
    # The Rust reader accepts a missing or null __metadata__ but nothing else that is not a string map;
    # accepting more here would let a file pass our checks and then fail in safetensors.torch.load.
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterFormatError(f"{source}: safetensors __metadata__ must map strings to strings")
    for text in (*doc, *metadata, *metadata.values()):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # json accepts escaped lone surrogates ("\\ud800"); they cannot be written back as UTF-8, so the
            # canonical header could not be produced. The Rust reader refuses them too.
            raise AdapterFormatError(f"{source}: safetensors header holds a name that is not valid UTF-8") from None
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _tensor_info(name, entry, source)
    covered = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != covered:
            raise AdapterFormatError(
                f"{source}: tensor {info.name!r} starts at byte {info.begin}, expected {covered} "
                "(overlapping or missing data)"
            )
        covered = info.end
    if covered != data_size:
        raise AdapterFormatError(
            f"{source}: header describes {covered} bytes of tensor data but the file holds {data_size} "
            "(truncated or padded file)"
        )
    return Header(tensors=tensors, metadata=dict(metadata), data_start=8 + len(raw))


def _tensor_info(name: str, entry: object, source: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise AdapterFormatError(f"{source}: tensor {name!r} has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise AdapterFormatError(f"{source}: tensor {name!r} has unsupported dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise AdapterFormatError(f"{source}: tensor {name!r} has an invalid shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_u64(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise AdapterFormatError(f"{source}: tensor {name!r} has invalid data_offsets {_short(offsets)}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    if info.nbytes != info.numel * DTYPE_SIZES[dtype]:
        raise AdapterFormatError(
            f"{source}: tensor {name!r} spans {info.nbytes} bytes but {dtype}{list(shape)} needs "
            f"{info.numel * DTYPE_SIZES[dtype]}"
        )
    return info


def _is_u64(value: object) -> bool:
    # JSON true/false load as Python bools, which are ints; the Rust reader refuses them, and sizes beyond
    # u64 cannot describe a real file.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _short(value: object) -> str:
    """A value for an error message: repr'd (so one line) and cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at ``path`` (the data is not read)."""
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise AdapterFormatError(f"{source}: not a safetensors file ({size} bytes, too short)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise AdapterFormatError(
                    f"{source}: safetensors header claims {length} bytes but the file holds {size}"
                )
            raw = fh.read(length)
    except OSError as exc:
        raise AdapterFormatError(f"{source}: cannot read ({exc.strerror or type(exc).__name__})") from None
    return parse_header(raw, data_size=size - 8 - length, source=source)


def canonical_header(infos: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """The canonical header for tensors ``name -> (dtype, shape)``, and each tensor's data offset.

    Canonical means: tensors sorted by name and laid out in that order, metadata exactly
    ``{"format": "pt"}``, compact JSON with sorted keys, padded with spaces to a multiple of 8
    bytes (as the Rust writer does, so tensor data stays aligned). The same tensors therefore
    always give the same bytes, whoever wrote the original file.
    """
    doc: dict[str, object] = {"__metadata__": CANONICAL_METADATA}
    offsets: dict[str, int] = {}
    position = 0
    for name in sorted(infos):
        dtype, shape = infos[name]
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        offsets[name] = position
        position += nbytes
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def _open_for_reading(path: str | os.PathLike[str]) -> BinaryIO:
    try:
        return Path(path).open("rb")
    except OSError as exc:
        raise AdapterFormatError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None


def canonical_size(header: Header) -> int:
    """Bytes of the canonical form of a file with this header (what :func:`iter_canonical_bytes` yields)."""
    prefix, _ = canonical_header({t.name: (t.dtype, t.shape) for t in header.tensors.values()})
    return len(prefix) + sum(t.nbytes for t in header.tensors.values())


def iter_canonical_bytes(path: str | os.PathLike[str], header: Header) -> Iterator[bytes]:
    """Stream the canonical form of the safetensors file at ``path`` in chunks."""
    prefix, _ = canonical_header({t.name: (t.dtype, t.shape) for t in header.tensors.values()})
    yield prefix
    with _open_for_reading(path) as fh:
        for name in sorted(header.tensors):
            info = header.tensors[name]
            fh.seek(header.data_start + info.begin)
            remaining = info.nbytes
            while remaining:
                chunk = fh.read(min(_CHUNK, remaining))
                if not chunk:
                    raise AdapterFormatError(f"{path}: file changed while it was being read")
                remaining -= len(chunk)
                yield chunk


def serialize(tensors: Mapping[str, tuple[str, tuple[int, ...], bytes]]) -> bytes:
    """Canonical safetensors bytes for in-memory tensors ``name -> (dtype, shape, raw bytes)``."""
    prefix, _ = canonical_header({name: (dtype, shape) for name, (dtype, shape, _) in tensors.items()})
    parts = [prefix]
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        if len(data) != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise AdapterFormatError(f"tensor {name!r}: {len(data)} bytes do not fit {dtype}{list(shape)}")
        parts.append(data)
    return b"".join(parts)


#: Floating dtypes as (little-endian unsigned integer view, exponent mask, magnitude mask): a value is NaN
#: or infinite exactly when all its exponent bits are set (F8_E4M3 has no infinity: its one NaN pattern per
#: sign, 0x7F, is the "exponent" mask there, and F8_E8M0 is all exponent), and zero when no magnitude bit is.
FLOAT_BITS: dict[str, tuple[str, int, int]] = {
    "F64": ("<u8", 0x7FF0_0000_0000_0000, 0x7FFF_FFFF_FFFF_FFFF),
    "F32": ("<u4", 0x7F80_0000, 0x7FFF_FFFF),
    "F16": ("<u2", 0x7C00, 0x7FFF),
    "BF16": ("<u2", 0x7F80, 0x7FFF),
    "F8_E5M2": ("u1", 0x7C, 0x7F),
    "F8_E4M3": ("u1", 0x7F, 0x7F),
    "F8_E8M0": ("u1", 0xFF, 0xFF),
}


@dataclass
class _Slot:
    """One tensor of the stream being scanned: where its bytes lie in the data section."""

    name: str
    dtype: str
    begin: int
    end: int
    nonzero: bool = False


class TensorScan:
    """Checks the bytes of a safetensors file as they stream past (hashing, copying): no second read.

    Fed chunk by chunk (any sizes: an element split across two chunks is carried over), it parses
    the header, then looks at every floating tensor's data through an integer view: an element
    whose exponent bits are all ones is a NaN or an infinity, which is refused naming the tensor
    (:class:`~adapterkit.errors.NonFiniteError`), and a tensor with no magnitude bit set anywhere is
    all zeros (:attr:`zero_tensors`, for the all-zero adapter warning). The cost is a couple of
    vectorised integer operations per byte, small beside the sha256 that runs on the same bytes.

    ``defer`` holds the refusal until :meth:`finish`, for streams whose integrity is checked as
    they end (a pull), so that a damaged download is reported as damaged rather than as a NaN.
    A header that cannot be parsed stops the scan silently: the stream's own checks report it.
    """

    def __init__(self, source: str, *, defer: bool = False) -> None:
        self.source = source
        self.defer = defer
        self._head = bytearray()
        self._header_end: int | None = None  # bytes of the stream before the data section
        self._slots: list[_Slot] | None = None
        self._position = 0  # bytes of the stream seen
        self._carry = b""  # the start of an element split between chunks
        self._slot = 0
        self._found: NonFiniteError | None = None
        self._broken = False

    @property
    def zero_tensors(self) -> set[str]:
        """Floating tensors seen so far with every element zero (all of them once the stream has ended)."""
        return {slot.name for slot in self._slots or () if not slot.nonzero}

    def feed(self, chunk: bytes | memoryview) -> None:
        if self._broken or (self._found is not None and self.defer):
            return
        data = memoryview(chunk).cast("B")
        if self._slots is None:
            data = self._read_header(data)
            if self._slots is None:
                return
        while len(data) and self._slot < len(self._slots):
            slot = self._slots[self._slot]
            offset = self._position - self._header_end  # type: ignore[operator]
            if offset < slot.begin:  # bytes of a tensor that is not scanned (integers), or padding
                skip = min(len(data), slot.begin - offset)
                data = data[skip:]
                self._position += skip
                continue
            take = min(len(data), slot.end - offset)
            self._scan(slot, offset - slot.begin, data[:take])
            data = data[take:]
            self._position += take
            if offset + take >= slot.end:
                self._slot += 1
                self._carry = b""

    def finish(self) -> None:
        """Raise the refusal a deferred scan found (call once the stream has ended)."""
        if self._found is not None:
            raise self._found

    def _read_header(self, data: memoryview) -> memoryview:
        need = 8 if self._header_end is None else self._header_end
        take = max(0, min(len(data), need - len(self._head)))
        self._head += data[:take]
        self._position += take
        data = data[take:]
        if self._header_end is None and len(self._head) == 8:
            (length,) = struct.unpack("<Q", self._head)
            if length > MAX_HEADER_BYTES:
                self._broken = True
                return data[:0]
            self._header_end = 8 + length
            return self._read_header(data)
        if self._header_end is not None and len(self._head) == self._header_end:
            try:
                doc = json.loads(bytes(self._head[8:]).decode("utf-8"))
                slots = [
                    _Slot(name, entry["dtype"], *entry["data_offsets"])
                    for name, entry in doc.items()
                    if name != "__metadata__" and entry["dtype"] in FLOAT_BITS
                ]
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                self._broken = True
                return data[:0]
            self._slots = sorted(slots, key=lambda slot: slot.begin)
        return data

    def _scan(self, slot: _Slot, start: int, data: memoryview) -> None:
        import numpy as np  # here, not at the top: listing a store never pays for numpy

        view, exponent, magnitude = FLOAT_BITS[slot.dtype]
        size = np.dtype(view).itemsize
        if self._carry:
            data = memoryview(self._carry + bytes(data))
            start -= len(self._carry)
            self._carry = b""
        whole = len(data) - len(data) % size
        if whole < len(data):
            self._carry = bytes(data[whole:])
        if not whole:
            return
        values = np.frombuffer(data[:whole], dtype=view)
        bad = np.bitwise_and(values, exponent) == exponent
        if bad.any() and self._found is None:
            index = start // size + int(np.flatnonzero(bad)[0])
            self._found = NonFiniteError(
                f"{self.source}: tensor {slot.name!r} holds a non-finite value (NaN or infinity) at element "
                f"{index}; adapterkit never stores one (is the adapter damaged, or did training diverge?)"
            )
            if not self.defer:
                raise self._found
        if not slot.nonzero and np.bitwise_and(values, magnitude).any():
            slot.nonzero = True


def scanned(chunks: Iterable[bytes], scan: TensorScan) -> Iterator[bytes]:
    """``chunks`` unchanged, each shown to ``scan`` first; a deferred refusal is raised after the last one."""
    for chunk in chunks:
        scan.feed(chunk)
        yield chunk
    scan.finish()
