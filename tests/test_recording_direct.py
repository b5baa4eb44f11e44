"""The writer's fast paths write the very bytes the plain path writes: O_DIRECT shards and pooled host buffers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from wakelab import recording
from wakelab.recording import FieldSpec, RecordingWriter


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

    monkeypatch.setattr(recording, "_write_safetensors_direct", counted)
    expected = write(tmp_path / "direct")
    if calls["direct"] == 0:
        pytest.skip("this file system does not do O_DIRECT; the buffered path wrote the shards")
    monkeypatch.setattr(recording, "_write_safetensors_direct", lambda *args: False)
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
