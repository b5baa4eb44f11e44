"""Tests for the sharded recording writer/reader (``wakelab.storage.recording``)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from optional import require
from safetensors import safe_open
from safetensors.torch import load_file

from wakelab.errors import WakelabError
from wakelab.storage import recording
from wakelab.storage.recording import FieldSpec, RecordingError, RecordingWriter

ROWS, DIM, VOCAB = 6, 8, 40
N_STEPS, K = 23, 5
FIRST_STEP, STRIDE = 100, 3  # step numbers 100, 103, ...: positions and step numbers differ on purpose


def _fields() -> dict[str, FieldSpec]:
    return {
        "embeddings": FieldSpec((ROWS, DIM), torch.bfloat16),
        "grads": FieldSpec((ROWS, DIM), torch.float32),
        "exp_avg": FieldSpec((ROWS, DIM), torch.float32),
        "exp_avg_sq": FieldSpec((ROWS, DIM), torch.float32),
        "logits": FieldSpec((VOCAB,), torch.float32),
        "loss": FieldSpec((), torch.float32),
        "lr": FieldSpec((), torch.float64),
    }


def _step_data(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "embeddings": torch.randn(ROWS, DIM, generator=g),  # float32 in, stored as bf16
        "grads": torch.randn(ROWS, DIM, generator=g),
        "exp_avg": torch.randn(ROWS, DIM, generator=g),
        "exp_avg_sq": torch.rand(ROWS, DIM, generator=g),
        "logits": torch.randn(VOCAB, generator=g),
        "loss": torch.rand((), generator=g),
        "lr": 1e-3 / (i + 1),  # a Python float: kept in float64
    }


def _expected(field: str, steps=range(N_STEPS)) -> torch.Tensor:
    dtype = _fields()[field].dtype
    return torch.stack([torch.as_tensor(_step_data(i)[field], dtype=torch.float64).to(dtype) for i in steps])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Same-size integer view, so comparisons are bit-exact (NaN-safe, -0.0 vs 0.0 distinguished)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


def _write(path: Path, n: int = N_STEPS, k: int = K, **kwargs) -> None:
    with RecordingWriter(path, _fields(), token_ids=list(range(1000, 1000 + ROWS)),
                         meta={"run_id": "r1", "strategy": "mean", "vocab_size": VOCAB, "config": {"lr": 1e-3}},
                         steps_per_shard=k, **kwargs) as w:  # fmt: skip
        for i in range(n):
            w.append(FIRST_STEP + STRIDE * i, _step_data(i), flags={"optimizer_state_missing": i == 0})


@pytest.fixture
def rec_path(tmp_path: Path) -> Path:
    path = tmp_path / "rec"
    _write(path)
    return path


def test_round_trip_is_bit_exact_and_sharded(rec_path: Path) -> None:
    files = sorted(p.name for p in rec_path.iterdir())
    assert files == ["index.json"] + [f"shard-{i:05d}.safetensors" for i in range(5)]  # no temp files left

    index = json.loads((rec_path / "index.json").read_text())
    assert index["format"] == "wakelab-recording" and index["version"] == 1
    assert index["complete"] is True and index["steps_recorded"] == N_STEPS and index["steps_per_shard"] == K
    assert [s["count"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert index["shards"][1] == {"file": "shard-00001.safetensors", "first_step": 115, "last_step": 127, "count": 5}
    assert index["fields"]["embeddings"] == {"shape": [ROWS, DIM], "dtype": "bfloat16"}
    assert index["fields"]["loss"] == {"shape": [], "dtype": "float32"}
    assert index["flags"] == {"optimizer_state_missing": [FIRST_STEP]}
    assert index["token_ids"] == list(range(1000, 1000 + ROWS))
    assert index["meta"]["config"] == {"lr": 1e-3}

    with safe_open(rec_path / "shard-00004.safetensors", framework="pt") as f:  # plain safetensors, [k, *shape]
        assert f.get_slice("embeddings").get_shape() == [3, ROWS, DIM]
        assert f.get_tensor("steps").tolist() == [FIRST_STEP + STRIDE * i for i in range(20, 23)]

    with recording.open(rec_path) as rec:
        assert len(rec) == N_STEPS and rec.complete
        assert list(rec.steps) == [FIRST_STEP + STRIDE * i for i in range(N_STEPS)]
        assert set(rec.keys()) == set(_fields()) and "grads" in rec and "nope" not in rec
        assert rec.token_ids == list(range(1000, 1000 + ROWS))
        assert rec.meta["run_id"] == "r1" and rec.flags == {"optimizer_state_missing": [FIRST_STEP]}
        for field, spec in _fields().items():
            view = rec[field]
            assert view.shape == (N_STEPS, *spec.shape) and view.dtype == spec.dtype
            got = view[:]
            assert got.dtype == spec.dtype and got.shape == view.shape
            assert torch.equal(_bits(got), _bits(_expected(field))), field
        assert rec["lr"][4].item() == 1e-3 / 5  # float64 survives exactly


def test_lazy_slicing_rows_and_at_step(rec_path: Path) -> None:
    emb = _expected("embeddings")
    with recording.open(rec_path) as rec:
        view = rec["embeddings"]
        assert torch.equal(view[10:20, [3, 7 - ROWS]], emb[10:20][:, [3, 1]])  # crosses shards 2 -> 3, negative row
        assert torch.equal(view[10:20, torch.tensor([5, 0, 5])], emb[10:20][:, [5, 0, 5]])
        assert torch.equal(view[3:12, 1:4], emb[3:12, 1:4])
        assert torch.equal(view[3:12, 2], emb[3:12, 2])
        assert torch.equal(view[7], emb[7]) and torch.equal(view[-1], emb[-1])
        assert torch.equal(view[::4], emb[::4]) and torch.equal(view[[22, 0, 9]], emb[[22, 0, 9]])
        assert torch.equal(view[4:9, [1, 2], 3:5], emb[4:9][:, [1, 2], 3:5])
        assert view[5:5].shape == (0, ROWS, DIM) and view[2:4, []].shape == (2, 0, DIM)

        assert torch.equal(view.at_step(FIRST_STEP + STRIDE * 12), emb[12])
        assert torch.equal(view.at_step(FIRST_STEP + STRIDE * 12, rows=[4]), emb[12, [4]])
        with pytest.raises(RecordingError, match="step 101 was not recorded"):
            view.at_step(101)
        with pytest.raises(IndexError, match=f"step position {N_STEPS} is out of range"):
            view[N_STEPS]
        with pytest.raises(IndexError, match="no row axis"):
            rec["loss"][0:3, 1]
        with pytest.raises(RecordingError, match="no field 'embedings'"):
            rec["embedings"]

        # Results are private copies: editing one never leaks into a later read through the memory map.
        got = view[0:5]
        got.fill_(0)
        assert torch.equal(view[0:5], emb[0:5])


def test_iter_steps_streams_shard_by_shard(rec_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with recording.open(rec_path) as rec:
        reads: list[int] = []
        real_read = recording.Recording._read

        def counting_read(self, field, positions, rows):
            reads.append(len(positions))
            return real_read(self, field, positions, rows)

        monkeypatch.setattr(recording.Recording, "_read", counting_read)
        it = rec.iter_steps("grads", rows=[0, 2])
        step, first = next(it)
        assert reads == [5]  # only the first shard was read so far
        assert step == FIRST_STEP and torch.equal(first, _expected("grads")[0, [0, 2]])
        rest = list(it)
        assert reads == [5, 5, 5, 5, 3]
        assert [s for s, _ in rest] == list(rec.steps[1:])
        assert torch.equal(torch.stack([t for _, t in rest]), _expected("grads")[1:, [0, 2]])


_CRASH_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    from wakelab.storage.recording import FieldSpec, RecordingWriter

    path = Path(sys.argv[1])
    w = RecordingWriter(path, {"x": FieldSpec((3, 4), torch.float32), "loss": FieldSpec((), torch.float32)},
                        token_ids=None, meta={"run_id": "crash"}, steps_per_shard=5)
    for i in range(12):
        w.append(i, {"x": torch.full((3, 4), float(i)), "loss": torch.tensor(float(i))})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        index = json.loads((path / "index.json").read_text())
        if len(index["shards"]) >= 2:
            break
        time.sleep(0.01)
    print("READY", flush=True)
    time.sleep(600)  # never closes: killed by the test
    """
)


def test_sigkill_mid_run_leaves_a_readable_prefix(tmp_path: Path) -> None:
    path = tmp_path / "crashed"
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read() if proc.poll() is not None else line
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    # Debris a crash could leave: a half-written shard temp file and an unlisted shard; both must be ignored.
    (path / ".shard-00002.safetensors.tmp").write_bytes(b"\x00garbage")
    (path / "shard-00007.safetensors").write_bytes(b"not a shard")

    with recording.open(path) as rec:
        assert rec.complete is False
        assert len(rec.shards) == 2 and list(rec.steps) == list(range(10))  # the 2 steps of the partial shard are lost
        assert torch.equal(rec["x"][:], torch.arange(10.0)[:, None, None].expand(10, 3, 4))
        assert torch.equal(rec["loss"][:], torch.arange(10.0))
        assert rec.meta == {"run_id": "crash"}
        assert "cut short" in recording.summary(rec)


def test_disk_full_surfaces_one_line_and_keeps_finished_shards(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "full"
    real_save = recording._save_shard
    calls = []

    def save_until_full(file, blocks, metadata):
        calls.append(Path(file).name)
        if len(calls) == 3:
            Path(file).write_bytes(b"partial shard bytes")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        real_save(file, blocks, metadata)

    monkeypatch.setattr("wakelab.storage.recording.writer._save_shard", save_until_full)
    w = RecordingWriter(path, _fields(), token_ids=None, meta={}, steps_per_shard=K)
    with pytest.raises(RecordingError, match="recording stopped: disk full") as info:
        for i in range(N_STEPS):
            w.append(FIRST_STEP + STRIDE * i, _step_data(i))
        w.close()
    message = str(info.value)
    assert isinstance(info.value, WakelabError) and "\n" not in message
    assert message == (
        f"recording stopped: disk full writing shard-00002.safetensors at {path}; "
        f"completed shards up to step {FIRST_STEP + STRIDE * 9} are intact"
    )
    with pytest.raises(RecordingError, match="disk full"):  # it stays stopped
        w.append(10_000, _step_data(0))
    w.close()  # already reported: closing quietly stops the thread
    assert not w._thread.is_alive()

    assert not list(path.glob(".*tmp"))  # the partial temp shard was removed
    with recording.open(path) as rec:
        assert rec.complete is False and len(rec.shards) == 2
        assert list(rec.steps) == [FIRST_STEP + STRIDE * i for i in range(10)]
        assert torch.equal(_bits(rec["embeddings"][:]), _bits(_expected("embeddings", range(10))))


def test_append_validation_errors_name_the_field(tmp_path: Path) -> None:
    with RecordingWriter(tmp_path / "v", _fields(), token_ids=None, meta={}) as w:
        good = _step_data(0)
        with pytest.raises(RecordingError, match="unknown field 'embedings'"):
            w.append(0, {**good, "embedings": good.pop("embeddings")})
        good = _step_data(0)
        with pytest.raises(RecordingError, match=r"field 'grads' has shape \(6, 7\), expected \(6, 8\)"):
            w.append(0, {**good, "grads": torch.zeros(ROWS, DIM - 1)})
        with pytest.raises(RecordingError, match="missing field 'loss'"):
            w.append(0, {k: v for k, v in good.items() if k != "loss"})
        with pytest.raises(RecordingError, match="field 'logits' is complex64"):
            w.append(0, {**good, "logits": torch.zeros(VOCAB, dtype=torch.complex64)})
        w.append(5, good)
        with pytest.raises(RecordingError, match="steps must strictly increase"):
            w.append(5, good)
    with pytest.raises(RecordingError, match="after the recording .* was closed"):
        w.append(6, good)
    with pytest.raises(RecordingError, match="FieldSpec dtype"):
        FieldSpec((2,), torch.complex32)


def test_refuses_to_overwrite_a_recording(rec_path: Path, tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="already holds a recording .*overwrite=True"):
        RecordingWriter(rec_path, _fields(), token_ids=None, meta={})
    assert recording.open(rec_path).complete  # untouched
    _write(rec_path, n=3, overwrite=True)
    with recording.open(rec_path) as rec:
        assert len(rec) == 3 and [p.name for p in rec_path.glob("shard-*")] == ["shard-00000.safetensors"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RecordingError, match="not a directory"):
        RecordingWriter(tmp_path / "afile", _fields(), token_ids=None, meta={})


def test_reader_names_missing_or_truncated_shards(rec_path: Path) -> None:
    shard = rec_path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-7])
    with pytest.raises(RecordingError, match="shard-00001.safetensors.*truncated"):
        recording.open(rec_path)
    shard.unlink()
    with pytest.raises(RecordingError, match="shard-00001.safetensors is listed in .* but missing"):
        recording.open(rec_path)
    with pytest.raises(RecordingError, match="no index.json"):
        recording.open(rec_path.parent)


def test_exit_by_exception_flushes_but_is_not_complete(tmp_path: Path) -> None:
    path = tmp_path / "exc"
    with pytest.raises(ZeroDivisionError, match="a crash inside the with block"):
        with RecordingWriter(path, _fields(), token_ids=None, meta={}, steps_per_shard=K) as w:
            for i in range(7):
                w.append(i, _step_data(i))
            raise ZeroDivisionError("a crash inside the with block")
    with recording.open(path) as rec:
        assert len(rec) == 7 and rec.complete is False


def test_append_copies_the_caller_tensor(tmp_path: Path) -> None:
    path = tmp_path / "copy"
    x = torch.zeros(2, 3, requires_grad=True)
    fields = {"x": FieldSpec((2, 3), torch.float32)}
    with RecordingWriter(path, fields, token_ids=None, meta={}, steps_per_shard=4) as w:
        for i in range(6):
            w.append(i, {"x": x})
            with torch.no_grad():
                x.add_(1)  # the optimizer changes the weights right after append
    with recording.open(path) as rec:
        assert rec["x"][:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_export_single_file_round_trip(rec_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "export" / "recording.safetensors"
    assert recording.export_single_file(rec_path, out) == out
    expected_keys = {"recorded_steps", "embeddings", "grads", "momentum", "variance", "logits", "losses"}
    with safe_open(out, framework="pt") as f:
        assert set(f.keys()) == expected_keys  # lr is not part of the notebook layout
        meta = f.metadata()
        assert f.get_tensor("recorded_steps").dtype == torch.int64
        assert f.get_tensor("recorded_steps").tolist() == [FIRST_STEP + STRIDE * i for i in range(N_STEPS)]
        for field, key in recording.EXPORT_KEYS.items():
            got = f.get_tensor(key)
            want = _expected(field)
            assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), key
        assert f.get_tensor("losses").dtype == torch.float32 and f.get_tensor("losses").shape == (N_STEPS,)
    assert meta["num_steps"] == str(N_STEPS) and meta["num_rows"] == str(ROWS) and meta["hidden_dim"] == str(DIM)
    assert meta["dtype"] == "bfloat16" and meta["vocab_size"] == str(VOCAB)
    assert meta["run_id"] == "r1" and meta["strategy"] == "mean" and "config" not in meta  # scalars only
    assert json.loads(meta["token_ids"]) == list(range(1000, 1000 + ROWS))
    assert set(load_file(out)) == expected_keys  # the reference loader agrees with the hand-written file

    with pytest.raises(RecordingError, match="already exists; pass overwrite=True"):
        recording.export_single_file(rec_path, out)
    with recording.open(rec_path) as rec:
        recording.export_single_file(rec, out, overwrite=True)
    assert not list(out.parent.glob(".*tmp"))


def test_summary_describes_the_recording(rec_path: Path) -> None:
    text = recording.summary(rec_path)
    assert str(rec_path) in text
    assert f"{FIRST_STEP}..{FIRST_STEP + STRIDE * (N_STEPS - 1)} ({N_STEPS} steps in 5 shards" in text
    assert "complete" in text and "embeddings" in text and "(6, 8) bfloat16" in text
    assert "optimizer_state_missing: 1 step(s) (100)" in text and "on disk" in text and "run_id=r1" in text


def test_writer_memory_stays_flat_with_back_pressure(tmp_path: Path, monkeypatch) -> None:
    """200 steps of a [2000, 64] float32 field (~100 MiB): the writer never holds more than queue + one shard."""
    psutil = require("psutil")
    n_steps, k, queue_size = 200, 10, 4
    real_save = recording._save_shard
    gate = threading.Event()

    def gated_save(file, blocks, metadata):
        gate.wait(timeout=60)  # the disk "stalls" on the first shard until the test has seen append block
        real_save(file, blocks, metadata)

    monkeypatch.setattr("wakelab.storage.recording.writer._save_shard", gated_save)
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    w = RecordingWriter(tmp_path / "mem", {"x": FieldSpec((2000, 64), torch.float32)}, token_ids=None, meta={},
                        steps_per_shard=k, queue_size=queue_size)  # fmt: skip
    appended = []
    errors = []
    src = torch.zeros(2000, 64)

    def train():
        try:
            for i in range(n_steps):
                src.fill_(i)
                w.append(i, {"x": src})
                appended.append(i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    trainer = threading.Thread(target=train)
    trainer.start()
    # With the disk stalled, append fills one shard plus the queue and then must block (no unbounded buffering).
    deadline = time.monotonic() + 60
    while len(appended) < k + queue_size and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert len(appended) == k + queue_size and w._queue.full()
    gate.set()
    trainer.join(timeout=120)
    assert not trainer.is_alive() and not errors
    w.close()
    rss_growth = proc.memory_info().rss - rss_before

    assert w.stats["max_queued"] <= queue_size
    assert w.stats["max_held_steps"] <= queue_size + k + 1
    assert w.stats["shards_written"] == n_steps // k and w.stats["steps_written"] == n_steps
    total = n_steps * 2000 * 64 * 4
    assert rss_growth < total / 2, f"RSS grew {rss_growth / 2**20:.0f} MiB while writing {total / 2**20:.0f} MiB"
    with recording.open(tmp_path / "mem") as rec:
        assert len(rec) == n_steps
        assert rec["x"][:, 1999, 63].tolist() == [float(i) for i in range(n_steps)]
        assert np.array_equal(rec.steps, np.arange(n_steps))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_copied_via_pinned_buffers(tmp_path: Path) -> None:
    path = tmp_path / "cuda"
    x = torch.zeros(4, 8, device="cuda")
    with RecordingWriter(path, {"x": FieldSpec((4, 8), torch.bfloat16), "loss": FieldSpec((), torch.float32)},
                         token_ids=None, meta={}, steps_per_shard=3, queue_size=2) as w:  # fmt: skip
        for i in range(10):
            x.fill_(float(i))
            w.append(i, {"x": x, "loss": x.sum() / 32})
            x.mul_(1000)  # queued after the copy on the same stream: must not leak into the recording
    with recording.open(path) as rec:
        assert rec["x"][:, 0, 0].tolist() == [float(i) for i in range(10)]
        assert rec["loss"][:].tolist() == [float(i) for i in range(10)]
    assert all(len(pool) <= 2 + 3 + 2 for pool in w._pinned_pool.values())
