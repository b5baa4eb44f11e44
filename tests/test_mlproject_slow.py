"""`mlflow run . -e ENTRY --env-manager local`: each entry point gives exactly one FINISHED run with params,
metrics and artifacts; bad -P values are one-line wakelab errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def mlflow_run(entry, params, tmp_path, cache):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "WAKELAB_CACHE": cache,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("MLFLOW_RUN_ID", None)
    args = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    # Called from outside the project folder: MLflow runs the entry point in the project folder itself.
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return os.environ.get("WAKELAB_CACHE") or str(tmp_path_factory.mktemp("cache"))


def only_run(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1, runs[["run_id", "status"]]
    return mlflow.get_run(runs.iloc[0]["run_id"])


def check_finished(run):
    assert run.info.status == "FINISHED"
    assert run.data.params and run.data.metrics
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id)
    assert run.data.tags.get("mlflow.project.entryPoint")


def test_main_then_analyze_entry_points(tmp_path, cache):
    proc = mlflow_run("main", {"max_steps": 2, "output_dir": f"{tmp_path}/runs/{{run_id}}"}, tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path)
    check_finished(run)
    assert run.data.params["train.max_steps"] == "2"
    assert run.data.tags["wakelab.output_dir"] == str(tmp_path / "runs" / run.info.run_id)
    # `-e analyze` is its own MLflow run: the analysis lands there, tagged with the run it analysed.
    proc = mlflow_run("analyze", {"run": run.info.run_id}, tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    (analysis_id,) = [r for r in runs["run_id"] if r != run.info.run_id]
    analysis = mlflow.get_run(analysis_id)
    assert analysis.data.tags["wakelab.analysis.source_run"] == run.info.run_id
    assert any(a.path == "analysis" for a in mlflow.MlflowClient().list_artifacts(analysis_id))


def test_p1_evolved_entry_point_through_4bit(tmp_path, cache, tiny_model, texts):
    params = {
        "model": tiny_model,
        "lexicon": texts["lexicon"],
        "corpus": texts["corpus"],
        "phase1": "null",
        "max_steps": 20,
        "seq_len": 32,
        "sentry": tmp_path / "sentry",
        "output_dir": tmp_path / "p1",
    }
    proc = mlflow_run("p1_evolved", params, tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path)
    check_finished(run)
    assert run.data.params["model.load_in_4bit"] == "True" and run.data.params["train.max_steps"] == "20"
    assert run.data.tags["wakelab.sentry.latest"]
    assert any(a.path == "analysis" for a in mlflow.MlflowClient().list_artifacts(run.info.run_id))


def test_wordybird_then_wordybird3_entry_points(tmp_path, cache):
    proc = mlflow_run("wordybird", {"max_steps": 2, "batch_size": 2, "output_dir": tmp_path / "wb1"}, tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = only_run(tmp_path)
    check_finished(first)
    proc = mlflow_run("wordybird_3", {"max_steps": 4, "batch_size": 2, "output_dir": tmp_path / "wb3"}, tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    # The precision question from the same step-2 checkpoint: 8 children (4 settings x 2 schedules) and a verdict.
    proc = mlflow_run(
        "wordybird_precision", {"max_steps": 4, "batch_size": 2, "output_dir": tmp_path / "wbp"}, tmp_path, cache
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["tags.wakelab.sweep"] == "parent"].iloc[0]
    assert parent["status"] == "FINISHED" and parent["tags.mlflow.project.entryPoint"] == "wordybird_precision"
    assert parent["tags.wakelab.precision.verdict"]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert len(children) == 8 and set(children["status"]) == {"FINISHED"}
    assert (tmp_path / "wbp" / "comparison" / "precision.md").read_text().count("| train.precision=") == 8


def test_bad_parameter_is_a_clear_error(tmp_path, cache):
    proc = mlflow_run("main", {"max_steps": "many"}, tmp_path, cache)
    assert proc.returncode != 0
    assert "wakelab: error: config key 'train.max_steps'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_folder_without_mlproject_is_refused_by_mlflow(tmp_path, cache):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    args = [str(Path(sys.executable).parent / "mlflow"), "run", str(tmp_path), "-e", "main", "--env-manager", "local"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "Could not find main among entry points" in proc.stderr
