"""`wakelab sync` after a real outage: a local `mlflow server` (SQLite store, 127.0.0.1 only) is stopped mid-run, the
run finishes with exit 3 and `mlflow_unlogged.json`, the server starts again, and two syncs make the run whole:
every metric value once, its artifacts, the status FINISHED."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from test_team_server import GATE_PLUGIN, RUN_TIMEOUT_S, MlflowServer, wakelab_run, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", tmp_path / "server.log")
    server.start()
    yield server
    server.stop()


def test_sync_after_the_server_came_back_makes_the_run_whole_once(server, tiny_model, texts, tmp_path):
    from mlflow import MlflowClient

    gate = tmp_path / "gate.py"
    gate.write_text(GATE_PLUGIN)
    config = write_config(tmp_path, tiny_model, texts, "gone", **{"train.logging_steps": 1})
    proc = wakelab_run(tmp_path, server.url, config, "--plugin", str(gate))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (tmp_path / "at-step-3").exists():
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.2)
    server.stop()  # SIGTERM, as when an admin stops it
    (tmp_path / "server-gone").write_text("")
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 3, (stdout[-2000:], stderr[-4000:])
    out = tmp_path / "out-gone"
    last = stderr.strip().splitlines()[-1]
    assert f"send them with `wakelab sync {out.name}`" in last or f"wakelab sync {out}" in last, last
    kept = json.loads((out / "mlflow_unlogged.json").read_text())
    assert kept["status"] == "FINISHED" and kept["metrics"]
    run_id = kept["run_id"]

    server.start()  # the same port, the same store
    outputs = []
    for _ in range(2):
        synced = subprocess.run(
            [sys.executable, "-m", "wakelab", "sync", str(out)], capture_output=True, text=True, timeout=300
        )
        assert synced.returncode == 0, synced.stderr[-3000:]
        outputs.append(synced.stdout)
    assert f"synced run {run_id}" in outputs[0] and "the final status FINISHED" in outputs[0], outputs[0]
    assert "nothing to sync" in outputs[1], outputs[1]

    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "lr", "grad_norm"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [1, 2, 3, 4, 5, 6], (key, steps)  # complete, and no value twice
    assert {"heldout_perplexity_after", "train_seconds"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run_id, "final")} >= {"final/new_rows.safetensors", "final/tokenizer"}
    assert not (out / "mlflow_unlogged.json").exists() and (out / "mlflow_unlogged.synced.json").exists()
    print("sync after the server came back:", outputs[0].strip().splitlines()[0])
