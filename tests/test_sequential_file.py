"""SequentialFile: the bytes written are the bytes asked for, with O_DIRECT or without."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest

from adapterkit.files import sequential as sequential_file
from adapterkit.files.sequential import SequentialFile


@pytest.fixture(autouse=True)
def small_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three alignment units per staging buffer: every test crosses many buffer boundaries."""
    monkeypatch.setattr(sequential_file, "_STAGING", 3 * 4096)


def write_pattern(out: SequentialFile, source: Path, seed: int) -> bytes:
    """Writes and copies of awkward sizes; returns what the file must hold."""
    rng = random.Random(seed)
    src = source.read_bytes()
    expected = bytearray()
    fd = os.open(source, os.O_RDONLY)
    try:
        for _ in range(40):
            if rng.random() < 0.3:
                offset = rng.randrange(len(src))
                length = rng.randrange(min(30_000, len(src) - offset) + 1)
                out.copy_from(fd, offset, length, "source")
                expected += src[offset : offset + length]
            else:
                data = rng.randbytes(rng.choice([0, 1, 7, 4095, 4096, 4097, 12_287, 20_000]))
                out.write(data)
                expected += data
    finally:
        os.close(fd)
    out.finish()
    out.sync_and_close()
    return bytes(expected)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_the_file_holds_exactly_what_was_written(tmp_path: Path, direct: bool, seed: int) -> None:
    source = tmp_path / "source"
    source.write_bytes(random.Random(99).randbytes(100_000))
    out = SequentialFile(tmp_path / "out", direct=direct)
    expected = write_pattern(out, source, seed)
    assert (tmp_path / "out").read_bytes() == expected


def test_direct_io_is_used_where_the_file_system_takes_it(tmp_path: Path) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    out = SequentialFile(tmp_path / "out")
    try:
        probe = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        assert not out.direct  # tmpfs and the like: buffered, and still correct (previous test)
    else:
        os.close(probe)
        assert out.direct
    out.close()


@pytest.mark.parametrize("size", [50_000, 5_000])  # refused in the middle of the file, or in finish()
def test_a_file_system_that_refuses_the_first_direct_write_gets_a_buffered_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    out = SequentialFile(tmp_path / "out")
    if not out.direct:
        out.close()
        pytest.skip("this file system does not take O_DIRECT at all")
    real, calls = os.write, []

    def refuse_after_a_part(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, memoryview(data)[:4096])  # a partial write first...
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")  # ...then the refusal
        return real(fd, data)

    monkeypatch.setattr(os, "write", refuse_after_a_part)
    data = random.Random(5).randbytes(size)
    out.write(data[: size // 2])
    out.write(data[size // 2 :])
    out.finish()
    out.sync_and_close()
    assert not out.direct
    assert (tmp_path / "out").read_bytes() == data


def test_a_file_system_without_direct_io_gets_a_buffered_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    real = fcntl.fcntl

    def no_direct(fd: int, command: int, arg: int = 0) -> int:
        if command == fcntl.F_SETFL and arg & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", no_direct)
    out = SequentialFile(tmp_path / "out")
    assert not out.direct
    out.write(b"abc")
    out.finish()
    out.sync_and_close()
    assert (tmp_path / "out").read_bytes() == b"abc"


def test_a_failing_disk_write_is_raised_and_close_still_releases_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = SequentialFile(tmp_path / "out")
    if not out.direct:
        out.close()
        pytest.skip("this file system does not take O_DIRECT at all")

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)  # the background writes, after the first synchronous one
    with pytest.raises(OSError, match="No space left"):
        for _ in range(20):
            out.write(b"x" * 5000)
        out.finish()
    out.close()
    out.close()  # idempotent
    assert out.fd == -1


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = SequentialFile(tmp_path / "out")

    def full(fd: int, data: memoryview | bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sequential_file, "write_all", full)
    monkeypatch.setattr(os, "write", lambda *args: full(*args))
    with pytest.raises(OSError, match="No space left"):
        for _ in range(10):
            out.write(b"x" * 5000)
        out.finish()
    out.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_source_that_ends_early_is_a_clean_error(tmp_path: Path, direct: bool) -> None:
    (tmp_path / "source").write_bytes(b"abc")
    fd = os.open(tmp_path / "source", os.O_RDONLY)
    out = SequentialFile(tmp_path / "out", direct=direct)
    try:
        with pytest.raises(EOFError, match=r"^shard: the file ended early"):
            out.copy_from(fd, 0, 10, "shard")
    finally:
        os.close(fd)
        out.close()


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "out").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        SequentialFile(tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"mine"
