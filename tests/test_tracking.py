"""Every run is one MLflow run with params, metrics, artifacts and an honest final status."""

from __future__ import annotations

import mlflow
import pytest
from conftest import raising_plugin, tiny_overrides

from wakelab.config import build_config
from wakelab.run import engine
from wakelab.tracking.runs import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, TrackingError


def test_finished_run_has_params_metrics_artifacts(tiny_model, texts):
    config = build_config(None, None, tiny_overrides(tiny_model, texts, **{"train.max_steps": 4}))
    result = engine.run(config, progress=False)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.lr"] == "0.01" and params["train.trainable"] == "tokens"
    assert params["base_vocab_size"] == "367" and params["added_tokens"] == "8"
    assert "version.torch" in params and "version.transformers" in params
    assert params["plugins.active"] == "spherical"
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "new_row_norm",
        "new_row_displacement",
        "heldout_perplexity_before",
        "heldout_perplexity_after",
    ):
        assert key in run.data.metrics, key
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in history) == [2, 4]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"config.yaml", "vocab_report.json", "final"} <= artifacts
    final = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "final")}
    assert {"final/new_rows.safetensors", "final/tokenizer"} <= final
    assert run.data.tags["wakelab.preset"] == ""
    assert run.info.run_name.startswith("run-")
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


def test_logs_into_the_run_mlflow_run_started(tiny_model, texts, monkeypatch):
    experiment = mlflow.set_experiment("outer")
    outer = mlflow.MlflowClient().create_run(experiment.experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    result = engine.run(build_config(None, None, tiny_overrides(tiny_model, texts)), progress=False)
    assert result.run_id == outer.info.run_id
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"


def test_a_run_that_raises_ends_failed_with_traceback(tiny_model, texts, tmp_path):
    overrides = tiny_overrides(tiny_model, texts)
    overrides["plugins"] = [str(raising_plugin(tmp_path, 2, "ValueError", "stop here"))]
    with pytest.raises(ValueError, match="stop here"):
        engine.run(build_config(None, None, overrides), progress=False)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FAILED"]
    run_id = runs.iloc[0]["run_id"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert "traceback.txt" in artifacts
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/traceback.txt")
    assert "ValueError: stop here" in text


def test_a_failure_right_after_the_mlflow_run_opens_ends_it_failed(tiny_model, texts, monkeypatch):
    """The first thing written after the run opens (its run file: a full disk, say) is inside the run's try."""

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine, "_write_run_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        engine.run(build_config(None, None, tiny_overrides(tiny_model, texts)), progress=False)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FAILED"]


def test_ctrl_c_ends_killed(tiny_model, texts, tmp_path):
    overrides = tiny_overrides(tiny_model, texts)
    overrides["plugins"] = [str(raising_plugin(tmp_path, 2, "KeyboardInterrupt", "stop here"))]
    with pytest.raises(KeyboardInterrupt, match="stop here"):
        engine.run(build_config(None, None, overrides), progress=False)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["KILLED"]


def test_unreachable_tracking_server_fails_before_training(tiny_model, texts, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    with pytest.raises(TrackingError, match=r"cannot reach the MLflow tracking store at http://127.0.0.1:9"):
        engine.run(build_config(None, None, tiny_overrides(tiny_model, texts)), progress=False)
    assert not (tmp_path / "out" / "wakelab_run.json").exists()
