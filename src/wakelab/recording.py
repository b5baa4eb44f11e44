"""Per-step tensor recordings: a streaming, crash-safe writer and a lazy, memory-mapped reader.

A recording is a directory::

    run-42/
      index.json                  # what is in the directory and how far the writer got
      shard-00000.safetensors     # steps 0..K-1: one tensor [k, *shape] per field, plus ``steps`` (int64 [k])
      shard-00001.safetensors
      ...

Why this layout (the notebook it replaces kept every step in RAM and wrote one file at the end, so memory grew
~25 MiB a step and a crash lost the whole run):

* **Shards** bound the writer's memory to one shard plus a few queued steps, whatever the run length, and put
  every finished shard on disk as soon as it is full, so a crash loses at most the shard being built.
* **Atomic replace** (write ``.shard-N.safetensors.tmp``, fsync, ``os.replace``) means a shard file is either
  complete or absent: a reader never sees half a shard, even after ``kill -9`` or a full disk. ``index.json`` is
  rewritten the same way after every shard and only ever lists shards that are already complete, so it is always a
  valid description of the directory ("complete": false says the run was cut short).
* **One background thread** does the slow part (serialising, writing, fsync) so the training loop only pays for
  a device-to-host copy. A bounded queue between them gives back-pressure: if the disk is slower than training,
  ``append`` waits instead of piling steps up in memory. Host tensors may even be lent (``append(lend=True)``):
  a copier thread copies them while training goes on, and the caller waits (``wait_lent``) only before it next
  changes them; the recorder lends the live rows and Adam state that way.

The reader (:func:`open`) never loads a whole recording: it memory-maps shards with ``safetensors.safe_open`` and
reads only the steps (and rows) asked for. :func:`export_single_file` streams a recording into the old notebook's
single-file layout, and :func:`summary` describes one for ``wakelab recording info``.

The writer is fed by the training plugin; the reader is what the analysis code uses::

    with RecordingWriter(out, {"embeddings": FieldSpec((n, d), torch.bfloat16), "loss": FieldSpec((), torch.float32)},
                         token_ids=new_ids, meta={"run_id": run_id}) as rec:
        for step in ...:
            rec.append(step, {"embeddings": emb[new_ids], "loss": loss})

    with wakelab.recording.open(out) as rec:
        rows = rec["embeddings"][10:20, [3, 7]]      # steps 10..19 (positions), rows 3 and 7
        final = rec["embeddings"].at_step(500)       # by step number
"""

from __future__ import annotations

import atexit
import builtins
import collections
import concurrent.futures
import dataclasses
import errno
import functools
import json
import logging
import math
import mmap
import numbers
import os
import queue
import struct
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from wakelab.durable import fsync_dir
from wakelab.errors import WakelabError

__all__ = [
    "FORMAT",
    "VERSION",
    "FieldSpec",
    "FieldView",
    "Recording",
    "RecordingError",
    "RecordingWriter",
    "export_single_file",
    "open",
    "summary",
]

log = logging.getLogger(__name__)

FORMAT = "wakelab-recording"
VERSION = 1
INDEX_NAME = "index.json"
_SHARD_GLOB = "shard-*.safetensors"
_INDEX_TMP = ".index.json.tmp"
#: Reserved tensor name in every shard: the step numbers of the shard's rows.
_STEPS_KEY = "steps"
#: Open ``safe_open`` handles kept per reader; a long run has thousands of shards and file descriptors are finite.
_MAX_OPEN_SHARDS = 16
#: Old notebook single-file layout: recording field -> output key.
EXPORT_KEYS = {
    "embeddings": "embeddings",
    "grads": "grads",
    "exp_avg": "momentum",
    "exp_avg_sq": "variance",
    "logits": "logits",
    "loss": "losses",
}

# torch dtype <-> safetensors dtype code (the on-disk header needs the codes; export writes headers by hand).
_ST_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _ST_CODES[getattr(torch, _name)] = _code
_ST_DTYPES = {code: dtype for dtype, code in _ST_CODES.items()}


class RecordingError(WakelabError):
    """A recording that cannot be written or read as asked; the message says what happened and what is intact."""


# ----------------------------------------------------------------------------------------------------------------------
# Field specs and dtype names


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, *, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or dtype not in _ST_CODES:
        raise RecordingError(f"{where}: unknown or unsupported dtype {name!r}")
    return dtype


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """The shape and storage dtype of one field *per step*, e.g. ``FieldSpec((rows, d), torch.bfloat16)``.

    Shards store the field as ``[k, *shape]``. Tensors passed to :meth:`RecordingWriter.append` are converted to
    ``dtype`` (so a float32 master copy can be stored as bfloat16 at half the disk cost).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(s) for s in self.shape)
        except (TypeError, ValueError):
            raise RecordingError(f"FieldSpec shape must be a tuple of ints, got {self.shape!r}") from None
        if any(s < 0 for s in shape):
            raise RecordingError(f"FieldSpec shape must not have negative sizes, got {shape}")
        if not isinstance(self.dtype, torch.dtype) or self.dtype not in _ST_CODES:
            supported = ", ".join(sorted(_dtype_name(d) for d in _ST_CODES))
            raise RecordingError(f"FieldSpec dtype {self.dtype!r} cannot be stored; use one of: {supported}")
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes one step of this field takes on disk."""
        return self.numel * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": _dtype_name(self.dtype)}

    @classmethod
    def from_json(cls, obj: Any, *, where: str) -> FieldSpec:
        if not isinstance(obj, Mapping) or "shape" not in obj or "dtype" not in obj:
            raise RecordingError(f"{where}: a field must be {{'shape': [...], 'dtype': '...'}}, got {obj!r}")
        return cls(tuple(obj["shape"]), _dtype_from_name(obj["dtype"], where=where))


def _can_store(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether ``src`` converts to ``dst`` without silently dropping what kind of number it is.

    Float -> float (any precision) is the point of a storage dtype; ints/bools may widen into floats or ints; a float
    into an int field would truncate, and complex into real would drop the imaginary part, so both are refused.
    """
    if src == dst:
        return True
    if dst.is_complex:
        return True
    if src.is_complex:
        return False
    if dst.is_floating_point:
        return True
    if src.is_floating_point:
        return False
    if dst == torch.bool:
        return src == torch.bool
    return True  # int/bool -> int


# ----------------------------------------------------------------------------------------------------------------------
# Small durable-file helpers


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - nothing better to do while already failing
        log.warning("could not remove temporary file %s: %s", path, exc)


def _dump_json(obj: Any) -> str:
    """JSON with one top-level key (and one list item) per line: readable, yet token ids and flags stay compact."""
    if not isinstance(obj, dict):
        return json.dumps(obj) + "\n"
    lines = []
    for key, value in obj.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join(f"    {json.dumps(v)}" for v in value)
            lines.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` so that readers see the old file or the new one, never a torn one.

    tmp + fsync + ``os.replace``: a crash (or a full disk) mid-write leaves the previous index in place.
    """
    tmp = path.with_name(_INDEX_TMP if path.name == INDEX_NAME else f".{path.name}.tmp")
    data = _dump_json(obj).encode()
    try:
        with builtins.open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------------------------------
# Hand-written safetensors serialisation (streams tensors in; never builds the file in memory)


@dataclasses.dataclass
class _Block:
    """One tensor of a safetensors file to write: its dtype and shape, and chunks whose bytes, in order, are its data.

    Chunks are CPU tensors of ``dtype``; typically one per step (``[1, *shape]`` or ``[*shape]``) or one per shard.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Iterable[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _safetensors_header(blocks: Mapping[str, _Block], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, block in blocks.items():
        header[name] = {
            "dtype": _ST_CODES[block.dtype],
            "shape": list(block.shape),
            "data_offsets": [offset, offset + block.nbytes],
        }
        offset += block.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors' own writer does
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor, dtype: torch.dtype) -> memoryview:
    if t.dtype != dtype:
        raise RuntimeError(f"internal error: chunk of dtype {t.dtype} in a {dtype} tensor")
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _write_safetensors(path: Path, blocks: Mapping[str, _Block], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file by hand: u64-LE header length, JSON header, then each tensor's raw bytes in order.

    ``safetensors.torch.save_file`` needs every tensor in memory at once (and copies each to bytes first); this
    writes chunk by chunk, so an export bigger than RAM works and a shard is written without stacking its steps.
    The file is fsynced before returning so that a following ``os.replace`` publishes durable data.
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian; so is every supported host
        raise RecordingError("writing safetensors files needs a little-endian machine")
    with builtins.open(path, "wb") as fh:
        fh.write(_safetensors_header(blocks, metadata))
        for name, block in blocks.items():
            written = 0
            for chunk in block.chunks:
                data = _tensor_bytes(chunk, block.dtype)
                fh.write(data)
                written += data.nbytes
            if written != block.nbytes:
                raise RuntimeError(
                    f"internal error: tensor {name!r} got {written} bytes, its header says {block.nbytes}"
                )
        fh.flush()
        os.fsync(fh.fileno())


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


# ----------------------------------------------------------------------------------------------------------------------
# Writer


@dataclasses.dataclass(eq=False)
class _Step:
    step: int
    tensors: dict[str, torch.Tensor]
    flags: dict[str, bool]
    events: list[Any]  # torch.cuda.Event per source device; the writer waits on them before reading pinned buffers
    pinned: list[tuple[str, torch.Tensor]]  # pinned host buffers to hand back to the pool once written
    pooled: list[tuple[str, torch.Tensor]] = dataclasses.field(default_factory=list)  # host buffers, likewise
    ready: concurrent.futures.Future | None = None  # lent tensors being copied; the writer waits before reading


@dataclasses.dataclass
class _Stop:
    complete: bool


class _WriteFailure(Exception):
    """Internal: an OSError while writing ``target`` (a shard or the index)."""

    def __init__(self, target: str, cause: BaseException) -> None:
        super().__init__(target)
        self.target = target
        self.cause = cause


def _host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for host tensors; a plain memcpy when no conversion is needed.

    torch splits a multi-MiB copy across its intra-op threads; on a busy machine waiting for them costs tens of ms,
    where one thread copies the same bytes in well under one.
    """
    if src.device.type == "cpu" and src.dtype == dst.dtype and src.is_contiguous() and src.numel() == dst.numel():
        np.copyto(dst.reshape(-1).view(torch.uint8).numpy(), src.reshape(-1).view(torch.uint8).numpy())
    else:
        dst.copy_(src)


def _close_at_exit(ref: weakref.ref) -> None:
    writer = ref()
    if writer is not None and not writer.closed:
        try:
            writer.close(complete=False)
        except Exception as exc:  # pragma: no cover - interpreter is exiting; report and move on
            log.error("%s", exc)


class RecordingWriter:
    """Stream per-step tensors into a sharded recording directory (see the module docstring for the layout).

    ``fields`` fixes, per field, the per-step shape and storage dtype; every :meth:`append` must carry every field.
    ``steps_per_shard`` (K) steps go into each shard; ``queue_size`` steps may wait for the writer thread before
    ``append`` blocks. Writer-side memory is therefore at most ``queue_size + K + 1`` steps, however long the run.

    ``append`` is meant for one (training) thread. Use the writer as a context manager or call :meth:`close`: close
    writes the last partial shard and marks the recording complete. Leaving a ``with`` block by an exception still
    writes every appended step but leaves ``complete: false``, as does a process that exits without closing.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fields: Mapping[str, FieldSpec],
        *,
        token_ids: Sequence[int] | None = None,
        meta: Mapping[str, Any] | None = None,
        steps_per_shard: int = 10,
        queue_size: int = 4,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.fields = self._check_fields(fields)
        self.token_ids = None if token_ids is None else [int(t) for t in token_ids]
        self.meta = dict(meta or {})
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as exc:
            raise RecordingError(f"recording meta must be JSON-serialisable: {exc}") from None
        if int(steps_per_shard) < 1:
            raise RecordingError(f"steps_per_shard must be at least 1, got {steps_per_shard}")
        if int(queue_size) < 1:
            raise RecordingError(f"queue_size must be at least 1, got {queue_size}")
        self.steps_per_shard = int(steps_per_shard)
        self.queue_size = int(queue_size)

        self._prepare_directory(overwrite)

        # Shared between the training thread and the writer thread.
        self._lock = threading.Lock()
        self._held = 0  # steps copied by append and not yet written (queued + in the shard being built)
        self._failure: BaseException | None = None  # set by the writer thread; raised by append/close
        self._failure_reported = False
        self.stats = {
            "max_queued": 0,
            "max_held_steps": 0,
            "shards_written": 0,
            "steps_written": 0,
            "lent_wait_seconds": 0.0,
        }
        # Training-thread state.
        self._closed = False
        self._last_step: int | None = None
        self._pinned_pool: dict[str, collections.deque] = {name: collections.deque() for name in self.fields}
        # Host copies reuse written steps' buffers: a fresh multi-MiB buffer a step costs more in page faults than
        # the copy itself. At most queue_size + K + 1 per field exist, as before (see ``_prefill_one``).
        self._host_pool: dict[str, collections.deque] = {name: collections.deque() for name in self.fields}
        # Buffers made per field, pooled or in flight (under _lock: the training, copier and writer threads all
        # make them). The prefill stops at the bound: buffers made fresh before it ran count towards it.
        self._host_bound = self.queue_size + self.steps_per_shard + 1
        self._host_made: dict[str, int] = dict.fromkeys(self.fields, 0)
        self._prefilled = False  # writer thread: pools sized at the first step ...
        self._to_prefill: list[str] = []  # ... a buffer at a time, for these fields, up to the bound
        self._copier: concurrent.futures.ThreadPoolExecutor | None = None  # copies lent tensors (created on first use)
        self._lent: concurrent.futures.Future | None = None  # the last lent step's copy
        # Writer-thread state (the index and the shard being built belong to the writer thread once it runs).
        self._shards: list[dict[str, Any]] = []
        self._flags: dict[str, list[int]] = {}
        self._indexed_last_step: int | None = None
        self._building: list[_Step] = []

        try:
            self._write_index(complete=False)
        except OSError as exc:
            raise RecordingError(f"cannot create recording at {self.path}: {exc.strerror or exc}") from None

        self._queue: queue.Queue = queue.Queue(maxsize=self.queue_size)
        self._thread = threading.Thread(target=self._run, name="wakelab-recording-writer", daemon=True)
        self._thread.start()
        # The thread is a daemon so a crashed trainer is not kept alive by it; so flush at interpreter exit instead.
        self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._atexit)

    # -- setup ---------------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_fields(fields: Mapping[str, FieldSpec]) -> dict[str, FieldSpec]:
        if not isinstance(fields, Mapping) or not fields:
            raise RecordingError("a recording needs at least one field, e.g. {'embeddings': FieldSpec((n, d), dtype)}")
        out: dict[str, FieldSpec] = {}
        for name, spec in fields.items():
            if not isinstance(name, str) or not name or name == _STEPS_KEY or name.startswith("__"):
                raise RecordingError(f"field name {name!r} is not allowed ('{_STEPS_KEY}' and '__*' are reserved)")
            if isinstance(spec, tuple) and len(spec) == 2:
                spec = FieldSpec(*spec)
            if not isinstance(spec, FieldSpec):
                raise RecordingError(f"field {name!r}: expected a FieldSpec(shape, dtype), got {spec!r}")
            out[name] = spec
        return out

    def _prepare_directory(self, overwrite: bool) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RecordingError(f"cannot record into {path}: it exists and is not a directory")
        if path.is_dir():
            index = path / INDEX_NAME
            shards = sorted(path.glob(_SHARD_GLOB))
            if (index.exists() or shards) and not overwrite:
                what = INDEX_NAME if index.exists() else f"{len(shards)} shard file(s)"
                raise RecordingError(
                    f"{path} already holds a recording ({what}); choose another directory or pass overwrite=True"
                )
            if overwrite:
                for old in [index, path / _INDEX_TMP, *shards, *path.glob(".shard-*.safetensors.tmp")]:
                    _remove_quietly(old)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecordingError(f"cannot create recording directory {path}: {exc.strerror or exc}") from None

    # -- training thread -----------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def append(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        flags: Mapping[str, bool] | None = None,
        *,
        lend: bool = False,
    ) -> None:
        """Record ``tensors`` (one per field) for optimizer step ``step``; steps must strictly increase.

        Copies the tensors right away (the caller may change them as soon as this returns) and hands the copies to
        the writer thread. Blocks while ``queue_size`` steps are already waiting: memory stays flat and the
        slowdown is visible rather than a growing heap. ``flags`` marks this step, e.g.
        ``{"optimizer_state_missing": True}``; steps with a true flag are listed in the index.

        ``lend=True`` lends the host (CPU) tensors instead of copying them here: a helper thread copies (and
        converts) them while the caller goes on, and the caller must call :meth:`wait_lent` before it changes any
        of them. A recorder that hands over live parameters and Adam state this way pays nothing for the copy as
        long as it finishes before the next optimizer step. Device tensors are copied here either way: their
        copy is queued on the device's stream, which already orders it before any later change.

        Raises :class:`RecordingError` for a bad step/field/shape/dtype, after :meth:`close`, or once the writer
        thread has failed (e.g. disk full): that message says which shards are intact.
        """
        self._raise_failure()
        if self._closed:
            raise RecordingError(f"append(step={step}) after the recording at {self.path} was closed")
        step = self._check_step(step)
        flag_values = self._check_flags(step, flags)
        self.wait_lent()  # one lent step at a time, so a caller's wait_lent covers every earlier append
        item, lent = self._copy_step(step, self._check_tensors(step, tensors), flag_values, lend=lend)
        ready = item.ready  # read before the writer thread may take the item
        with self._lock:
            self._held += 1
            self.stats["max_held_steps"] = max(self.stats["max_held_steps"], self._held)
        self._put(item)
        self.stats["max_queued"] = max(self.stats["max_queued"], self._queue.qsize())
        self._last_step = step
        if lent:
            # Last, so the copier thread does not contend with this one for the interpreter while it still works.
            if self._copier is None:
                self._copier = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="wakelab-recording-copy"
                )
            self._lent = ready
            self._copier.submit(self._copy_and_signal, item, lent, ready)

    def wait_lent(self) -> None:
        """Return once the tensors lent by the last ``append(..., lend=True)`` are copied (at once when none are).

        A failed copy does not raise here: like a failed write, it stops the recording and the next ``append`` or
        ``close`` says why.
        """
        pending, self._lent = self._lent, None
        if pending is None or pending.done():
            return
        started = time.perf_counter()
        concurrent.futures.wait([pending])
        self.stats["lent_wait_seconds"] += time.perf_counter() - started

    def _check_step(self, step: Any) -> int:
        if isinstance(step, bool):
            raise RecordingError(f"append(step={step!r}): step must be an int")
        try:
            step = int(step.item() if isinstance(step, torch.Tensor) else step.__index__())
        except (AttributeError, TypeError, ValueError, RuntimeError):
            raise RecordingError(f"append(step={step!r}): step must be an int") from None
        if self._last_step is not None and step <= self._last_step:
            raise RecordingError(
                f"append(step={step}): steps must strictly increase; the previous step was {self._last_step}"
            )
        return step

    @staticmethod
    def _check_flags(step: int, flags: Mapping[str, bool] | None) -> dict[str, bool]:
        if flags is None:
            return {}
        if not isinstance(flags, Mapping):
            raise RecordingError(f"append(step={step}): flags must be a dict of name -> bool, got {flags!r}")
        out = {}
        for name, value in flags.items():
            if not isinstance(name, str) or not name:
                raise RecordingError(f"append(step={step}): flag names must be non-empty strings, got {name!r}")
            out[name] = bool(value)
        return out

    def _check_tensors(self, step: int, tensors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if not isinstance(tensors, Mapping):
            raise RecordingError(f"append(step={step}): tensors must be a dict of field -> tensor")
        unknown = [k for k in tensors if k not in self.fields]
        if unknown:
            raise RecordingError(
                f"append(step={step}): unknown field {unknown[0]!r}; this recording's fields are "
                f"{', '.join(self.fields)}"
            )
        missing = [k for k in self.fields if k not in tensors]
        if missing:
            raise RecordingError(
                f"append(step={step}): missing field {missing[0]!r}; every step must carry every field "
                f"(pass zeros and a flag, e.g. flags={{'optimizer_state_missing': True}}, when a value does not exist)"
            )
        out = {}
        for name, spec in self.fields.items():
            value = tensors[name]
            if not isinstance(value, torch.Tensor):
                if isinstance(value, (numbers.Number, np.ndarray, np.generic)) and not isinstance(value, bool):
                    value = torch.as_tensor(np.asarray(value))  # a Python float stays float64 until converted
                else:
                    raise RecordingError(
                        f"append(step={step}): field {name!r} must be a tensor, got {type(value).__name__}"
                    )
            if tuple(value.shape) != spec.shape:
                raise RecordingError(
                    f"append(step={step}): field {name!r} has shape {tuple(value.shape)}, expected {spec.shape}"
                )
            if not _can_store(value.dtype, spec.dtype):
                raise RecordingError(
                    f"append(step={step}): field {name!r} is {_dtype_name(value.dtype)}, which cannot be stored "
                    f"as {_dtype_name(spec.dtype)} without losing information"
                )
            out[name] = value
        return out

    def _copy_step(
        self, step: int, tensors: dict[str, torch.Tensor], flags: dict[str, bool], *, lend: bool = False
    ) -> tuple[_Step, dict[str, torch.Tensor]]:
        """Take a private copy of this step's tensors, off the device, in the storage dtype.

        On CUDA: convert on the device (less to transfer when storing bf16), copy non-blocking into a pinned host
        buffer and record an event; the writer thread waits on the event, so the training thread never stalls on
        the transfer. Pinned buffers are recycled (allocating pinned memory is slow). Elsewhere: a plain copy,
        here or (``lend``) on the copier thread: those tensors are returned, and ``item.ready`` is set once copied.
        """
        copies: dict[str, torch.Tensor] = {}
        pinned: list[tuple[str, torch.Tensor]] = []
        pooled: list[tuple[str, torch.Tensor]] = []
        lent: dict[str, torch.Tensor] = {}
        cuda_devices: list[torch.device] = []
        for name, value in tensors.items():
            spec = self.fields[name]
            src = value.detach()
            if src.device.type == "cuda":
                if src.dtype != spec.dtype:
                    src = src.to(spec.dtype)
                pool = self._pinned_pool[name]
                try:
                    buf = pool.pop()
                except IndexError:
                    buf = torch.empty(spec.shape, dtype=spec.dtype, pin_memory=True)
                buf.copy_(src, non_blocking=True)
                copies[name] = buf
                pinned.append((name, buf))
                if src.device not in cuda_devices:
                    cuda_devices.append(src.device)
            elif lend:
                lent[name] = src
            else:
                copies[name] = self._pool_copy(name, src)
                pooled.append((name, copies[name]))
        events = []
        for device in cuda_devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        item = _Step(step, copies, flags, events, pinned, pooled)
        if lent:
            item.ready = concurrent.futures.Future()
        return item, lent

    def _pool_copy(self, name: str, src: torch.Tensor) -> torch.Tensor:
        """``src`` copied into a host buffer of the field's storage dtype, a recycled one when the pool has one."""
        spec = self.fields[name]
        try:
            buf = self._host_pool[name].pop()
        except IndexError:
            buf = torch.empty(spec.shape, dtype=spec.dtype)
            with self._lock:
                self._host_made[name] += 1
        _host_copy(buf, src)
        return buf

    def _copy_and_signal(self, item: _Step, lent: dict[str, torch.Tensor], ready: concurrent.futures.Future) -> None:
        """Copier thread: copy, then settle ``ready`` whatever happens (the writer and ``wait_lent`` wait on it)."""
        ready.set_running_or_notify_cancel()
        try:
            self._copy_lent(item, lent)
        except BaseException as exc:  # noqa: BLE001 - the writer thread fails the recording with it
            ready.set_exception(exc)
        else:
            ready.set_result(None)

    def _copy_lent(self, item: _Step, lent: dict[str, torch.Tensor]) -> None:
        """The lent tensors' copies join the step; the writer reads them once the step's ``ready`` is set."""
        for name, src in lent.items():
            buf = self._pool_copy(name, src)
            item.tensors[name] = buf
            item.pooled.append((name, buf))

    def _put(self, item: _Step | _Stop) -> None:
        # Block for back-pressure, but wake up now and then: a writer thread that died must not hang training.
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_failure()
                if not self._thread.is_alive():  # pragma: no cover - the thread catches everything
                    raise RuntimeError(f"the recording writer thread for {self.path} has died") from None

    def _raise_failure(self) -> None:
        failure = self._failure
        if failure is None:
            return
        self._failure_reported = True
        if isinstance(failure, RecordingError):
            raise RecordingError(str(failure)) from None
        raise RuntimeError(f"recording writer thread failed at {self.path}: {failure!r}") from failure

    def close(self, complete: bool = True) -> None:
        """Write the last (partial) shard, mark the index complete and stop the writer thread. Idempotent.

        ``complete=False`` writes every appended step but leaves ``"complete": false`` (used when the run itself
        failed). Raises :class:`RecordingError` if the writer thread failed and that was not reported yet.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        stop = _Stop(bool(complete))
        while self._thread.is_alive():  # the writer thread keeps draining even after a failure, so this returns
            try:
                self._queue.put(stop, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._lent = None
        if self._copier is not None:
            self._copier.shutdown(wait=True)
        if self._failure is not None and not self._failure_reported:
            self._raise_failure()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close(complete=False)
        except (RecordingError, RuntimeError) as close_exc:  # don't mask the exception that is already propagating
            log.error("%s", close_exc)

    # -- writer thread -------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if self._to_prefill and self._queue.empty():
                try:
                    self._prefill_one()  # only while no step waits: the disk is never kept waiting for it
                except Exception:  # noqa: BLE001 - e.g. out of memory: copies then take fresh buffers as needed
                    self._to_prefill = []
                continue
            item = self._queue.get()
            if isinstance(item, _Stop):
                if self._failure is None:
                    try:
                        self._finish(item.complete)
                    except BaseException as exc:  # noqa: BLE001 - surfaced to the training thread
                        self._fail(exc)
                return
            if self._failure is not None:
                self._release([item])  # failed: keep draining so append never blocks on a full queue
                continue
            try:
                self._consume(item)
            except BaseException as exc:  # noqa: BLE001 - surfaced to the training thread
                self._fail(exc)
                self._release(self._building + ([] if any(it is item for it in self._building) else [item]))
                self._building = []

    def _consume(self, item: _Step) -> None:
        if item.ready is not None:
            item.ready.result()  # a failed copy fails the recording like a failed write
            item.ready = None
        for event in item.events:
            event.synchronize()
        item.events = []
        if not self._prefilled:
            self._prefilled = True
            self._to_prefill = [name for name, _ in item.pooled]
        self._building.append(item)
        if len(self._building) == self.steps_per_shard:
            self._write_shard()

    def _prefill_one(self) -> None:
        """Add one buffer to a host pool, its pages touched (first touches cost more than the copies into them).

        The pools are filled after the first step, one buffer at a time whenever no step waits, so the recorder's
        memory is all there within its first steps (flat over the run) and no copy pays for fresh pages. Filling
        them all at once kept the writer thread ~0.3 s from the first shard. One byte a page: the kernel zeroes it.
        """
        name = self._to_prefill[-1]
        with self._lock:
            if self._host_made[name] >= self._host_bound:  # buffers made by copies count too
                self._to_prefill.pop()  # this field has its share
                return
            self._host_made[name] += 1
        spec = self.fields[name]
        buf = torch.empty(spec.shape, dtype=spec.dtype)
        buf.reshape(-1).view(torch.uint8).numpy()[:: mmap.PAGESIZE] = 0
        self._host_pool[name].append(buf)

    def _finish(self, complete: bool) -> None:
        if self._building:
            self._write_shard()
        try:
            self._write_index(complete=complete)
        except OSError as exc:
            raise _WriteFailure(INDEX_NAME, exc) from exc

    def _write_shard(self) -> None:
        items = self._building
        number = len(self._shards)
        name = f"shard-{number:05d}.safetensors"
        final = self.path / name
        tmp = self.path / f".{name}.tmp"
        k = len(items)
        steps = [it.step for it in items]
        blocks = {_STEPS_KEY: _Block(torch.int64, (k,), [torch.tensor(steps, dtype=torch.int64)])}
        for field, spec in self.fields.items():
            blocks[field] = _Block(spec.dtype, (k, *spec.shape), [it.tensors[field] for it in items])
        metadata = {
            "format": f"{FORMAT}-shard",
            "version": str(VERSION),
            "first_step": str(steps[0]),
            "last_step": str(steps[-1]),
        }
        try:
            _save_shard(tmp, blocks, metadata)
            os.replace(tmp, final)
        except OSError as exc:
            _remove_quietly(tmp)  # never leave a partial shard behind
            raise _WriteFailure(name, exc) from exc
        except BaseException:
            _remove_quietly(tmp)
            raise
        fsync_dir(self.path)

        self._shards.append({"file": name, "first_step": steps[0], "last_step": steps[-1], "count": k})
        for it in items:
            for flag, value in it.flags.items():
                marked = self._flags.setdefault(flag, [])
                if value:
                    marked.append(it.step)
        try:
            self._write_index(complete=False)
        except OSError as exc:
            raise _WriteFailure(INDEX_NAME, exc) from exc
        self.stats["shards_written"] += 1
        self.stats["steps_written"] += k
        self._building = []
        self._release(items)

    def _release(self, items: list[_Step]) -> None:
        for it in items:
            if it.ready is not None:  # dropped after a failure: its copy must be done before its buffers are reused
                concurrent.futures.wait([it.ready])
                it.ready = None
            for name, buf in it.pinned:
                self._pinned_pool[name].append(buf)
            for name, buf in it.pooled:
                if len(self._host_pool[name]) < self._host_bound:
                    self._host_pool[name].append(buf)
                else:
                    with self._lock:
                        self._host_made[name] -= 1
            it.pinned = []
            it.pooled = []
            it.tensors = {}
        with self._lock:
            self._held -= len(items)

    def _fail(self, exc: BaseException) -> None:
        last = self._indexed_last_step
        intact = f"completed shards up to step {last} are intact" if last is not None else "no shard had been completed"
        if isinstance(exc, _WriteFailure) and isinstance(exc.cause, OSError):
            cause = exc.cause
            if cause.errno == errno.ENOSPC:
                what = "disk full"
            elif cause.errno == getattr(errno, "EDQUOT", None):
                what = "disk quota exceeded"
            else:
                what = (cause.strerror or str(cause) or type(cause).__name__).lower()
            message = f"recording stopped: {what} writing {exc.target} at {self.path}; {intact}"
            self._failure = RecordingError(" ".join(message.split()))
        else:
            self._failure = exc
            log.error("recording writer thread failed at %s (%s): %r", self.path, intact, exc)

    def _index(self, complete: bool) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "fields": {name: spec.to_json() for name, spec in self.fields.items()},
            "token_ids": self.token_ids,
            "meta": self.meta,
            "steps_per_shard": self.steps_per_shard,
            "shards": list(self._shards),
            "steps_recorded": sum(s["count"] for s in self._shards),
            "complete": complete,
            "flags": {name: list(steps) for name, steps in self._flags.items()},
        }

    def _write_index(self, complete: bool) -> None:
        _write_json_atomic(self.path / INDEX_NAME, self._index(complete))
        self._indexed_last_step = self._shards[-1]["last_step"] if self._shards else None


# ----------------------------------------------------------------------------------------------------------------------
# Reader


def open(path: str | os.PathLike) -> Recording:  # noqa: A001 - ``wakelab.recording.open`` is the public name
    """Open a recording directory (or its ``index.json``) for lazy reading. Nothing but headers is read yet."""
    return Recording(path)


def _read_header(file: Path, index_path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header and check the file is as long as the header says (a torn copy is caught here)."""
    try:
        with builtins.open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise RecordingError(f"{file} (listed in {index_path}) is truncated: {size} bytes, no header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size, 100 * 2**20):
                raise RecordingError(f"{file} (listed in {index_path}) is truncated or not a safetensors file")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise RecordingError(f"{file.name} is listed in {index_path} but missing; the recording is damaged") from None
    except (ValueError, UnicodeDecodeError):
        raise RecordingError(f"{file} (listed in {index_path}) has a corrupt header") from None
    except OSError as exc:
        raise RecordingError(f"cannot read {file}: {exc.strerror or exc}") from None
    data_start = 8 + n
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise RecordingError(f"{file} (listed in {index_path}) has a corrupt header") from None
    if size < data_start + end:
        raise RecordingError(f"{file} (listed in {index_path}) is truncated: {size} bytes, expected {data_start + end}")
    if size > data_start + end:
        raise RecordingError(f"{file} (listed in {index_path}) is corrupt: {size - data_start - end} trailing bytes")
    return header, data_start


class Recording:
    """A recording opened for reading. Cheap to open; tensors are read on demand, shard by shard.

    ``steps`` is the array of recorded step numbers; indexing a field (``rec["embeddings"][i]``) is by *position*
    in that array (0..len-1); :meth:`FieldView.at_step` looks up a step number. Only shards listed in
    ``index.json`` are read, so a recording that is still being written, or whose writer was killed, reads as the
    shards it had finished. Returned tensors are private copies (never views of the memory map).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_file() and path.suffix == ".json":
            path = path.parent
        self.path = path
        index_path = path / INDEX_NAME
        self.index_path = index_path
        if not index_path.is_file():
            if not path.exists():
                raise RecordingError(f"no recording at {path}: it does not exist")
            raise RecordingError(f"{path} is not a wakelab recording: it has no {INDEX_NAME}")
        try:
            with builtins.open(index_path, "rb") as fh:
                index = json.load(fh)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordingError(f"{index_path} is not valid JSON: {exc}") from None
        except OSError as exc:
            raise RecordingError(f"cannot read {index_path}: {exc.strerror or exc}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise RecordingError(f"{index_path} is not a {FORMAT} index")
        if index.get("version") != VERSION:
            raise RecordingError(
                f"{index_path} has format version {index.get('version')!r}; this wakelab reads version {VERSION}"
            )
        try:
            self.fields: dict[str, FieldSpec] = {
                name: FieldSpec.from_json(spec, where=f"{index_path} field {name!r}")
                for name, spec in index["fields"].items()
            }
            shards = [dict(s) for s in index["shards"]]
            for s in shards:
                s["file"], s["count"] = str(s["file"]), int(s["count"])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise RecordingError(f"{index_path} is malformed: {exc!r}") from None
        self.index = index
        self.token_ids: list[int] | None = index.get("token_ids")
        self.meta: dict[str, Any] = dict(index.get("meta") or {})
        self.complete: bool = bool(index.get("complete"))
        self.flags: dict[str, list[int]] = {k: [int(s) for s in v] for k, v in (index.get("flags") or {}).items()}
        self.steps_per_shard: int | None = index.get("steps_per_shard")
        self.shards = shards

        steps = []
        self._offsets: list[tuple[int, dict[str, Any]]] = []  # per shard: (data start, header)
        for s in shards:
            name = s["file"]
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise RecordingError(f"{index_path} lists an invalid shard file name {name!r}")
            file = path / name
            header, data_start = _read_header(file, index_path)
            self._check_shard_header(file, header, s["count"])
            with builtins.open(file, "rb") as fh:
                fh.seek(data_start + header[_STEPS_KEY]["data_offsets"][0])
                shard_steps = np.frombuffer(fh.read(8 * s["count"]), dtype="<i8").astype(np.int64)
            if shard_steps.size and (shard_steps[0] != s["first_step"] or shard_steps[-1] != s["last_step"]):
                raise RecordingError(f"{file} holds steps {shard_steps[0]}..{shard_steps[-1]}, but {index_path} "
                                     f"says {s['first_step']}..{s['last_step']}")  # fmt: skip
            steps.append(shard_steps)
        self.steps: np.ndarray = np.concatenate(steps) if steps else np.zeros(0, dtype=np.int64)
        self.steps.flags.writeable = False
        if self.steps.size > 1 and not np.all(np.diff(self.steps) > 0):
            raise RecordingError(f"{index_path}: recorded steps are not strictly increasing")
        counts = [s["count"] for s in shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # position of each shard's first step
        self._handles: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._closed = False

    def _check_shard_header(self, file: Path, header: dict[str, Any], count: int) -> None:
        expected = {_STEPS_KEY: FieldSpec((), torch.int64), **self.fields}
        for name, spec in expected.items():
            entry = header.get(name)
            if entry is None:
                raise RecordingError(f"{file} has no tensor {name!r}; it does not match {self.index_path}")
            if entry.get("dtype") != _ST_CODES[spec.dtype] or list(entry.get("shape", [])) != [count, *spec.shape]:
                raise RecordingError(
                    f"{file}: tensor {name!r} is {entry.get('dtype')} {entry.get('shape')}, but {self.index_path} "
                    f"says {_ST_CODES[spec.dtype]} {[count, *spec.shape]}"
                )

    # -- mapping-ish API -----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.steps.size)

    def keys(self) -> list[str]:
        return list(self.fields)

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __contains__(self, field: object) -> bool:
        return field in self.fields

    def __getitem__(self, field: str) -> FieldView:
        if field not in self.fields:
            raise RecordingError(
                f"recording {self.path} has no field {field!r}; its fields are {', '.join(self.fields) or 'none'}"
            )
        return FieldView(self, field)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"<Recording {str(self.path)!r}: {len(self)} steps, fields {list(self.fields)}, {state}>"

    @property
    def size_on_disk(self) -> int:
        """Bytes used by index.json and the listed shards (stray temp files are not counted)."""
        total = 0
        for file in [self.index_path, *(self.path / s["file"] for s in self.shards)]:
            try:
                total += file.stat().st_size
            except OSError:
                pass
        return total

    def iter_steps(self, field: str, rows: Any = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(step_number, tensor)`` for every step, reading one shard at a time (memory: one shard).

        ``rows`` selects rows of each step as in ``view[:, rows]`` (a slice, an int, or a list/tensor of indices).
        """
        view = self[field]
        for shard in range(len(self.shards)):
            a, b = int(self._starts[shard]), int(self._starts[shard + 1])
            if a == b:
                continue
            block = view[a:b] if rows is None else view[a:b, rows]
            for i, step in enumerate(self.steps[a:b]):
                yield int(step), block[i]

    # -- low-level reading ---------------------------------------------------------------------------------------------

    def _handle(self, shard: int) -> Any:
        if self._closed:
            raise RecordingError(f"recording {self.path} is closed")
        handle = self._handles.get(shard)
        if handle is not None:
            self._handles.move_to_end(shard)
            return handle
        file = self.path / self.shards[shard]["file"]
        try:
            handle = safe_open(file, framework="pt")
        except FileNotFoundError:
            raise RecordingError(f"{file.name} is listed in {self.index_path} but missing") from None
        except Exception as exc:  # SafetensorError: the file changed since open()
            raise RecordingError(f"cannot read {file}: {exc}") from None
        self._handles[shard] = handle
        while len(self._handles) > _MAX_OPEN_SHARDS:
            self._handles.popitem(last=False)
        return handle

    def _read(self, field: str, positions: np.ndarray, rows: _RowSel) -> torch.Tensor:
        """Read ``positions`` (sorted or not) of ``field``, one ``get_slice`` per run of consecutive positions."""
        spec = self.fields[field]
        if positions.size == 0:
            return torch.empty((0, *rows.out_shape(spec.shape)), dtype=spec.dtype)
        shard_of = np.searchsorted(self._starts, positions, side="right") - 1
        parts = []
        i = 0
        n = positions.size
        while i < n:
            j = i + 1
            while j < n and positions[j] == positions[j - 1] + 1 and shard_of[j] == shard_of[i]:
                j += 1
            shard = int(shard_of[i])
            local = int(positions[i] - self._starts[shard])
            parts.append(rows.read(self._handle(shard).get_slice(field), local, local + (j - i)))
            i = j
        # Copy out of the memory map: a view would keep the shard mapped and let in-place edits leak into later reads.
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone(memory_format=torch.contiguous_format)

    def release(self) -> None:
        """Unmap the open shards (their read pages leave the resident set); the recording stays usable.

        Up to 16 shards stay memory-mapped between reads for speed, and every page read stays resident while its
        map is open: a streaming pass over a large recording calls this after each step to keep RSS flat.
        """
        self._handles.clear()

    def iter_step_fields(self, names: list[str], positions: range | None = None) -> Iterator[tuple[int, dict]]:
        """``(step, {field: tensor})`` for each recorded step: one step in memory, shard maps released after each."""
        positions = range(len(self)) if positions is None else positions
        views = {name: self[name] for name in names}
        for position in positions:
            values = {name: view[position] for name, view in views.items()}
            self.release()
            yield int(self.steps[position]), values

    def close(self) -> None:
        self.release()
        self._closed = True

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _RowSel:
    """A row selection (second index of ``view[steps, rows]``) turned into a ``get_slice`` read plus a local index.

    Slices with step 1 and single rows are read exactly; index lists read the span from their smallest to largest
    row (one contiguous read per step run) and then pick rows, which is far cheaper than one read per row.
    """

    def __init__(self, key: Any, field_shape: tuple[int, ...], field: str) -> None:
        self.kind = "all"
        if key is None:
            return
        if not field_shape:
            raise IndexError(f"field {field!r} has per-step shape (); there is no row axis to index")
        nrows = field_shape[0]
        self.nrows = nrows
        if isinstance(key, slice):
            start, stop, stride = key.indices(nrows)
            if stride == 1:
                self.kind, self.start, self.stop = "slice", start, max(start, stop)
                return
            key = list(range(start, stop, stride))
        if isinstance(key, torch.Tensor) and key.dim() == 0 and not key.dtype.is_floating_point:
            key = int(key)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            index = int(key)
            if not -nrows <= index < nrows:
                raise IndexError(f"row {index} is out of range for field {field!r} with {nrows} rows")
            self.kind, self.row = "int", index % nrows
            return
        idx = _as_index_array(key, nrows, what=f"row index of field {field!r}")
        self.kind, self.index = "index", idx

    def out_shape(self, field_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "all":
            return field_shape
        if self.kind == "slice":
            return (self.stop - self.start, *field_shape[1:])
        if self.kind == "int":
            return field_shape[1:]
        return (len(self.index), *field_shape[1:])

    def read(self, sl: Any, a: int, b: int) -> torch.Tensor:
        if self.kind == "all":
            return sl[a:b]
        if self.kind == "slice":
            return sl[a:b, self.start : self.stop]
        if self.kind == "int":
            return sl[a:b, self.row : self.row + 1][:, 0]
        if len(self.index) == 0:
            block = sl[a:b, 0:0]
            return block
        lo, hi = int(self.index.min()), int(self.index.max()) + 1
        block = sl[a:b, lo:hi]
        return block.index_select(1, torch.from_numpy(self.index - lo))


def _as_index_array(key: Any, n: int, *, what: str) -> np.ndarray:
    """A list / numpy array / tensor of ints (negatives from the end) or a boolean mask -> int64 positions."""
    if isinstance(key, torch.Tensor):
        arr = key.detach().cpu().numpy()
    elif isinstance(key, (list, tuple, range, np.ndarray)):
        arr = np.asarray(key)
    else:
        raise TypeError(f"unsupported {what}: {type(key).__name__} (use an int, a slice or a list/tensor of ints)")
    if arr.dtype == np.bool_:
        if arr.shape != (n,):
            raise IndexError(f"boolean {what} has shape {arr.shape}, expected ({n},)")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be a 1-D list/tensor of ints, got {arr.dtype} with shape {arr.shape}")
    arr = arr.astype(np.int64)
    bad = (arr < -n) | (arr >= n)
    if bad.any():
        raise IndexError(f"{what} {int(arr[bad][0])} is out of range for size {n}")
    return np.where(arr < 0, arr + n, arr)


class FieldView:
    """One field of a recording, indexed lazily like a tensor of shape ``(num_steps, *field_shape)``.

    ``view[i]``, ``view[10:20]``, ``view[[0, 5, 9]]`` select steps by position (0..n-1, negatives from the end);
    ``view[10:20, rows]`` also selects rows, where ``rows`` is a slice, an int, or a list/LongTensor of row indices;
    any further indices apply to the remaining dims. Only the shards (and rows) needed are read.
    """

    def __init__(self, recording: Recording, name: str) -> None:
        self.recording = recording
        self.name = name
        self.spec = recording.fields[name]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.recording), *self.spec.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.dtype

    def __len__(self) -> int:
        return len(self.recording)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _, tensor in self.recording.iter_steps(self.name):
            yield tensor

    def __repr__(self) -> str:
        return f"<FieldView {self.name!r} shape={self.shape} dtype={_dtype_name(self.dtype)}>"

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, tuple):
            if not key:
                key = slice(None)
                rest: tuple = ()
            else:
                key, rest = key[0], key[1:]
        else:
            rest = ()
        n = len(self.recording)
        if isinstance(key, torch.Tensor) and key.dim() == 0 and not key.dtype.is_floating_point:
            key = int(key)
        squeeze_steps = False
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            index = int(key)
            if not -n <= index < n:
                raise IndexError(f"step position {index} is out of range for {self.name!r} with {n} steps")
            positions = np.array([index % n], dtype=np.int64)
            squeeze_steps = True
        elif isinstance(key, slice):
            positions = np.arange(*key.indices(n), dtype=np.int64)
        else:
            positions = _as_index_array(key, n, what=f"step position of {self.name!r}")
        rows = _RowSel(rest[0] if rest else None, self.spec.shape, self.name)
        out = self.recording._read(self.name, positions, rows)
        if len(rest) > 1:
            lead = 1 if rows.kind == "int" else 2
            out = out[(slice(None),) * lead + tuple(rest[1:])]
        return out[0] if squeeze_steps else out

    def at_step(self, step: int, rows: Any = None) -> torch.Tensor:
        """The value recorded at step *number* ``step`` (not position); ``rows`` as in ``view[i, rows]``."""
        steps = self.recording.steps
        pos = int(np.searchsorted(steps, int(step)))
        if pos >= steps.size or steps[pos] != int(step):
            where = f"recorded steps run {steps[0]}..{steps[-1]} ({steps.size} steps)" if steps.size else "none"
            raise RecordingError(f"step {step} was not recorded in {self.recording.path}; {where}")
        return self[pos] if rows is None else self[pos, rows]

    def iter_steps(self, rows: Any = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(step_number, tensor)`` per step, one shard in memory at a time."""
        return self.recording.iter_steps(self.name, rows)


# ----------------------------------------------------------------------------------------------------------------------
# Export and summary


def _scalar_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in meta.items() if isinstance(v, (str, int, float, bool))}


def export_single_file(
    rec_or_path: Recording | str | os.PathLike, out_path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write the old notebook's single safetensors file, streaming one shard at a time (works beyond RAM size).

    Keys: ``recorded_steps`` (int64 [n]) and, for each field present, ``embeddings``, ``grads``, ``momentum``
    (exp_avg), ``variance`` (exp_avg_sq), ``logits``, ``losses`` (float32 [n]); other fields are not part of that
    layout and are left out. Scalar facts (``num_steps``, ``num_rows``, ``hidden_dim``, ``dtype``, ``vocab_size``
    when known, scalar ``meta`` entries...) go into the file's string metadata. Written to a temporary name and
    renamed, so ``out_path`` is never left half-written. Returns ``out_path``.
    """
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise RecordingError(f"{out_path} already exists; pass overwrite=True to replace it")
    if out_path.is_dir():
        raise RecordingError(f"{out_path} is a directory; give a file name, e.g. {out_path / 'recording.safetensors'}")
    own = not isinstance(rec_or_path, Recording)
    rec = open(rec_or_path) if own else rec_or_path
    try:
        n = len(rec)
        blocks: dict[str, _Block] = {
            "recorded_steps": _Block(torch.int64, (n,), [torch.from_numpy(rec.steps.copy())]),
        }
        for field, key in EXPORT_KEYS.items():
            if field not in rec.fields:
                continue
            spec = rec.fields[field]
            dtype = torch.float32 if key == "losses" else spec.dtype
            blocks[key] = _Block(dtype, (n, *spec.shape), _shard_chunks(rec, field, dtype))

        metadata = _scalar_meta(rec.meta)
        rows_spec = rec.fields.get("embeddings") or rec.fields.get("grads")
        metadata.update(
            format="wakelab-notebook-export",
            source=str(rec.path),
            num_steps=str(n),
            complete=str(rec.complete),
        )
        if n:
            metadata.update(first_step=str(int(rec.steps[0])), last_step=str(int(rec.steps[-1])))
        if rows_spec is not None and len(rows_spec.shape) == 2:
            metadata.update(num_rows=str(rows_spec.shape[0]), hidden_dim=str(rows_spec.shape[1]),
                            dtype=_dtype_name(rows_spec.dtype))  # fmt: skip
        if "logits" in rec.fields and rec.fields["logits"].shape:
            metadata["vocab_size"] = str(rec.fields["logits"].shape[-1])
        elif "vocab_size" in rec.meta:
            metadata["vocab_size"] = str(rec.meta["vocab_size"])
        if rec.token_ids is not None:
            metadata["token_ids"] = json.dumps(rec.token_ids)
        if any(rec.flags.values()):
            metadata["flags"] = json.dumps(rec.flags)

        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        try:
            _write_safetensors(tmp, blocks, metadata)
            os.replace(tmp, out_path)
        except OSError as exc:
            _remove_quietly(tmp)
            raise RecordingError(f"cannot write {out_path}: {exc.strerror or exc}") from None
        except BaseException:
            _remove_quietly(tmp)
            raise
    finally:
        if own:
            rec.close()
    return out_path


def _shard_chunks(rec: Recording, field: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    view = rec[field]
    for shard in range(len(rec.shards)):
        a, b = int(rec._starts[shard]), int(rec._starts[shard + 1])
        if a < b:
            yield view[a:b].to(dtype)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def summary(rec: Recording | str | os.PathLike) -> str:
    """A short human-readable description of a recording (what ``wakelab recording info`` prints)."""
    own = not isinstance(rec, Recording)
    if own:
        rec = open(rec)
    try:
        n = len(rec)
        lines = [f"recording {rec.path}"]
        if n:
            steps = f"{int(rec.steps[0])}..{int(rec.steps[-1])} ({n} steps in {len(rec.shards)} shards"
            steps += f" of up to {rec.steps_per_shard})" if rec.steps_per_shard else ")"
        else:
            steps = "none recorded"
        lines.append(f"  steps     {steps}")
        lines.append(
            "  status    complete"
            if rec.complete
            else "  status    cut short (writer did not close; only finished shards are listed)"
        )
        if rec.token_ids is not None:
            ids = rec.token_ids
            shown = ", ".join(str(t) for t in ids[:8]) + (", ..." if len(ids) > 8 else "")
            lines.append(f"  rows      {len(ids)} token ids: {shown}")
        width = max((len(f) for f in rec.fields), default=0)
        for i, (name, spec) in enumerate(rec.fields.items()):
            label = "  fields    " if i == 0 else "            "
            lines.append(f"{label}{name.ljust(width)}  {tuple(spec.shape)} {_dtype_name(spec.dtype)}")
        lines.append(f"  size      {_human_bytes(rec.size_on_disk)} on disk")
        if rec.flags:
            parts = []
            for name, flagged in rec.flags.items():
                shown = ", ".join(str(s) for s in flagged[:5]) + (", ..." if len(flagged) > 5 else "")
                parts.append(f"{name}: {len(flagged)} step(s)" + (f" ({shown})" if flagged else ""))
            lines.append("  flags     " + "; ".join(parts))
        else:
            lines.append("  flags     none")
        scalars = _scalar_meta(rec.meta)
        if scalars:
            lines.append("  meta      " + ", ".join(f"{k}={v}" for k, v in scalars.items()))
        return "\n".join(lines)
    finally:
        if own:
            rec.close()
