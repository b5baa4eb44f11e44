"""The writer's fast paths write the very bytes the plain path writes: O_DIRECT shards and pooled host buffers."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from wakelab.storage import recording
from wakelab.storage.recording import FieldSpec, RecordingWriter


def write(path: Path, steps: int = 7) -> dict[str, torch.Tensor]:
    fields = {
        "embeddings": FieldSpec((1000, 33), torch.bfloat16),
        "logits": FieldSpec((517,), torch.float32),
        "loss": FieldSpec((), torch.float32),
    }
    g = torch.Generator().manual_seed(0)
    source = {
        "embeddings": torch.randn(1000, 33, generator=g),
        "logits": torch.randn(517, generator=g),
        "loss": torch.tensor(1.5),
    }
    kept = []
    with RecordingWriter(path, fields, steps_per_shard=3, queue_size=2) as writer:
        for step in range(steps):
            source["embeddings"].add_(1)  # the caller changes its tensors right after append: copies must hold
            source["logits"].mul_(1.1)
            writer.append(step, {**source, "embeddings": source["embeddings"].to(torch.bfloat16)})
            kept.append(source["embeddings"].to(torch.bfloat16).clone())
        pooled = {name: len(pool) for name, pool in writer._host_pool.items()}
    assert all(0 < n <= 2 + 3 + 1 for n in pooled.values()), pooled  # host buffers recycled, within the bound
    return {"embeddings": torch.stack(kept)}


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard-*.safetensors"))}


def test_direct_and_buffered_shards_are_byte_identical_and_read_back(tmp_path, monkeypatch):
    calls = {"direct": 0}
    real_direct = recording._write_safetensors_direct

    def counted(*args):
        done = real_direct(*args)
        calls["direct"] += done
        return done

    monkeypatch.setattr("wakelab.storage.recording.direct._write_safetensors_direct", counted)
    expected = write(tmp_path / "direct")
    if calls["direct"] == 0:
        pytest.skip("this file system does not do O_DIRECT; the buffered path wrote the shards")
    monkeypatch.setattr("wakelab.storage.recording.direct._write_safetensors_direct", lambda *args: False)
    write(tmp_path / "buffered")
    direct, buffered = shard_bytes(tmp_path / "direct"), shard_bytes(tmp_path / "buffered")
    assert list(direct) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert direct == buffered  # the same format, to the byte (lengths too: the O_DIRECT padding is cut off)
    assert any(len(data) % 4096 for data in direct.values())
    with recording.open(tmp_path / "direct") as rec:
        assert torch.equal(rec["embeddings"][:], expected["embeddings"])
        assert rec["loss"][:].tolist() == [1.5] * 7


def test_file_systems_without_direct_io_fall_back_to_buffered_writes(tmp_path, monkeypatch):
    def refuse(path, flags, mode=0o777, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, mode, **kwargs)

    real_open = os.open
    monkeypatch.setattr(os, "open", refuse)
    expected = write(tmp_path / "rec")
    with recording.open(tmp_path / "rec") as rec:
        assert torch.equal(rec["embeddings"][:], expected["embeddings"])
    assert not list((tmp_path / "rec").glob(".shard-*"))  # no temporary file left behind


def test_host_buffers_stay_within_the_bound_when_copies_run_ahead_of_the_prefill(tmp_path, monkeypatch):
    """Steps copied before the writer sizes its pools take fresh buffers; the prefill must count them.

    CI once saw 8 pooled buffers against a bound of 6: the prefill topped the pools up to the bound without
    counting the buffers the training thread had made meanwhile. Here the writer is held at its first step until
    three steps are copied (step 0 held, 1 and 2 queued), which makes that ordering certain.
    """
    release = threading.Event()
    real_consume = RecordingWriter._consume

    def held_consume(self, item):
        release.wait(timeout=30)
        real_consume(self, item)

    monkeypatch.setattr(RecordingWriter, "_consume", held_consume)
    fields = {"rows": FieldSpec((64, 8), torch.float32)}
    source = torch.zeros(64, 8)
    bound = 2 + 3 + 1
    with RecordingWriter(tmp_path / "rec", fields, steps_per_shard=3, queue_size=2) as writer:
        for step in range(3):
            writer.append(step, {"rows": source + step})
        release.set()
        deadline = time.monotonic() + 30
        while (writer._to_prefill or not writer._queue.empty()) and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer writes the first shard, then runs its whole prefill
        pooled = len(writer._host_pool["rows"])
        for step in range(3, 9):
            writer.append(step, {"rows": source + step})
    assert pooled <= bound
    assert 0 < len(writer._host_pool["rows"]) <= bound
    with recording.open(tmp_path / "rec") as rec:
        assert torch.equal(rec["rows"][:][:, 0, 0], torch.arange(9, dtype=torch.float32))
