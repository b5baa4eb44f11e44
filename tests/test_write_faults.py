"""A full disk or an I/O error at every named write point: one line naming the file, what is intact and the command
to continue; exit 4; no traceback; nothing half-written published; the MLflow run FAILED with the line as its tag;
and `wakelab resume` continues bit for bit, clearing what the failure left in staging.

The error is injected with ``WAKELAB_FAULT_AT`` at the named moments (wakelab.storage.writepoint), or by patching a
writer so it writes half a file first. test_full_disk_slow.py does the same on a real, small file system.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from conftest import run_store, tiny_overrides, write_config_file
from safetensors.torch import load_file

from wakelab.cli.main import main
from wakelab.storage import crashpoint, writepoint
from wakelab.storage.checkpoints import STAGING, list_checkpoints, verify

SHOWN = Path("out")  # the output directory as the config gives it, and so as the line names it
BASE = {"train.save_steps": 2, "train.logging_steps": 1, "train.max_steps": 6}


@pytest.fixture(scope="module")
def reference(tiny_model, texts, tmp_path_factory, empty_mlflow_db):
    """The same run, never interrupted: what every resumed run must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("reference")
    runs = run_store(root, empty_mlflow_db, {"straight": tiny_overrides(tiny_model, texts, **BASE)})
    client = mlflow.MlflowClient(runs["uri"])
    losses = {m.step: m.value for m in client.get_metric_history(runs["straight"].run_id, "loss")}
    rows = load_file(root / "straight" / "final" / "new_rows.safetensors")["rows"]
    return {"losses": losses, "rows": rows}


@pytest.fixture(autouse=True)
def fresh_counters():
    writepoint._reached.clear()
    crashpoint._reached.clear()
    yield
    writepoint._reached.clear()


def run_cli(tiny_model, texts, tmp_path, monkeypatch, fault=None, err="ENOSPC", plugins=(), **extra):
    config = write_config_file(tmp_path / "run.yaml", tiny_overrides(tiny_model, texts, **{**BASE, **extra}))
    if fault:
        monkeypatch.setenv(writepoint.ENV_AT, fault)
        monkeypatch.setenv(writepoint.ENV_ERRNO, err)
    args = ["run", "--config", str(config), "--no-progress"]
    for plugin in plugins:
        args += ["--plugin", plugin]
    try:
        return CliRunner().invoke(main, args)
    finally:
        monkeypatch.delenv(writepoint.ENV_AT, raising=False)


def the_line(result) -> str:
    """The run's error: exactly one `wakelab: error:` line, exit 4, no traceback anywhere."""
    assert result.exit_code == 4, (result.exit_code, result.output[-3000:], result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("wakelab: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
    return errors[0]


def the_run():
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    return mlflow.get_run(runs["run_id"][0])


def assert_failed_with(line: str, cause: str) -> None:
    run = the_run()
    assert run.info.status == "FAILED"
    assert cause in run.data.tags["wakelab.error"] and run.data.tags["wakelab.error"] in line


def resume_matches(reference, tmp_path) -> None:
    """`wakelab resume out` finishes the same MLflow run, bit for bit the uninterrupted one; staging is cleared."""
    run_id = the_run().info.run_id
    result = CliRunner().invoke(main, ["resume", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    out = tmp_path / "out"
    assert not (out / STAGING).exists() or not any((out / STAGING).iterdir()), "resume left the failed staging"
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    rows = load_file(out / "final" / "new_rows.safetensors")["rows"]
    assert torch.equal(rows.view(torch.uint8), reference["rows"].view(torch.uint8)), "rows differ after resume"
    losses = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")}
    assert losses == reference["losses"]


# -- checkpoints: the staging files, the manifest, the rename -------------------------------------------------------

CHECKPOINT_POINTS = {
    # (fault, errno): where in checkpoint-4's write the disk fails
    "staging-start": ("checkpoint:2", "ENOSPC"),  # before any of its files
    "staging-files": ("rows-written:2", "ENOSPC"),  # the rows written, Trainer's optimizer state not yet
    "manifest": ("manifest-tmp:2", "ENOSPC"),  # every file written, the manifest not yet renamed in
    "rename": ("staged:2", "EIO"),  # complete in staging, not yet published
}
SLOW = pytest.mark.slow  # each case is a run and its resume: the fast suite keeps one case of each write point


@pytest.mark.parametrize(
    "point", [p if p == "staging-files" else pytest.param(p, marks=SLOW) for p in CHECKPOINT_POINTS]
)
def test_checkpoint_write_fails_in_one_line_and_resume_is_bit_exact(
    point, tiny_model, texts, tmp_path, monkeypatch, reference
):
    fault, err = CHECKPOINT_POINTS[point]
    result = run_cli(tiny_model, texts, tmp_path, monkeypatch, fault=fault, err=err)
    line = the_line(result)
    out = tmp_path / "out"
    cause = "disk full" if err == "ENOSPC" else "I/O error"
    assert line.startswith(f"wakelab: error: {cause} writing {SHOWN / STAGING / 'checkpoint-4'}"), line
    assert f"the last complete checkpoint {SHOWN / 'checkpoint-2'} (step 2) is intact" in line, line
    assert f"then: wakelab resume {SHOWN}" in line, line
    assert_failed_with(line, cause)
    # Nothing half-written published: checkpoint-2 verifies, checkpoint-4 is not there, final/ is not written.
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "checkpoint-4").exists()
    verify(out / "checkpoint-2")
    assert not (out / "final" / "new_rows.safetensors").exists()
    resume_matches(reference, tmp_path)


@SLOW
def test_half_written_checkpoint_file_names_the_file(tiny_model, texts, tmp_path, monkeypatch, reference):
    """The writer itself fails half-way (safetensors' Rust error carries only 'os error 28' in its text)."""
    from safetensors import SafetensorError

    import wakelab.run.trainer as trainer_mod

    real = trainer_mod.WakelabTrainer.save_model
    calls = []

    def half_then_full(self, output_dir=None, _internal_call=False):
        calls.append(output_dir)
        if len(calls) == 2:
            trainer_mod.Path(output_dir).mkdir(parents=True, exist_ok=True)
            (trainer_mod.Path(output_dir) / trainer_mod.ROWS_FILE).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })(os error 28)")
        return real(self, output_dir, _internal_call)

    monkeypatch.setattr(trainer_mod.WakelabTrainer, "save_model", half_then_full)
    line = the_line(run_cli(tiny_model, texts, tmp_path, monkeypatch))
    assert "disk full writing" in line and "checkpoint-4" in line and "checkpoint-2 (step 2) is intact" in line
    monkeypatch.undo()
    resume_matches(reference, tmp_path)


# -- the end of the run: final/ and the logged model ------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault", ["final", pytest.param("publish-file:1", marks=SLOW), pytest.param("publish-dir:1", marks=SLOW)]
)
def test_final_write_fails_in_one_line_and_resume_finishes_it(
    fault, tiny_model, texts, tmp_path, monkeypatch, reference
):
    result = run_cli(tiny_model, texts, tmp_path, monkeypatch, fault=fault)
    line = the_line(result)
    out = tmp_path / "out"
    assert "disk full writing" in line and str(SHOWN / "final") in line, line
    assert f"every checkpoint is intact, the last {SHOWN / 'checkpoint-6'} (step 6)" in line, line
    assert f"then: wakelab resume {SHOWN}" in line
    assert_failed_with(line, "disk full")
    final = out / "final"
    leftovers = [p.name for p in final.iterdir()] if final.exists() else []
    assert not [name for name in leftovers if ".tmp" in name], leftovers  # no temporary file left behind
    if (final / "new_rows.safetensors").exists():  # published before the fault: then it is whole
        load_file(final / "new_rows.safetensors")
    resume_matches(reference, tmp_path)


def test_logged_model_write_fails_in_one_line(tiny_model, texts, tmp_path, monkeypatch, reference):
    import wakelab.run.logged_model as logged_model

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/wakelab-delta-x/tokenizer/tokenizer.json")

    monkeypatch.setattr(logged_model, "log_delta_model", full)
    line = the_line(run_cli(tiny_model, texts, tmp_path, monkeypatch))
    assert "disk full writing /tmp/wakelab-delta-x/tokenizer/tokenizer.json (the logged model)" in line, line
    assert "every checkpoint is intact" in line and "then: wakelab resume" in line
    assert_failed_with(line, "disk full")
    assert (tmp_path / "out" / "final" / "new_rows.safetensors").is_file()  # the rows are on disk, whole
    monkeypatch.undo()
    resume_matches(reference, tmp_path)


# -- the Sentry mirror -----------------------------------------------------------------------------------------------


@SLOW
def test_sentry_mirror_on_a_full_disk_fails_in_one_line(tiny_model, texts, tmp_path, monkeypatch, reference):
    backup = tmp_path / "backup"
    result = run_cli(
        tiny_model,
        texts,
        tmp_path,
        monkeypatch,
        fault="mirror-copying:1",
        plugins=["sentry"],
        **{"sentry.target": str(backup)},
    )
    line = the_line(result)
    out = tmp_path / "out"
    assert "disk full writing" in line and str(backup) in line and "(the Sentry mirror of checkpoint-2)" in line
    assert f"{SHOWN / 'checkpoint-2'} is complete" in line and f"then: wakelab resume {SHOWN}" in line
    assert_failed_with(line, "disk full")
    verify(out / "checkpoint-2")
    mirrors = backup / the_run().info.run_id
    assert not list_checkpoints(mirrors) and not [p for p in mirrors.iterdir() if p.name.startswith(".partial")]
    resume_matches(reference, tmp_path)


# -- trajectory and analysis artifacts -------------------------------------------------------------------------------


def test_trajectory_on_a_full_disk_fails_in_one_line(tiny_model, texts, tmp_path, monkeypatch):
    result = run_cli(tiny_model, texts, tmp_path, monkeypatch, fault="publish-dir:2", plugins=["trajectory"])
    line = the_line(result)
    out = tmp_path / "out"
    assert f"disk full writing {SHOWN / '.trajectory.tmp'}" in line and "(the trajectory)" in line, line
    assert f"the trained rows in {SHOWN / 'final'} and every checkpoint are intact" in line
    assert_failed_with(line, "disk full")
    assert not (out / "trajectory").exists()  # never half a folder
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    load_file(out / "final" / "new_rows.safetensors")


def test_analysis_on_a_full_disk_fails_in_one_line(tiny_model, texts, tmp_path, monkeypatch):
    assert run_cli(tiny_model, texts, tmp_path, monkeypatch).exit_code == 0
    out = tmp_path / "out"
    monkeypatch.setenv(writepoint.ENV_AT, "publish-file:3")
    result = CliRunner().invoke(main, ["analyze", str(out), "--no-mlflow", "--no-eval", "--samples", "0"])
    line = the_line(result)
    assert "disk full writing" in line and str(out / "analysis") in line, line
    assert "the run and its files are untouched" in line and f"then: wakelab analyze {out}" in line
    written = [p for p in (out / "analysis").rglob("*") if p.is_file()]
    assert len(written) == 2 and not [p for p in written if ".tmp" in p.name], written  # two whole files, no part


# -- export and generate ---------------------------------------------------------------------------------------------


def test_export_on_a_full_disk_fails_in_one_line(tiny_model, texts, tmp_path, monkeypatch):
    assert run_cli(tiny_model, texts, tmp_path, monkeypatch).exit_code == 0
    import wakelab.export.formats as export_mod

    def half_then_full(model, tokenizer, folder, info):
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "model.safetensors"))

    monkeypatch.setattr(export_mod, "write_hf", half_then_full)
    dest = tmp_path / "exported"
    line = the_line(CliRunner().invoke(main, ["export", str(tmp_path / "out"), "--to", str(dest)]))
    assert "disk full writing" in line and "model.safetensors" in line, line
    assert f"{dest} is as it was" in line and "then: the same wakelab export command again" in line
    assert not dest.exists() and not list(tmp_path.glob(".partial-*"))


def test_generate_to_a_full_disk_fails_in_one_line(tiny_model, texts, tmp_path, monkeypatch):
    """A real full disk: standard output is /dev/full."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this machine")
    assert run_cli(tiny_model, texts, tmp_path, monkeypatch).exit_code == 0
    command = [sys.executable, "-m", "wakelab", "generate", str(tmp_path / "out"), "The river", "--max-new-tokens", "4"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("wakelab: error:")]
    assert errors == [
        "wakelab: error: disk full writing standard output (the generated text); free space (or mend the disk), "
        "then: the same command"
    ], proc.stderr


# -- the one mechanism ----------------------------------------------------------------------------------------------


def test_disk_errors_are_found_along_the_chain_and_others_pass_through(tmp_path):
    from wakelab.storage.writepoint import WriteFailed, disk_errno, write_point

    try:
        try:
            raise OSError(errno.EIO, "Input/output error", str(tmp_path / "a.bin"))
        except OSError as inner:
            raise RuntimeError("writing failed") from inner
    except RuntimeError as outer:
        assert disk_errno(outer) == errno.EIO
    assert disk_errno(RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed")) is None
    assert disk_errno(RuntimeError("No space left on device")) == errno.ENOSPC
    assert disk_errno(ValueError("a bad value")) is None

    with pytest.raises(WriteFailed) as info:
        with write_point("x", tmp_path / "dir", what="a thing", intact="all is well", then="wakelab do it"):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "dir" / "f.bin"))
    assert str(info.value) == (
        f"disk full writing {tmp_path / 'dir' / 'f.bin'} (a thing); all is well; free space (or mend the disk), "
        "then: wakelab do it"
    )
    assert info.value.exit_code == 4 and info.value.errno == errno.ENOSPC
    with pytest.raises(PermissionError):  # not a disk error: untouched
        with write_point("x", tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_published_file_is_whole_or_absent(tmp_path, monkeypatch):
    from wakelab.storage.writepoint import published_file

    tmp_path = tmp_path / "folder"
    tmp_path.mkdir()
    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(OSError):
        with published_file(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    monkeypatch.setenv(writepoint.ENV_AT, "publish-file")
    with pytest.raises(OSError):
        with published_file(target) as tmp:
            tmp.write_text("new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    monkeypatch.delenv(writepoint.ENV_AT)
    with published_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


# -- sweep comparison files ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_comparison_on_a_full_disk_fails_in_one_line_and_resume_writes_it(tiny_model, texts, monkeypatch):
    args = ["sweep", "--over", "train.lr=0.01,0.02", "--no-progress"]
    for key, value in tiny_overrides(tiny_model, texts, **{"train.max_steps": 3, "output_dir": "sweep"}).items():
        args += ["--set", f"{key}={value}"]
    monkeypatch.setenv(writepoint.ENV_AT, "sweep-comparison")
    line = the_line(CliRunner().invoke(main, args))
    monkeypatch.delenv(writepoint.ENV_AT)
    client = mlflow.MlflowClient()
    parent = next(r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                  if "mlflow.parentRunId" not in r.data.tags)  # fmt: skip
    comparison = Path("sweep") / "comparison"
    assert f"disk full writing {comparison}" in line, line
    assert f"every child's run, checkpoints and final rows are intact; {comparison} is as it was" in line
    assert f"then: wakelab sweep --resume {parent.info.run_id}" in line
    assert parent.info.status == "FAILED" and "disk full" in parent.data.tags["wakelab.error"]
    assert not comparison.exists() and not list(Path("sweep").glob(".comparison.tmp*"))

    result = CliRunner().invoke(main, ["sweep", "--resume", parent.info.run_id, "--no-progress"])
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    assert (comparison / "comparison.json").is_file() and (comparison / "comparison.csv").is_file()
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
