"""The recording format: its names, dtypes, field specs and the safetensors shard layout."""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from wakelab.errors import WakelabError
from wakelab.storage.durable import fsync_dir

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

_ST_DTYPES = {code: dtype for dtype, code in _ST_CODES.items()}


class RecordingError(WakelabError):
    """A recording that cannot be written or read as asked; the message says what happened and what is intact."""


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
