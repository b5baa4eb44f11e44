"""`wakelab sync RUN_DIR`: what a run kept while its tracking server was away reaches the run exactly once.

Here against a local SQLite store with a file made as a run makes it (tracking.TrackedRun.save_unlogged's format);
test_sync_slow.py stops a real `mlflow server` mid-run and syncs what the run kept.
"""

from __future__ import annotations

import json

import mlflow
import pytest
from click.testing import CliRunner

from wakelab.cli.main import main
from wakelab.tracking import sync as sync_mod
from wakelab.tracking.runs import UNLOGGED_FILE


def kept_run(tmp_path, values: int = 2500) -> tuple[str, object]:
    """A RUNNING run that logged steps 1-2 itself, and a run directory holding what it could not log after."""
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("sync")
    run = client.create_run(experiment)
    run_id = run.info.run_id
    client.log_metric(run_id, "loss", 2.0, timestamp=1000, step=1)
    client.log_metric(run_id, "loss", 1.9, timestamp=1001, step=2)
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "new_rows.safetensors").write_bytes(b"rows")
    (out / "final" / "tokenizer").mkdir()
    (out / "final" / "tokenizer" / "tokenizer.json").write_text("{}")
    metrics = [
        {"key": key, "value": 1.0 / step, "timestamp": 2000 + step, "step": step}
        for step in range(3, 3 + values // 2)
        for key in ("loss", "lr")
    ]
    record = {
        "tracking_uri": mlflow.get_tracking_uri(),
        "run_id": run_id,
        "status": "FINISHED",
        "metrics": metrics,
        "params": {"added_tokens": "8"},
        "tags": {"wakelab.note": "kept"},
        "artifacts": [
            {"path": str(out / "final" / "new_rows.safetensors"), "artifact_path": "final"},
            {"path": str(out / "final" / "tokenizer"), "artifact_path": "final/tokenizer"},
        ],
    }
    (out / UNLOGGED_FILE).write_text(json.dumps(record))
    return run_id, out


def assert_whole(run_id: str, values: int = 2500) -> None:
    client = mlflow.MlflowClient()
    loss = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    steps = [step for step, _ in loss]
    assert sorted(steps) == list(range(1, 3 + values // 2)), "a metric value is missing or there twice"
    assert len(client.get_metric_history(run_id, "lr")) == values // 2
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["added_tokens"] == "8" and run.data.tags["wakelab.note"] == "kept"
    assert {a.path for a in client.list_artifacts(run_id, "final")} == {"final/new_rows.safetensors", "final/tokenizer"}


def test_sync_sends_everything_once_and_a_second_sync_sends_nothing(tmp_path):
    run_id, out = kept_run(tmp_path)
    first = CliRunner().invoke(main, ["sync", str(out)])
    assert first.exit_code == 0, (first.output, first.exception)
    assert f"synced run {run_id}" in first.stdout and "2500 metric values" in first.stdout
    assert "the final status FINISHED" in first.stdout
    assert_whole(run_id)
    assert not (out / UNLOGGED_FILE).exists() and not (out / sync_mod.LEDGER_FILE).exists()
    assert json.loads((out / sync_mod.SYNCED_FILE).read_text())["run_id"] == run_id

    second = CliRunner().invoke(main, ["sync", str(out)])
    assert second.exit_code == 0 and "nothing to sync" in second.stdout, second.output
    assert_whole(run_id)


def test_an_interrupted_sync_goes_on_without_sending_anything_twice(tmp_path, monkeypatch):
    run_id, out = kept_run(tmp_path)
    real = sync_mod.crashpoint.reached
    stops = []

    def interrupt(name):  # the second chunk is on the server, the ledger does not say so yet: Ctrl-C
        if name == "sync-sent":
            stops.append(name)
            if len(stops) == 2:
                raise KeyboardInterrupt
        real(name)

    monkeypatch.setattr(sync_mod.crashpoint, "reached", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sync_mod.sync(out)
    ledger = json.loads((out / sync_mod.LEDGER_FILE).read_text())
    assert ledger["metrics_sent"] == 1000 and ledger["in_flight"] == [1000, 2000]
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "loss")) == 2 + 1000  # two chunks went out

    monkeypatch.setattr(sync_mod.crashpoint, "reached", real)
    result = sync_mod.sync(out)
    assert result.skipped == 1000 and result.metrics == 500  # the chunk in flight was checked, not sent again
    assert_whole(run_id)


def test_a_server_still_away_is_one_line_and_loses_no_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run_id, out = kept_run(tmp_path, values=10)
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens there
    result = CliRunner().invoke(main, ["sync", str(out), "--tracking-uri", dead])
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("wakelab: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert f"sync of {out / UNLOGGED_FILE} to {dead} stopped" in errors[0] and "connection refused" in errors[0]
    assert f"run `wakelab sync {out}` again" in errors[0]
    assert (out / UNLOGGED_FILE).exists()
    assert CliRunner().invoke(main, ["sync", str(out)]).exit_code == 0
    assert_whole(run_id, values=10)


def test_sync_of_a_folder_without_the_file_says_what_it_needs(tmp_path):
    result = CliRunner().invoke(main, ["sync", str(tmp_path)])
    assert result.exit_code == 2
    assert f"nothing to sync: {tmp_path / UNLOGGED_FILE} does not exist" in result.stderr
