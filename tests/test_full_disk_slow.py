"""A real full disk, not an injected one: the run's output directory on a small tmpfs that fills up between two
checkpoints. The run ends in one line (exit 4, no traceback), checkpoint-2 stays complete, the MLflow run is FAILED
with the cause as its tag; once space is freed, `wakelab resume` finishes it bit for bit like a run that never
failed, and clears the half-written checkpoint from staging.

Mounting a tmpfs needs root (or CAP_SYS_ADMIN): elsewhere the test is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pytest
import torch
from conftest import tiny_overrides, write_config_file
from safetensors.torch import load_file

from wakelab.storage.checkpoints import STAGING, list_checkpoints, verify

pytestmark = pytest.mark.slow

SIZE = "4m"

FILLER = '''
"""After checkpoint-2 (step 3), fill the file system the output directory is on, leaving one page free."""
import errno
from pathlib import Path

import wakelab


@wakelab.hookimpl
def on_step_end(state):
    ballast = Path(BALLAST)
    if state.step != 3 or ballast.with_suffix(".done").exists():  # once: not again when the run is resumed
        return
    ballast.with_suffix(".done").write_text("")
    with open(ballast, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(ballast, "r+b", buffering=0) as handle:
        handle.truncate(max(ballast.stat().st_size - 4096, 0))  # one page: the next checkpoint cannot fit
'''


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {SIZE} tmpfs here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def wakelab(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "wakelab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_a_real_full_disk_is_one_line_and_resume_finishes_bit_exactly(small_fs, tiny_model, texts, tmp_path):
    values = {"train.save_steps": 2, "train.logging_steps": 1, "train.max_steps": 6}
    reference = write_config_file(tmp_path / "reference.yaml", tiny_overrides(tiny_model, texts, **values))
    done = wakelab("run", "--config", str(reference), "--no-progress", "--output-dir", "reference", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    out = small_fs / "run"
    filler = tmp_path / "filler.py"
    filler.write_text(FILLER.replace("BALLAST", repr(str(small_fs / "ballast"))))
    config = write_config_file(tmp_path / "run.yaml", tiny_overrides(tiny_model, texts, **values))
    failed = wakelab(
        "run", "--config", str(config), "--no-progress", "--output-dir", str(out), "--plugin", str(filler), cwd=tmp_path
    )
    assert failed.returncode == 4, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("wakelab: error:")]
    assert len(errors) == 1, failed.stderr[-3000:]
    line = errors[0]
    assert f"disk full writing {out / STAGING / 'checkpoint-4'}/" in line, line  # the file being written in it
    assert f"the last complete checkpoint {out / 'checkpoint-2'} (step 2) is intact" in line, line
    assert line.endswith(f"then: wakelab resume {out}"), line
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"] and not (out / "checkpoint-4").exists()
    verify(out / "checkpoint-2")
    assert not (out / "final" / "new_rows.safetensors").exists()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((out / "wakelab_run.json").read_text())["run_id"]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["wakelab.error"].startswith("disk full writing")

    (small_fs / "ballast").unlink()  # space freed
    resumed = wakelab("resume", str(out), "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / STAGING).exists() or not any((out / STAGING).iterdir())
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    a = load_file(out / "final" / "new_rows.safetensors")["rows"]
    b = load_file(tmp_path / "reference" / "final" / "new_rows.safetensors")["rows"]
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "rows differ after resume"
    print(f"real full disk ({SIZE} tmpfs): {line}")
    shutil.rmtree(out, ignore_errors=True)
