"""The lazy, memory-mapped reader: a recording opened without loading it."""

from __future__ import annotations

import builtins
import collections
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .format import (
    _MAX_OPEN_SHARDS,
    _ST_CODES,
    _STEPS_KEY,
    FORMAT,
    INDEX_NAME,
    VERSION,
    FieldSpec,
    RecordingError,
    _dtype_name,
)


def open(path: str | os.PathLike) -> Recording:  # noqa: A001 - ``wakelab.storage.recording.open`` is the public name
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
