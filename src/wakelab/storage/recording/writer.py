"""The streaming writer: copies each step off the training thread and writes whole shards."""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import errno
import functools
import json
import logging
import mmap
import numbers
import os
import queue
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wakelab.storage.durable import fsync_dir

from .direct import _save_shard
from .format import (
    _INDEX_TMP,
    _SHARD_GLOB,
    _ST_CODES,
    _STEPS_KEY,
    FORMAT,
    INDEX_NAME,
    VERSION,
    FieldSpec,
    RecordingError,
    _Block,
    _can_store,
    _dtype_name,
    _remove_quietly,
    _write_json_atomic,
)

log = logging.getLogger(__name__)

for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _ST_CODES[getattr(torch, _name)] = _code


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
