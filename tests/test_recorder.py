"""The `recorder` plugin: what it records is what the optimizer did, under every strategy, streamed to disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from conftest import COINED, TINY_HIDDEN, loaded_plugin, tiny_overrides
from optional import require

from wakelab.analysis.dynamics.steps import adam_update
from wakelab.cli.main import main
from wakelab.config import build_config
from wakelab.errors import ConfigError, WakelabError
from wakelab.plugins.recorder import MISSING_FLAG, PATH_TAG, resolve_rows
from wakelab.run import engine
from wakelab.storage import recording

FAST = {"train.eval_perplexity": False, "tracking.log_tokenizer": False}


def recorded_run(tiny_model, texts, **extra):
    overrides = tiny_overrides(tiny_model, texts, **{**FAST, **extra})
    overrides["plugins"] = ["recorder"]
    result = engine.run(build_config(None, None, overrides), progress=False)
    return result, recording.open(result.output_dir / "recording")


def cli_args(tiny_model, texts, **extra):
    args = ["run", "--no-progress", "--preset", "demo", "--plugin", "recorder"]
    for key, value in tiny_overrides(tiny_model, texts, **{**FAST, **extra}).items():
        args += ["--set", f"{key}={value}"]
    return args


def vocab_size(tiny_model) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tiny_model)) + len(COINED)


# ----------------------------------------------------------------------------------------------------------------------
# End to end through the command line, and the reader CLI on what it wrote


def test_cli_run_records_every_step_and_the_reader_cli_reads_it(tiny_model, texts, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, cli_args(tiny_model, texts, **{"recorder.steps_per_shard": 4}))
    assert result.exit_code == 0, result.output
    run_id = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("run "))
    path = tmp_path / "out" / "recording"

    with recording.open(path) as rec:
        assert rec.complete
        assert rec.steps.tolist() == list(range(0, 7)), "the starting step and every step"
        assert set(rec.fields) == {"embeddings", "grads", "exp_avg", "exp_avg_sq", "logits", "loss", "lr"}
        n_new, vocab = len(COINED), vocab_size(tiny_model)
        assert rec.token_ids == list(range(vocab - n_new, vocab)), "rows=new by default"
        assert rec.fields["embeddings"].shape == (n_new, TINY_HIDDEN)
        assert rec.fields["logits"].shape == (vocab,)
        # bf16 is the default storage dtype, for row fields and logits alike.
        for name in ("embeddings", "grads", "exp_avg", "exp_avg_sq", "logits"):
            assert rec.fields[name].dtype == torch.bfloat16, name
        assert rec.meta["run_id"] == run_id
        assert rec.meta["config"]["train"]["max_steps"] == 6
        assert len(rec.shards) == 2
        losses = rec["loss"][:]
        assert torch.isnan(losses[0]) and torch.isfinite(losses[1:]).all()
        assert torch.isfinite(rec["logits"][1:].float()).all()

    # MLflow: index + summary (+ small shards) as artifacts, the local path as a tag.
    client = mlflow.MlflowClient()
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "recording")}
    assert {"index.json", "summary.txt", "shard-00000.safetensors", "shard-00001.safetensors"} <= logged
    assert client.get_run(run_id).data.tags[PATH_TAG] == str(path.resolve())

    info = runner.invoke(main, ["recording", "info", str(path)])
    assert info.exit_code == 0, info.output
    assert "0..6 (7 steps in 2 shards" in info.stdout and "complete" in info.stdout
    assert f"{MISSING_FLAG}: 1 step(s) (0)" in info.stdout

    out = tmp_path / "single.safetensors"
    export = runner.invoke(main, ["recording", "export", str(path), "--single-file", str(out)])
    assert export.exit_code == 0, export.output
    from safetensors.torch import load_file

    single = load_file(out)
    assert single["recorded_steps"].tolist() == list(range(7))
    assert single["embeddings"].shape == (7, len(COINED), TINY_HIDDEN)
    assert {"grads", "momentum", "variance", "logits", "losses"} <= set(single)

    again = runner.invoke(main, ["recording", "export", str(path), "--single-file", str(out)])
    assert again.exit_code == 2
    assert again.stderr.strip().startswith("wakelab: error:") and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    forced = runner.invoke(main, ["recording", "export", str(path), "--single-file", str(out), "--overwrite"])
    assert forced.exit_code == 0, forced.output


def test_reader_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["recording", "info", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert missing.stderr.strip().splitlines() == [
        f"wakelab: error: no recording at {tmp_path / 'nope'}: it does not exist"
    ]
    for command in (["info"], ["export", "--single-file", "x.safetensors"]):
        assert "Example:" in runner.invoke(main, ["recording", *command, "--help"]).output


# ----------------------------------------------------------------------------------------------------------------------
# What is recorded is what AdamW did


@pytest.mark.parametrize(
    "strategy, weight_decay, rows, grad_accum, in_4bit",
    [
        ("tokens", 0.0, "new", 1, False),
        ("tokens", 0.1, "sample:5:new", 1, False),
        ("mask", 0.1, "new", 1, False),
        ("mask", 0.1, "new", 3, False),
        ("tokens", 0.1, "new", 2, True),
        ("full", 0.1, "sample:6:all", 2, False),
    ],
)
def test_recorded_state_reproduces_the_adamw_update(
    tiny_model, texts, strategy, weight_decay, rows, grad_accum, in_4bit
):
    if in_4bit:
        require("bitsandbytes")  # a bf16 compute base; the new rows (and their Adam state) in float32 to check exactly
    extra = {
        "model.load_in_4bit": in_4bit,
        "train.rows_dtype": "float32" if in_4bit else "auto",
        "train.trainable": strategy,
        "train.weight_decay": weight_decay,
        "train.max_steps": 5,
        "train.warmup_steps": 0,
        "train.scheduler": "cosine",
        "train.grad_accum": grad_accum,
        "recorder.dtype": "param",
        "recorder.rows": rows,
    }
    _, rec = recorded_run(tiny_model, texts, **extra)
    with rec:
        assert rec.steps.tolist() == [0, 1, 2, 3, 4, 5]
        assert rec["embeddings"].dtype == torch.float32
        emb, grads = rec["embeddings"][:], rec["grads"][:]
        m, v, lrs = rec["exp_avg"][:], rec["exp_avg_sq"][:], rec["lr"][:]
        b1, b2, eps = rec.meta["adam_beta1"], rec.meta["adam_beta2"], rec.meta["adam_epsilon"]
        assert len(set(lrs[1:].tolist())) > 1, "the cosine schedule changes the rate every step"
        for t in range(5):
            step = int(rec.steps[t + 1])
            # The recorded gradient is the one the optimizer folded into its moments.
            torch.testing.assert_close(m[t + 1], b1 * m[t] + (1 - b1) * grads[t + 1], rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(v[t + 1], b2 * v[t] + (1 - b2) * grads[t + 1] ** 2, rtol=1e-5, atol=1e-12)
            update = adam_update(emb[t], m[t + 1], v[t + 1], float(lrs[t + 1]), step, (b1, b2), eps, weight_decay)
            torch.testing.assert_close(emb[t + 1], emb[t] - update, rtol=1e-6, atol=1e-7)
        assert (emb[-1] - emb[0]).abs().max() > 1e-4, "the rows learned"
        if strategy == "full":
            assert (emb[-1, : rows_in(rec, "base")] != emb[0, : rows_in(rec, "base")]).any(), "base rows train too"


@pytest.mark.parametrize("strategy, rows", [("mask", "all"), ("tokens", "new")])
def test_a_slow_copy_still_records_the_step_not_the_next_one(tiny_model, texts, strategy, rows, monkeypatch):
    """The recorder lends live rows, gradients and Adam state to the writer, which copies them on its own thread.

    Here that copy is made slow (0.2 s, longer than a tiny step), so without the wait before the next optimizer
    step it would read rows the next step (and ``mask``'s decay, which runs before it) had already changed.
    """
    copied = []
    real_copy = recording.RecordingWriter._copy_lent

    def slow_copy(self, item, lent):
        time.sleep(0.2)
        copied.append(sorted(lent))
        real_copy(self, item, lent)

    monkeypatch.setattr(recording.RecordingWriter, "_copy_lent", slow_copy)
    extra = {
        "train.trainable": strategy,
        "train.weight_decay": 0.1,
        "train.max_steps": 3,
        "train.warmup_steps": 0,
        "recorder.dtype": "param",
        "recorder.rows": rows,
    }
    _, rec = recorded_run(tiny_model, texts, **extra)
    assert len(copied) == 4 and "embeddings" in copied[0], "the rows went through the lent (deferred) copy"
    with rec:
        emb, grads = rec["embeddings"][:], rec["grads"][:]
        m, v, lrs = rec["exp_avg"][:], rec["exp_avg_sq"][:], rec["lr"][:]
        b1, b2, eps = rec.meta["adam_beta1"], rec.meta["adam_beta2"], rec.meta["adam_epsilon"]
        new = slice(rows_in(rec, "base"), None)
        for t in range(3):
            torch.testing.assert_close(m[t + 1], b1 * m[t] + (1 - b1) * grads[t + 1], rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(v[t + 1], b2 * v[t] + (1 - b2) * grads[t + 1] ** 2, rtol=1e-5, atol=1e-12)
            update = adam_update(emb[t], m[t + 1], v[t + 1], float(lrs[t + 1]), t + 1, (b1, b2), eps, 0.1)
            torch.testing.assert_close(emb[t + 1, new], (emb[t] - update)[new], rtol=1e-6, atol=1e-7)
        assert (emb[1:, new] != emb[:-1, new]).any(dim=-1).any(dim=-1).all(), "every step moved the new rows"


def rows_in(rec, which: str) -> int:
    """How many of the recorded rows are base rows (they come first)."""
    return sum(1 for i in rec.token_ids if i < rec.meta["num_base"])


def test_grad_accum_masks_once_per_step_and_logs_the_mean_over_micro_batches(tiny_model, texts, tmp_path):
    """3 micro-batches of 1 block make the same step as 1 batch of 3 blocks: same loss, same rows, one mask each."""
    counter = tmp_path / "count_masks.py"
    counter.write_text(
        "import wakelab\nCALLS = []\n@wakelab.hookimpl\ndef mask_grads(ctx):\n    CALLS.append(ctx.step)\n"
    )
    runs = {}
    for accum, batch in ((3, 1), (1, 3)):
        overrides = tiny_overrides(
            tiny_model,
            texts,
            **{
                **FAST,
                "train.trainable": "mask",
                "train.weight_decay": 0.1,
                "train.grad_accum": accum,
                "train.batch_size": batch,
                "train.max_steps": 4,
                "train.logging_steps": 1,
                "output_dir": f"out-{accum}",
            },
        )
        overrides["plugins"] = ["recorder", str(counter)]
        result = engine.run(build_config(None, None, overrides), progress=False)
        history = mlflow.MlflowClient().get_metric_history(result.run_id, "loss")
        with recording.open(result.output_dir / "recording") as rec:
            runs[accum] = {
                "logged": [m.value for m in sorted(history, key=lambda m: m.step)],
                "recorded": rec["loss"][1:].tolist(),
                "rows": rec["embeddings"][-1].clone(),
            }
        calls = loaded_plugin(counter).CALLS  # cached between runs: emptied after each
        assert calls == [1, 2, 3, 4], "mask_grads runs once per optimizer step, not per micro-batch"
        calls.clear()
    accumulated, whole = runs[3], runs[1]
    assert len(accumulated["logged"]) == 4
    assert accumulated["logged"] == pytest.approx(whole["logged"], rel=1e-5)
    assert accumulated["recorded"] == pytest.approx(accumulated["logged"], rel=1e-5)
    torch.testing.assert_close(accumulated["rows"], whole["rows"], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Base rows, masking, clipping, and the starting state


@pytest.mark.parametrize("strategy", ["tokens", "mask"])
def test_base_rows_identical_and_grads_are_masked_and_clipped(tiny_model, texts, strategy):
    max_norm = 1e-3
    extra = {
        "train.trainable": strategy,
        "train.weight_decay": 0.1,
        "train.max_steps": 5,
        "train.max_grad_norm": max_norm,
        "train.lr": 5e-2,
        "recorder.rows": "all",
        "recorder.dtype": "param",
    }
    _, rec = recorded_run(tiny_model, texts, **extra)
    with rec:
        num_base = rec.meta["num_base"]
        assert rec.token_ids == list(range(rec.meta["vocab_size"]))
        emb = rec["embeddings"]
        first, last = emb[0], emb[-1]
        assert torch.equal(first[:num_base].view(torch.int32), last[:num_base].view(torch.int32)), "base rows moved"
        assert not torch.equal(first[num_base:], last[num_base:]), "new rows did not learn"
        grads = rec["grads"][:]
        assert torch.count_nonzero(grads[:, :num_base]) == 0, "base-row gradients reached the optimizer"
        norms = grads.flatten(1).norm(dim=1)
        assert norms[0] == 0, "the starting state has zero gradients"
        # Every trained row is recorded, so this is the norm the clip saw: at most max_grad_norm (clipping was active).
        assert (norms[1:] <= max_norm * (1 + 1e-5)).all(), norms
        assert (norms[1:] >= max_norm * 0.99).all(), norms
        # A fresh run has no optimizer state before its first step: zeros, flagged in the index.
        assert rec.flags[MISSING_FLAG] == [0]
        assert torch.count_nonzero(rec["exp_avg"][0]) == 0 and torch.count_nonzero(rec["exp_avg_sq"][0]) == 0
        assert torch.count_nonzero(rec["exp_avg_sq"][-1][num_base:]) > 0


def test_every_n_steps_and_a_resume_records_beside_with_its_optimizer_state(tiny_model, texts, tmp_path):
    from wakelab.storage.checkpoints import latest_checkpoint

    extra = {"train.max_steps": 4, "train.save_steps": 2, "recorder.every": 3, "recorder.dtype": "param"}
    first, rec = recorded_run(tiny_model, texts, **extra)
    with rec:
        assert rec.steps.tolist() == [0, 3, 4], "the start, every 3rd step and the last"
        assert rec.flags[MISSING_FLAG] == [0]
        last = rec["embeddings"][-1]
    overrides = tiny_overrides(tiny_model, texts, **{**FAST, **extra, "train.max_steps": 6})
    overrides["plugins"] = ["recorder"]
    config = build_config(None, None, overrides)
    engine.run(config, progress=False, resume_from=str(latest_checkpoint(first.output_dir)))
    assert recording.open(first.output_dir / "recording").steps.tolist() == [0, 3, 4], "left as it was"
    with recording.open(first.output_dir / "recording-from-step-4") as resumed:
        assert resumed.steps.tolist() == [4, 6]
        assert resumed.flags[MISSING_FLAG] == [], "a resumed run starts with the checkpoint's optimizer state"
        assert torch.count_nonzero(resumed["exp_avg_sq"][0]) > 0
        assert torch.equal(resumed["embeddings"][0], last), "the resume starts where the first run ended"


# ----------------------------------------------------------------------------------------------------------------------
# Rows


def test_resolve_rows_forms(tmp_path):
    assert resolve_rows("new", 10, 7).tolist() == [7, 8, 9]
    assert resolve_rows("base", 10, 7).tolist() == list(range(7))
    assert resolve_rows("all", 10, 7).tolist() == list(range(10))
    assert resolve_rows([9, 2, 2, 0], 10, 7).tolist() == [9, 2, 0]
    assert resolve_rows("3, 5 1", 10, 7).tolist() == [3, 5, 1]
    sample = resolve_rows("sample:4", 100, 90, seed=3)
    assert sample.tolist() == resolve_rows("sample:4", 100, 90, seed=3).tolist() == sorted(sample.tolist())
    assert sample.tolist() != resolve_rows("sample:4", 100, 90, seed=4).tolist()
    assert all(i >= 90 for i in resolve_rows("sample:5:new", 100, 90).tolist())
    text = tmp_path / "ids.txt"
    text.write_text("# chosen\n4, 8\n9  # last\n")
    assert resolve_rows(str(text), 10, 7).tolist() == [4, 8, 9]
    js = tmp_path / "ids.json"
    js.write_text("[1, 2]")
    assert resolve_rows(str(js), 10, 7).tolist() == [1, 2]
    for bad, message in [
        ("sample:0", "choose 1 <= K <= 10"),
        ("sample:11:all", "has 10"),
        ("sample:x", "sample:K"),
        ("newest", "is not new, all, base"),
        ([1, -1, 10, 12], "token id(s) -1, 10, 12 are outside the vocabulary of 10 tokens"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            resolve_rows(bad, 10, 7)


def test_rows_outside_the_vocabulary_stop_the_run_before_training(tiny_model, texts, tmp_path):
    vocab = vocab_size(tiny_model)
    result = CliRunner().invoke(main, cli_args(tiny_model, texts, **{"recorder.rows": f"[0, 5, {vocab}, 99999]"}))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("wakelab: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert f"token id(s) {vocab}, 99999 are outside the vocabulary of {vocab} tokens" in errors[0]
    assert not (tmp_path / "out" / "recording").exists()
    runs = mlflow.search_runs(search_all_experiments=True)
    assert runs["status"].tolist() == ["FAILED"]
    history = mlflow.MlflowClient().get_metric_history(runs["run_id"][0], "loss")
    assert history == [], "no step was trained"


# ----------------------------------------------------------------------------------------------------------------------
# Streaming: a killed run and a full disk leave their completed shards readable


def test_killed_run_leaves_completed_shards_readable(tiny_model, texts, tmp_path):
    args = cli_args(tiny_model, texts, **{"recorder.steps_per_shard": 1, "train.max_steps": 5000})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "wakelab", *args], cwd=tmp_path, env=env, stdout=log, stderr=log)
    index = tmp_path / "out" / "recording" / "index.json"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(json.loads(index.read_text())["shards"]) >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    with recording.open(index.parent) as rec:
        assert not rec.complete
        n = len(rec)
        assert n >= 2
        assert rec.steps.tolist() == list(range(n))
        emb = rec["embeddings"][:]
        assert emb.shape == (n, len(COINED), TINY_HIDDEN) and torch.isfinite(emb.float()).all()
        assert rec["loss"][1:].isfinite().all()


def test_full_disk_stops_the_run_with_one_clear_line(tiny_model, texts, tmp_path, monkeypatch):
    real_save = recording._save_shard
    calls = []

    def save_then_fill_up(path, blocks, metadata):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(path, blocks, metadata)

    monkeypatch.setattr("wakelab.storage.recording.writer._save_shard", save_then_fill_up)
    result = CliRunner().invoke(
        main, cli_args(tiny_model, texts, **{"recorder.steps_per_shard": 2, "train.max_steps": 40})
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("wakelab: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    assert "recording stopped: disk full writing shard-00001.safetensors" in errors[0]
    assert "completed shards up to step 1 are intact" in errors[0]
    with recording.open(tmp_path / "out" / "recording") as rec:
        assert not rec.complete
        assert rec.steps.tolist() == [0, 1]
        assert rec["embeddings"][:].shape == (2, len(COINED), TINY_HIDDEN)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert runs["status"].tolist() == ["FAILED"]
    history = mlflow.MlflowClient().get_metric_history(runs["run_id"][0], "loss")
    assert max((m.step for m in history), default=0) < 40, "the run stopped"


def test_recording_errors_are_wakelab_errors():
    assert issubclass(recording.RecordingError, WakelabError)


def test_writer_depth_fits_the_buffer_and_never_drops_below_one_step():
    from wakelab import FieldSpec
    from wakelab.plugins.recorder import step_bytes, writer_depth

    p1_new_rows = {"embeddings": FieldSpec((44_195, 2048), torch.float32)}  # 345 MiB a step
    assert round(step_bytes(p1_new_rows) / 2**20) == 345
    assert writer_depth(p1_new_rows, 10, 1024) == (1, 1)  # 3 steps held: the least a writer can hold
    assert writer_depth(p1_new_rows, 10, 4096) == (9, 1)  # 11 x 345 MiB <= 4 GiB
    small = {"embeddings": FieldSpec((8, 64), torch.bfloat16)}
    assert writer_depth(small, 10, 1024) == (10, 4)  # the defaults when steps are small
    for budget in (1024, 2048, 4096, 8192):
        shard, queue = writer_depth(p1_new_rows, 10, budget)
        assert (queue + shard + 1) * step_bytes(p1_new_rows) <= max(budget * 2**20, 3 * step_bytes(p1_new_rows))


def test_a_small_buffer_gives_one_step_shards_and_says_so(tiny_model, texts, tmp_path):
    result = CliRunner().invoke(main, cli_args(tiny_model, texts, **{"recorder.buffer_mb": 0.001}))
    assert result.exit_code == 0, result.output
    assert "1 step(s) per shard and 1 queued keep the writer within recorder.buffer_mb=0.001" in result.stderr
    with recording.open(tmp_path / "out" / "recording") as rec:
        assert rec.complete and rec.steps.tolist() == list(range(0, 7)) and len(rec.shards) == 7
