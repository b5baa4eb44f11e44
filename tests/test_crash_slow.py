"""SIGKILL during checkpoint writes, 20 trials at random moments: resume always starts from the last complete
checkpoint and reproduces the uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import tiny_overrides

pytestmark = pytest.mark.slow

# One driver process imports wakelab once and forks a child per trial: the driver itself runs no torch op, so
# forking is safe, and each trial costs a fork instead of a fresh interpreter.
DRIVER = textwrap.dedent('''
    import json, os, random, signal, sys, time
    from pathlib import Path
    import numpy as np
    from safetensors.numpy import load_file
    from wakelab import engine
    from wakelab.checkpoints import list_checkpoints, verify
    from wakelab.config import build_config

    overrides, trials, seed = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

    def child(output_dir, resume_from=None):
        pid = os.fork()
        if pid == 0:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{output_dir}.db"
            try:
                config = build_config(None, None, {**overrides, "output_dir": output_dir})
                engine.run(config, progress=False, resume_from=resume_from)
                os._exit(0)
            except BaseException as exc:
                print(f"child failed: {exc!r}", file=sys.stderr, flush=True)
                os._exit(1)
        return pid

    def final_rows(output_dir):
        return load_file(str(Path(output_dir) / "final" / "new_rows.safetensors"))["rows"]

    pid = child("reference")
    assert os.waitpid(pid, 0)[1] == 0, "reference run failed"
    reference = final_rows("reference")
    rng = random.Random(seed)
    report = []
    for trial in range(trials):
        out = f"trial{trial}"
        pid = child(out)
        deadline = time.monotonic() + 120
        while not list(Path(out).glob("checkpoint-*")) and not list(Path(out).glob(".staging/checkpoint-*")):
            if time.monotonic() > deadline:
                raise SystemExit(f"trial {trial}: no checkpoint appeared")
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        complete = list_checkpoints(out)
        for folder in Path(out).glob("checkpoint-*"):
            verify(folder)  # complete or absent: never a half-written checkpoint-N
        resume = str(complete[-1]) if complete else None
        if resume is None:
            import shutil
            shutil.rmtree(out)
        pid = child(out, resume_from=resume)
        assert os.waitpid(pid, 0)[1] == 0, f"trial {trial}: resume from {resume} failed"
        same = np.array_equal(final_rows(out).view(np.uint8), reference.view(np.uint8))
        report.append({"trial": trial, "resumed_from": resume, "identical": bool(same)})
    print(json.dumps(report))
''')


def test_sigkill_during_checkpoint_writes_20_trials(tiny_model, texts, tmp_path):
    overrides = tiny_overrides(tiny_model, texts, **{
        "train.max_steps": 12, "train.save_steps": 1, "train.save_total_limit": 3, "train.logging_steps": 1,
        "train.eval_perplexity": False, "train.weight_decay": 0.1,
    })
    trials = int(os.environ.get("WAKELAB_CRASH_TRIALS", "20"))  # fewer only for a quick local look
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(overrides), str(trials), "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == trials
    assert all(r["identical"] for r in report), report
    # The kills landed at different points: several distinct resume checkpoints were used.
    assert len({r["resumed_from"] for r in report}) >= 3, report
