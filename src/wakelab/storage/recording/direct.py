"""Shards written with O_DIRECT through two aligned staging buffers, bypassing the page cache."""

from __future__ import annotations

import concurrent.futures
import errno
import mmap
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .format import _Block, _remove_quietly, _safetensors_header, _tensor_bytes, _write_safetensors

_DIRECT_ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length aligned to the device's block size

_STAGING_BYTES = 8 * 2**20


class _DirectFile:
    """A file written sequentially with ``O_DIRECT`` through two page-aligned staging buffers.

    Buffered writes plus fsync run at the page cache's flush speed (a fraction of ``dd oflag=direct``) and fill the
    cache with data nobody rereads soon; direct writes go to the disk at its own speed. Staging makes any byte
    stream aligned; while one buffer is being written (by a helper thread, the syscall releases the GIL) the next
    one fills. The last block is padded and the file truncated back to its real length.
    """

    def __init__(self, path: Path, staging: tuple[mmap.mmap, mmap.mmap]) -> None:
        self._fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0), 0o644
        )
        self._bufs = [memoryview(m) for m in staging]
        self._arrs = [np.frombuffer(m, dtype=np.uint8) for m in staging]  # numpy copies release the GIL
        self._pending: list[concurrent.futures.Future | None] = [None, None]
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wakelab-recording-io")
        self._current = 0
        self._fill = 0
        self.size = 0  # bytes given to write()
        self.written = 0  # bytes on disk (helper thread)

    def write(self, data: memoryview) -> None:
        data = np.frombuffer(data, dtype=np.uint8)
        pos, n = 0, len(data)
        while pos < n:
            arr = self._arrs[self._current]
            take = min(n - pos, len(arr) - self._fill)
            np.copyto(arr[self._fill : self._fill + take], data[pos : pos + take])
            self._fill += take
            pos += take
            if self._fill == len(arr):
                self._submit(self._fill)
        self.size += n

    def _submit(self, nbytes: int) -> None:
        current = self._current
        self._pending[current] = self._io.submit(self._write_all, self._bufs[current], nbytes)
        self._current, self._fill = 1 - current, 0
        self._wait(self._current)  # the other buffer is free once its write is done

    def _wait(self, which: int) -> None:
        pending, self._pending[which] = self._pending[which], None
        if pending is not None:
            pending.result()  # an OSError of the write surfaces here

    def _write_all(self, buf: memoryview, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            done += os.write(self._fd, buf[done:nbytes])
        self.written += nbytes

    def close(self) -> None:
        """Write what is staged, cut the padding off, fsync (the file's length and the disk's cache) and close."""
        try:
            if self._fill:
                padded = -(-self._fill // _DIRECT_ALIGN) * _DIRECT_ALIGN
                self._arrs[self._current][self._fill : padded] = 0
                self._submit(padded)
            self._wait(0)
            self._wait(1)
            os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        self._io.shutdown(wait=True)  # no write may still run when the descriptor closes
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_staging = threading.local()  # staging buffers per writing thread, reused for every shard


def _write_safetensors_direct(path: Path, blocks: Mapping[str, _Block], metadata: Mapping[str, str]) -> bool:
    """Write like ``_write_safetensors`` but with ``O_DIRECT``; False (nothing left behind) where the OS or file
    system does not do direct I/O (tmpfs, macOS), so the caller writes buffered instead."""
    if not hasattr(os, "O_DIRECT") or sys.byteorder != "little":
        return False
    if getattr(_staging, "buffers", None) is None:
        _staging.buffers = (mmap.mmap(-1, _STAGING_BYTES), mmap.mmap(-1, _STAGING_BYTES))  # page-aligned
    try:
        out = _DirectFile(path, _staging.buffers)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    try:
        out.write(memoryview(_safetensors_header(blocks, metadata)))
        for name, block in blocks.items():
            start = out.size
            for chunk in block.chunks:
                out.write(_tensor_bytes(chunk, block.dtype))
            if out.size - start != block.nbytes:
                raise RuntimeError(
                    f"internal error: tensor {name!r} got {out.size - start} bytes, its header says {block.nbytes}"
                )
        out.close()
    except OSError as exc:
        out.abort()
        if exc.errno == errno.EINVAL and out.written == 0:  # the file system refused direct writes outright
            _remove_quietly(path)
            return False
        raise
    except BaseException:
        out.abort()
        raise
    return True


def _save_shard(path: Path, blocks: Mapping[str, _Block], metadata: Mapping[str, str]) -> None:
    """Write one shard to ``path`` (a temporary name; the caller renames it). Tests replace this to fake a full disk."""
    if not _write_safetensors_direct(path, blocks, metadata):
        _write_safetensors(path, blocks, metadata)
