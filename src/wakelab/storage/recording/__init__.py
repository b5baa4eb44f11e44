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

    with wakelab.storage.recording.open(out) as rec:
        rows = rec["embeddings"][10:20, [3, 7]]      # steps 10..19 (positions), rows 3 and 7
        final = rec["embeddings"].at_step(500)       # by step number
"""

from __future__ import annotations

from .direct import _save_shard, _write_safetensors_direct
from .export import export_single_file, summary
from .format import EXPORT_KEYS, FORMAT, INDEX_NAME, VERSION, FieldSpec, RecordingError
from .reader import FieldView, Recording, open
from .writer import RecordingWriter

__all__ = [
    "EXPORT_KEYS",
    "FORMAT",
    "FieldSpec",
    "FieldView",
    "INDEX_NAME",
    "Recording",
    "RecordingError",
    "RecordingWriter",
    "VERSION",
    "export_single_file",
    "open",
    "summary",
    "_save_shard",
    "_write_safetensors_direct",
]
