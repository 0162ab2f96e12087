"""A new file written front to back, fast and durably: the merge's output shards (no torch here).

Where the file system allows it, bytes go to disk with ``O_DIRECT`` through an aligned staging
buffer: the disk reads them straight from that buffer while the CPU computes the next blocks, so
writing costs almost no CPU, the final ``fsync`` has nothing left to wait for, and a merge of a
model larger than RAM does not push every other file out of the page cache. Elsewhere (tmpfs,
macOS, file systems that refuse ``O_DIRECT``) writes are buffered, with write-back started every
few tens of MB so that the final ``fsync`` finds little to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from adapterkit.files.fsutil import write_all

__all__ = ["SequentialFile", "copy_range", "pread_exact"]

#: Offsets, lengths and addresses of ``O_DIRECT`` writes are multiples of this (the largest common
#: logical block size).
_ALIGN = 4096
#: The staging buffer: bytes are written to disk this many at a time.
_STAGING = 8 << 20
#: Bytes between two requests to start writing back a buffered file.
_WRITEBACK_EVERY = 1 << 25
_SYNC_FILE_RANGE_WRITE = 2
#: Chunk of a copy through user space.
_CHUNK = 1 << 24


def pread_exact(fd: int, into: memoryview, offset: int, what: str) -> None:
    """Fill ``into`` from ``fd`` at ``offset``; ``what`` names the bytes in the error if the file is short."""
    done = 0
    while done < len(into):
        try:
            got = os.preadv(fd, [into[done:]], offset + done)
        except OSError as exc:
            raise OSError(exc.errno, f"{what}: cannot read ({exc.strerror or type(exc).__name__})") from None
        if got == 0:
            raise EOFError(f"{what}: the file ended early (it changed while being read)")
        done += got


def copy_range(src: int, dst: int, offset: int, length: int, what: str) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src`` to ``dst``'s position, in the kernel where it can."""
    done = 0
    while done < length:
        try:
            copied = os.copy_file_range(src, dst, length - done, offset + done)
        except (AttributeError, OSError):
            break  # not Linux, or across file systems the kernel cannot copy between: copy through user space
        if copied == 0:
            raise EOFError(f"{what}: the file ended early (it changed while being read)")
        done += copied
    while done < length:
        chunk = os.pread(src, min(_CHUNK, length - done), offset + done)
        if not chunk:
            raise EOFError(f"{what}: the file ended early (it changed while being read)")
        write_all(dst, chunk)
        done += len(chunk)


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)``, or None where it is missing.

    It starts writing a range of dirty pages to disk without waiting for them.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a hint: a failure only means no head start

    return start


_WRITEBACK = _writeback_starter()


class SequentialFile:
    """``path``, created (it must not exist) and written front to back by one thread at a time.

    ``direct=False`` (or a file system without ``O_DIRECT``) writes through the page cache. Call
    :meth:`finish` after the last byte, then :meth:`sync_and_close`; :meth:`close` abandons it and
    may be called any number of times, from any state.

    With ``O_DIRECT`` there are two staging buffers: while the disk takes one (on a thread of
    this file's own, which waits for the device with the GIL released, writing at known offsets),
    the caller fills the other. The first write goes synchronously: a file system that refuses
    ``O_DIRECT`` writes says so there, and the file carries on through the page cache.
    """

    def __init__(self, path: Path, *, direct: bool = True) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.direct = False
        self.size = 0  # bytes accepted so far
        self._hinted = 0  # buffered: bytes handed to write-back
        self._staging: list[mmap.mmap] = []
        self._writes: list[Future[None] | None] = [None, None]
        self._current = 0
        self._pending = 0  # bytes in the current staging buffer
        self._on_disk = 0  # bytes handed to the disk before the current staging buffer
        self._disk: ThreadPoolExecutor | None = None
        self._probed = False  # whether one O_DIRECT write went through
        try:
            if direct and _enable_direct_io(self.fd):
                self._staging = [mmap.mmap(-1, _STAGING) for _ in range(2)]  # page-aligned
                self.direct = True
        except BaseException:
            self.close()
            raise

    def write(self, data: memoryview | bytes) -> None:
        data = memoryview(data).cast("B")
        self.size += len(data)
        while data:
            if not self.direct:  # from the start, or since the file system refused O_DIRECT
                write_all(self.fd, data)
                self._hint()
                return
            n = min(len(data), _STAGING - self._pending)
            self._staging[self._current][self._pending : self._pending + n] = data[:n]
            self._pending += n
            data = data[n:]
            if self._pending == _STAGING:
                self._flush()

    def copy_from(self, src: int, offset: int, length: int, what: str) -> None:
        """Append ``length`` bytes of ``src`` at ``offset``."""
        self.size += length
        while length:
            if not self.direct:
                copy_range(src, self.fd, offset, length, what)
                self._hint()
                return
            n = min(length, _STAGING - self._pending)
            with memoryview(self._staging[self._current]) as view:
                pread_exact(src, view[self._pending : self._pending + n], offset, what)
            self._pending += n
            offset += n
            length -= n
            if self._pending == _STAGING:
                self._flush()

    def finish(self) -> None:
        """Write what is staged (the last block padded to the alignment), then cut the file to its size."""
        if not self.direct:
            return
        padded = -(-self._pending // _ALIGN) * _ALIGN
        self._staging[self._current][self._pending : padded] = bytes(padded - self._pending)
        self._pending = padded
        self._flush()
        for i in range(2):
            self._wait(i)
        os.ftruncate(self.fd, self.size)
        self._release()

    def sync_and_close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            self.close()

    def close(self) -> None:
        if self._disk is not None:
            self._disk.shutdown(wait=True)  # a write in flight finishes (or fails) before its buffer goes
            self._disk = None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        self._release()

    def _release(self) -> None:
        """Unmap the staging buffers; one still pinned (by an exception's traceback) goes with its last user."""
        for buffer in self._staging:
            with contextlib.suppress(BufferError):
                buffer.close()
        self._staging = []

    def _wait(self, index: int) -> None:
        write, self._writes[index] = self._writes[index], None
        if write is not None:
            write.result()

    def _flush(self) -> None:
        """Hand the current buffer (whole aligned blocks) to the disk and switch to the other one."""
        staging, length, offset = self._staging[self._current], self._pending, self._on_disk
        if not self._probed:
            written = _probe_write(self.fd, staging, length)
            if written is not None:  # refused: the rest of this buffer, and everything after, buffered
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                with memoryview(staging) as view:
                    write_all(self.fd, view[written:length])
                self.direct = False
                self._release()
                return
            self._probed = True
        else:
            if self._disk is None:
                self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterkit-disk")
            self._writes[self._current] = self._disk.submit(_pwrite_all, self.fd, staging, length, offset)
        self._on_disk += length
        self._current = 1 - self._current
        self._pending = 0
        self._wait(self._current)  # the buffer about to be filled must be on disk first

    def _hint(self) -> None:
        if _WRITEBACK is not None and self.size - self._hinted >= _WRITEBACK_EVERY:
            _WRITEBACK(self.fd, self._hinted, self.size - self._hinted)
            self._hinted = self.size


def _enable_direct_io(fd: int) -> bool:
    """Switch ``fd`` to O_DIRECT where the platform and the file system allow it."""
    o_direct = getattr(os, "O_DIRECT", 0)
    if not o_direct:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | o_direct)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # this file system does not do O_DIRECT
            return False
        raise
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & o_direct)


def _probe_write(fd: int, staging: mmap.mmap, length: int) -> int | None:
    """Write ``staging[:length]`` at the file's position; None when done, else how much went before EINVAL."""
    done = 0
    with memoryview(staging) as view:
        while done < length:
            try:
                done += os.write(fd, view[done:length])
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                return done
    return None


def _pwrite_all(fd: int, staging: mmap.mmap, length: int, offset: int) -> None:
    """Write ``staging[:length]`` at ``offset`` (no memoryview of the buffer outlives the call, even on failure)."""
    done = 0
    with memoryview(staging) as view:
        while done < length:
            try:
                done += os.pwrite(fd, view[done:length], offset + done)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror) from None  # drop the traceback that pins the buffer
