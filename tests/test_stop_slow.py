"""SIGTERM, as a scheduler sends it, to real wakelab processes: 20 trials at random moments of a run, the command
line's exit status and resume hint, and a sweep stopped and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import mlflow
import pytest
from conftest import tiny_overrides, write_config_file

pytestmark = pytest.mark.slow

# The moment each trial's SIGTERM lands is random within training, which here writes a checkpoint every 2 steps,
# mirrors it (sentry) and records every step (recorder): forward passes, optimizer steps, checkpoint writes, mirrors
# and recorder flushes all take their share of the run. A throw-away plugin marks when the first step ended
# (before it, a signal stops the run before any step, with nothing to resume). One driver process imports wakelab
# once and forks a child per run (it runs no torch op itself, so forking is safe).
DRIVER = textwrap.dedent("""
    import json, os, random, shutil, signal, sys, time
    from pathlib import Path
    import numpy as np
    import mlflow
    from safetensors.numpy import load_file
    from wakelab.run import engine
    from wakelab.storage.checkpoints import list_checkpoints, verify
    from wakelab.config import build_config
    from wakelab.run.stopping import Stopped

    overrides, trials, seed = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    mlflow.MlflowClient("sqlite:///template.db").search_experiments()  # the schema, made once

    def child(output_dir, resume_from=None):
        if not Path(f"{output_dir}.db").exists():
            shutil.copy("template.db", f"{output_dir}.db")
        pid = os.fork()
        if pid == 0:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{output_dir}.db"
            try:
                values = {**overrides, "output_dir": output_dir, "sentry.target": f"{output_dir}-mirrors"}
                engine.run(build_config(None, None, values), progress=False, resume_from=resume_from)
                os._exit(0)
            except Stopped as exc:
                os._exit(exc.exit_code)
            except BaseException as exc:
                print(f"child failed: {exc!r}", file=sys.stderr, flush=True)
                os._exit(1)
        return pid

    def final_rows(output_dir):
        return load_file(str(Path(output_dir) / "final" / "new_rows.safetensors"))["rows"]

    def wait_exit(pid):
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    started = time.monotonic()
    pid = child("reference")
    assert wait_exit(pid) == 0, "reference run failed"
    reference = final_rows("reference")
    marks = json.loads(Path("reference-marks.json").read_text())
    training = marks["last_step"] - marks["first_step"]
    rng = random.Random(seed)
    report = []
    missed = 0
    for trial in range(trials):
        out = f"trial{trial}"
        limit = training
        while True:
            pid = child(out)
            deadline = time.monotonic() + 120
            while not Path(f"{out}-marks.json").exists():
                if time.monotonic() > deadline:
                    raise SystemExit(f"trial {trial}: training did not start")
                time.sleep(0.002)
            delay = rng.uniform(0.0, limit)  # between the first step's end and (about) the last one's
            time.sleep(delay)
            os.kill(pid, signal.SIGTERM)
            code = wait_exit(pid)
            if code != 0 or not Path(out, "final").is_dir():
                break
            # This run was faster than the reference and had finished its steps: the signal let it finish
            # (exit 0, FINISHED). Not a trial of a stop: try again, earlier.
            missed += 1
            limit /= 2
            for folder in (out, f"{out}-mirrors"):
                shutil.rmtree(folder, ignore_errors=True)
            for name in (f"{out}-marks.json", f"{out}.db"):
                Path(name).unlink(missing_ok=True)
        client = mlflow.MlflowClient(f"sqlite:///{out}.db")
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        complete = list_checkpoints(out)
        for folder in complete:
            verify(folder)
        mirrors = sorted(Path(f"{out}-mirrors").rglob("manifest.json"))
        for manifest in mirrors:
            verify(manifest.parent)  # every mirror complete too
        entry = {"trial": trial, "delay": round(delay, 3), "exit": code, "status": run.info.status,
                 "signal_tag": run.data.tags.get("wakelab.stop.signal"),
                 "stopped_at": run.data.tags.get("wakelab.stop.step"),
                 "checkpoints": [p.name for p in complete], "mirrors": len(mirrors)}
        if complete:
            pid = child(out, resume_from=str(complete[-1]))
            entry["resume_exit"] = wait_exit(pid)
            entry["identical"] = entry["resume_exit"] == 0 and bool(
                np.array_equal(final_rows(out).view(np.uint8), reference.view(np.uint8)))
        report.append(entry)
    print(json.dumps({"training_s": training, "total_s": time.monotonic() - started, "missed": missed,
                      "trials": report}))
""")

MARKS_PLUGIN = '''
"""Marks when the first and the last step ended, for the driver's timing."""
import json
import os
import time
from pathlib import Path

import wakelab

_marks = {}


@wakelab.hookimpl
def on_run_start(run):
    _marks.clear()
    _marks["out"] = str(run.output_dir)
    _marks["max_steps"] = run.config.train.max_steps


@wakelab.hookimpl
def on_step_end(state):
    if "first_step" not in _marks:
        _marks["first_step"] = time.time()
        Path(_marks["out"] + "-marks.json").write_text(json.dumps(_marks))
    if state.step == _marks["max_steps"]:
        _marks["last_step"] = time.time()
        Path(_marks["out"] + "-marks.json").write_text(json.dumps(_marks))
'''


def test_sigterm_at_20_random_moments_ends_killed_and_resumes_bit_identical(tiny_model, texts, tmp_path):
    marks = tmp_path / "marks.py"
    marks.write_text(MARKS_PLUGIN)
    overrides = tiny_overrides(
        tiny_model,
        texts,
        **{
            "train.max_steps": 10,
            "train.save_steps": 2,
            "train.save_total_limit": 2,
            "train.logging_steps": 1,
            "train.eval_perplexity": False,
            "train.weight_decay": 0.1,
            "recorder.every": 1,
            "plugins": ["sentry", "recorder", str(marks)],
        },
    )
    trials = int(os.environ.get("WAKELAB_STOP_TRIALS", "20"))  # fewer only for a quick local look
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(overrides), str(trials), "7"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (tmp_path / "report.json").write_text(json.dumps(result, indent=1))
    report = result["trials"]
    assert len(report) == trials
    for entry in report:
        # Every trial: exit 128 + SIGTERM, the run KILLED and tagged, a complete checkpoint, an identical resume.
        assert entry["exit"] == 128 + signal.SIGTERM, entry
        assert entry["status"] == "KILLED" and entry["signal_tag"] == "SIGTERM", entry
        assert entry["checkpoints"] and entry["identical"], entry
    # The signals landed at many different steps of the run.
    assert len({e["stopped_at"] for e in report}) >= 4, report
    print(
        f"training {result['training_s']:.1f} s; {trials} trials in {result['total_s']:.0f} s "
        f"({result['missed']} signals came after the last step and were tried again)"
    )


def write_config(tmp_path, tiny_model, texts, **extra) -> None:
    write_config_file(tmp_path / "tiny.yaml", tiny_overrides(tiny_model, texts, **extra))


def wakelab(tmp_path, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(
        [sys.executable, "-m", "wakelab", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


SIGTERM_ONCE = """
import os, signal
from pathlib import Path
import wakelab

@wakelab.hookimpl
def on_step_end(state):
    marker = Path("signalled")
    if state.step == 3 and {condition} and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGTERM)
"""


def test_cli_sigterm_exits_143_and_prints_the_resume_command(tiny_model, texts, tmp_path):
    (tmp_path / "term.py").write_text(SIGTERM_ONCE.format(condition="True"))
    write_config(tmp_path, tiny_model, texts, **{"train.max_steps": 6})
    stopped = wakelab(tmp_path, "run", "--config", "tiny.yaml", "--plugin", "term.py", "--no-progress")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "wakelab: SIGTERM received: stopping after the current step" in stopped.stderr
    assert (
        "wakelab: stopped by SIGTERM after step 3; the MLflow run is marked KILLED; checkpoint out/checkpoint-3 "
        "is complete; continue with: wakelab resume out"
    ) in stopped.stderr
    assert "Traceback" not in stopped.stderr
    resumed = wakelab(tmp_path, "resume", "out", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED" and (tmp_path / "out" / "final" / "new_rows.safetensors").is_file()


def test_sigterm_to_a_sweep_then_resume(tiny_model, texts, tmp_path):
    # The signal comes in the second child's third step; the first child has finished, the third not started.
    (tmp_path / "term.py").write_text(SIGTERM_ONCE.format(condition='Path("sw/lr=0.02").is_dir()'))
    write_config(tmp_path, tiny_model, texts, **{"train.max_steps": 6, "train.eval_perplexity": False})
    stopped = wakelab(
        tmp_path,
        "sweep",
        "--over",
        "lr=0.01,0.02,0.03",
        "--config",
        "tiny.yaml",
        "--plugin",
        "term.py",
        "--output-dir",
        "sw",
        "--no-progress",
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    parent = json.loads((tmp_path / "sw" / "sweep.json").read_text())["parent_run_id"]
    assert (
        f"sweep stopped by SIGTERM; the parent run and lr=0.02 are marked KILLED; continue with: "
        f"wakelab sweep --resume {parent}"
    ) in stopped.stderr
    client = mlflow.MlflowClient()

    def statuses():
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        return {r.info.run_name: (r.info.status, r.info.run_id) for r in runs}

    before = statuses()
    assert {name: status for name, (status, _) in before.items() if name.startswith("lr=")} == {
        "lr=0.01": "FINISHED",
        "lr=0.02": "KILLED",
    }
    assert client.get_run(parent).info.status == "KILLED"
    assert (tmp_path / "sw" / "lr=0.02" / "checkpoint-3").is_dir()
    first_rows = (tmp_path / "sw" / "lr=0.01" / "final" / "new_rows.safetensors").read_bytes()

    resumed = wakelab(tmp_path, "sweep", "--resume", parent, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "lr=0.01 finished before; kept" in resumed.stderr
    assert "lr=0.02 -> sw/lr=0.02 (continuing from sw/lr=0.02/checkpoint-3)" in resumed.stderr
    after = statuses()
    assert client.get_run(parent).info.status == "FINISHED"
    assert {name: status for name, (status, _) in after.items() if name.startswith("lr=")} == {
        "lr=0.01": "FINISHED",
        "lr=0.02": "FINISHED",
        "lr=0.03": "FINISHED",
    }
    # The finished child was kept (same run, same rows); the stopped one went on in its own run.
    assert after["lr=0.01"][1] == before["lr=0.01"][1] and after["lr=0.02"][1] == before["lr=0.02"][1]
    assert (tmp_path / "sw" / "lr=0.01" / "final" / "new_rows.safetensors").read_bytes() == first_rows
    assert [m.step for m in client.get_metric_history(after["lr=0.02"][1], "loss")][-1] == 6
    assert "| lr=0.03 | FINISHED |" in resumed.stdout
