"""A recording as one safetensors file, and the summary ``wakelab recording info`` prints."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .format import EXPORT_KEYS, RecordingError, _Block, _dtype_name, _remove_quietly, _write_safetensors
from .reader import Recording, open


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
