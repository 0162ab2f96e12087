"""safetensors headers and canonical bytes.

Canonical bytes are what the store hashes, so two files holding the same tensors must canonicalise to
the same bytes whatever their writer chose (header order, metadata, data layout, padding), and any
change to a tensor must change them. Malformed files are refused before anything trusts their lengths.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line, header_bytes, raw_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from adapterkit.errors import AdapterFormatError
from adapterkit.files.safetensors import (
    CANONICAL_METADATA,
    MAX_HEADER_BYTES,
    canonical_header,
    iter_canonical_bytes,
    parse_header,
    read_header,
    serialize,
)

_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8}
_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}


def _canonical(path: Path) -> bytes:
    return b"".join(iter_canonical_bytes(path, read_header(path)))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the property: same tensors, any layout => same canonical bytes --------------------------------------------

_names = st.text(alphabet=st.sampled_from("abcXYZ_.09é"), min_size=1, max_size=12).filter(lambda n: n != "__metadata__")


@st.composite
def _tensor_sets(draw):
    names = draw(st.lists(_names, min_size=1, max_size=6, unique=True))
    tensors = {}
    for name in names:
        dtype = draw(st.sampled_from(sorted(_SIZES)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        count = 1
        for dim in shape:
            count *= dim
        data = draw(st.binary(min_size=count * _SIZES[dtype], max_size=count * _SIZES[dtype]))
        tensors[name] = (dtype, shape, data)
    return tensors


_metadata = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=_tensor_sets(),
    data=st.data(),
    metadata_a=_metadata,
    metadata_b=_metadata,
    pad_a=st.integers(0, 9),
    pad_b=st.integers(0, 9),
)
def test_canonical_bytes_ignore_layout_and_metadata(tensors, data, metadata_a, metadata_b, pad_a, pad_b):
    names = list(tensors)
    layouts = []
    for metadata, pad in ((metadata_a, pad_a), (metadata_b, pad_b)):
        layouts.append(
            raw_safetensors(
                tensors,
                header_order=data.draw(st.permutations(names)),
                data_order=data.draw(st.permutations(names)),
                metadata=metadata,
                metadata_first=data.draw(st.booleans()),
                pad=pad,
            )
        )
    expected = serialize(tensors)
    with tempfile.TemporaryDirectory() as tmp:
        digests = []
        for i, raw in enumerate(layouts):
            path = Path(tmp) / f"{i}.safetensors"
            path.write_bytes(raw)
            canonical = _canonical(path)
            assert canonical == expected
            digests.append(_sha(canonical))
        assert digests[0] == digests[1]

        # Every data byte counts: flip one and the digest changes.
        raw = bytearray(layouts[0])
        (length,) = struct.unpack("<Q", raw[:8])
        if len(raw) > 8 + length:
            position = data.draw(st.integers(8 + length, len(raw) - 1))
            raw[position] ^= 0x01
            flipped = Path(tmp) / "flipped.safetensors"
            flipped.write_bytes(bytes(raw))
            assert _sha(_canonical(flipped)) != digests[0]

    # Canonical bytes are a valid file: header 8-byte aligned, fixed metadata, readable by safetensors itself.
    (length,) = struct.unpack("<Q", expected[:8])
    assert length % 8 == 0
    header = json.loads(expected[8 : 8 + length])
    assert header.pop("__metadata__") == CANONICAL_METADATA
    assert list(header) == sorted(header)
    loaded = load(expected)
    assert set(loaded) == set(tensors)
    for name, (dtype, shape, raw_data) in tensors.items():
        assert loaded[name].dtype == _TORCH[dtype]
        assert tuple(loaded[name].shape) == shape
        assert loaded[name].reshape(-1).view(torch.uint8).numpy().tobytes() == raw_data


@settings(max_examples=25, deadline=None)
@given(tensors=_tensor_sets(), metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_files_from_the_real_writer_canonicalise_to_serialize(tensors, metadata):
    """safetensors' own writer (which orders data by dtype alignment, then name) agrees with serialize()."""
    torch_tensors = {
        name: torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(_TORCH[dtype]).reshape(shape)
        if raw
        else torch.empty(shape, dtype=_TORCH[dtype])
        for name, (dtype, shape, raw) in tensors.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "real.safetensors"
        path.write_bytes(save(torch_tensors, metadata=metadata or None))
        assert _canonical(path) == serialize(tensors)


def test_canonicalising_is_idempotent(tmp_path):
    tensors = {"b": ("F32", (2, 3), bytes(range(24))), "a": ("I64", (1,), b"\x01" * 8), "e": ("U8", (0,), b"")}
    path = tmp_path / "c.safetensors"
    path.write_bytes(serialize(tensors))
    assert _canonical(path) == path.read_bytes()
    assert read_header(path).metadata == CANONICAL_METADATA


def test_metadata_is_read(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_safetensors({"a": ("U8", (1,), b"x")}, metadata={"ss_base": "sd1.5", "format": "pt"}))
    header = read_header(path)
    assert header.metadata == {"ss_base": "sd1.5", "format": "pt"}
    assert header.tensors["a"].nbytes == 1 and header.data_bytes == 1


def test_canonical_header_offsets():
    prefix, offsets = canonical_header({"z": ("F16", (3,)), "a": ("F32", (2, 2))})
    assert offsets == {"a": 0, "z": 16}
    assert len(prefix) % 8 == 0


def test_serialize_refuses_wrong_byte_count():
    with pytest.raises(AdapterFormatError, match="'a'"):
        serialize({"a": ("F32", (2,), b"\x00" * 7)})


def test_file_changed_after_reading_its_header(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(serialize({"a": ("F32", (4,), b"\x00" * 16)}))
    header = read_header(path)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(AdapterFormatError, match="changed"):
        _canonical_with(path, header)


def _canonical_with(path, header):
    return b"".join(iter_canonical_bytes(path, header))


# --- malformed files --------------------------------------------------------------------------------------------


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _with_data(doc, data_size):
    return header_bytes(doc) + b"\x00" * data_size


_MALFORMED = {
    "0-byte": (b"", "too short"),
    "2-byte": (b"\r\n", "too short"),
    "7-byte": (b"\x01" * 7, "too short"),
    "huge header length": (struct.pack("<Q", 2**63) + b"{}", "header claims"),
    "header past MAX": (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "header claims"),
    "header longer than file": (struct.pack("<Q", 100) + b'{"a": 1}', "header claims"),
    "truncated data": (_with_data({"a": _entry()}, 5), "truncated or padded"),
    "padded data": (_with_data({"a": _entry()}, 12), "truncated or padded"),
    "non-JSON header": (header_bytes(b"this is not json"), "not valid JSON"),
    "non-UTF-8 header": (header_bytes(b'{"\xff": 1}'), "not valid JSON"),
    "deeply nested header": (header_bytes(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    "array header": (header_bytes([1, 2]), "not a JSON object"),
    "duplicate keys": (header_bytes(b'{"a": {}, "a": {}}'), "duplicate key 'a'"),
    "duplicate inner keys": (
        header_bytes(b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}'),
        "duplicate key 'dtype'",
    ),
    "overlapping offsets": (
        _with_data({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, 12),
        "overlapping or missing",
    ),
    "gap between tensors": (
        _with_data({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}, 20),
        "overlapping or missing",
    ),
    "not starting at 0": (_with_data({"a": _entry(offsets=(4, 12))}, 12), "overlapping or missing"),
    "byte count mismatch": (_with_data({"a": _entry(shape=(3,), offsets=(0, 8))}, 8), "needs 12"),
    "dtype/size mismatch": (_with_data({"a": _entry(dtype="F64", offsets=(0, 8))}, 8), "needs 16"),
    "unknown dtype": (_with_data({"a": _entry(dtype="F4")}, 8), "unsupported dtype"),
    "dtype not a string": (_with_data({"a": _entry(dtype=["F32"])}, 8), "unsupported dtype"),
    "negative shape": (_with_data({"a": _entry(shape=(-2,))}, 8), "invalid shape"),
    "boolean shape": (_with_data({"a": _entry(shape=(True, 2))}, 8), "invalid shape"),
    "float shape": (_with_data({"a": _entry(shape=(2.0,))}, 8), "invalid shape"),
    "shape beyond u64": (_with_data({"a": _entry(shape=(2**64, 0), offsets=(0, 0))}, 0), "invalid shape"),
    "reversed offsets": (_with_data({"a": _entry(offsets=(8, 0))}, 8), "invalid data_offsets"),
    "three offsets": (_with_data({"a": _entry(offsets=(0, 4, 8))}, 8), "invalid data_offsets"),
    "entry not an object": (_with_data({"a": [1, 2]}, 0), "no dtype/shape/data_offsets"),
    "metadata not strings": (_with_data({"__metadata__": {"n": 1}, "a": _entry()}, 8), "__metadata__"),
    "metadata a list": (_with_data({"__metadata__": ["x"], "a": _entry()}, 8), "__metadata__"),
    "lone surrogate name": (
        header_bytes(b'{"\\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}'),
        "UTF-8",
    ),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_malformed_files_are_refused_naming_the_file(case, tmp_path):
    content, words = _MALFORMED[case]
    path = tmp_path / "weird name.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterFormatError) as info:
        read_header(path)
    message = str(info.value)
    assert_one_line(message)
    assert message.startswith(f"{path}: "), message
    assert words in message, message
    assert len(message) < 300


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_refusals_agree_with_the_reference_reader(case):
    """Each case above is one the Rust reader refuses too: adapterkit is not stricter than the format, so a
    file PEFT would load is never turned away. (Its error types vary, hence the broad catch.)"""
    with pytest.raises(Exception):  # noqa: B017
        load(_MALFORMED[case][0])


def test_missing_file_and_directory(tmp_path):
    for path in (tmp_path / "absent.safetensors", tmp_path):
        with pytest.raises(AdapterFormatError) as info:
            read_header(path)
        assert_one_line(str(info.value))
        assert str(path) in str(info.value)


def test_null_metadata_and_empty_file_are_valid(tmp_path):
    """Accepted by the Rust reader, so accepted here: a null __metadata__ and a header with no tensors."""
    path = tmp_path / "a.safetensors"
    path.write_bytes(_with_data({"__metadata__": None, "a": _entry()}, 8))
    assert read_header(path).metadata == {}
    load(path.read_bytes())
    path.write_bytes(header_bytes({}))
    assert read_header(path).tensors == {}


def test_parse_header_checks_against_the_given_size():
    raw = json.dumps({"a": _entry()}).encode()
    assert parse_header(raw, data_size=8, source="x").data_start == 8 + len(raw)
    with pytest.raises(AdapterFormatError, match=r"^x: "):
        parse_header(raw, data_size=9, source="x")
