"""`wakelab evaluate` end to end on the real demo run, through the MLproject entry point, with MLflow's contents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_demo_run_then_the_evaluate_entry_point(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "wakelab", "run", "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (trained_id,) = mlflow.search_runs(search_all_experiments=True)["run_id"]
    args = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "evaluate", "--env-manager", "local",
            "-P", f"run={tmp_path / 'runs' / 'demo'}"]  # fmt: skip
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verdict: closest to the corpus" in proc.stdout and "cost on ordinary text" in proc.stdout
    runs = mlflow.search_runs(search_all_experiments=True)
    (eval_id,) = [r for r in runs["run_id"] if r != trained_id]
    run = mlflow.get_run(eval_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.entryPoint"] == "evaluate"
    assert run.data.tags["wakelab.evaluate.of_run"] == trained_id
    m = run.data.metrics
    assert m["evaluate/trained/coined_per_1k"] > 0 and m["evaluate/base/coined_per_1k"] == 0  # the bar
    assert m["evaluate/perplexity/new_after"] < m["evaluate/perplexity/new_before"]
    assert m["evaluate/probe/auc_after"] > m["evaluate/probe/auc_before"]
    for key in ("trained/delta_corpus", "base/delta_corpus", "reference/base_perplexity", "reference/new_mass_mean",
                "perplexity/base_after", "perplexity/all_after", "mfw_words", "seconds/total"):  # fmt: skip
        assert f"evaluate/{key}" in m, key
    assert m["evaluate/seconds/total"] < 120 * 3  # the 2-minute target with room for a busy CI machine
    assert run.data.params["sampling.seed"] == "0" and run.data.params["against"] == "base"
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(eval_id, "evaluate")}
    assert {"evaluate/samples.json", "evaluate/samples_table.json", "evaluate/coined_rate_and_delta.png"} <= logged
    samples = json.loads(Path(client.download_artifacts(eval_id, "evaluate/samples.json", str(tmp_path))).read_text())
    trained = [s for s in samples["samples"] if s["model"] == "trained"]
    assert any("[[" in s["marked"] for s in trained) and any(s["new_tokens"] > 0 for s in trained)
