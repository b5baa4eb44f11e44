"""The MLflow run around a wakelab run: params, tags, batched metrics, artifacts, and an honest final status.

With no ``MLFLOW_TRACKING_URI`` set, MLflow 3 tracks to ``sqlite:///mlflow.db`` in the working directory, so
``mlflow ui`` started there shows the runs. Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``): wakelab
logs into it rather than opening a second one. A run that raises ends FAILED with its traceback as an artifact;
Ctrl-C ends KILLED; no run is left RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from .errors import WakelabError

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: Opens the experiment in the MLflow UI's model-training (runs) view rather than its GenAI view.
MODEL_TRAINING_KIND = "custom_model_development"
MAX_PARAM_LENGTH = 6000


class TrackingError(WakelabError):
    """The tracking server cannot be used."""


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def check_reachable() -> None:
    """Fail before any training when the tracking store cannot be reached, naming its URI."""
    from mlflow import MlflowClient

    uri = tracking_uri()
    try:
        with _quiet_retries():
            MlflowClient().search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TrackingError(
            f"cannot reach the MLflow tracking store at {uri} ({first}); start the server or set "
            "MLFLOW_TRACKING_URI to a reachable one"
        ) from None


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """One quick try: MLflow's default HTTP retries wait minutes before saying a server is down."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("wakelab", "torch", "transformers", "accelerate", "mlflow", "safetensors", "bitsandbytes", "peft"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


class TrackedRun:
    """One MLflow run: opened (or attached) at start, closed with FINISHED, FAILED or KILLED."""

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str], run_id: str | None = None):
        import mlflow

        self._mlflow = mlflow
        attach_to = run_id or os.environ.get("MLFLOW_RUN_ID")
        if attach_to:
            self.run = mlflow.start_run(run_id=attach_to)
            self.attached = True
        else:
            exp = mlflow.set_experiment(experiment)
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
            self.run = mlflow.start_run(run_name=run_name)
            self.attached = False
        self.run_id = self.run.info.run_id
        self.experiment_id = self.run.info.experiment_id
        mlflow.set_tags(tags)
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        self._closed = False

    # -- params, tags, metrics ---------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Params, skipping keys already logged with the same value (a resumed run logs its config again)."""
        existing = self._mlflow.MlflowClient().get_run(self.run_id).data.params
        fresh = {}
        for key, value in params.items():
            text = "None" if value is None else str(value)
            text = text[:MAX_PARAM_LENGTH]
            if key in existing:
                continue
            fresh[key] = text
        for chunk in _chunks(list(fresh.items()), 100):
            self._mlflow.log_params(dict(chunk))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics; they go out in batches so tracking never slows training."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), stamp, step) for k, v in metrics.items() if v is not None)
        if len(self._pending) >= 500 or time.monotonic() - self._last_flush > 10:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        client = self._mlflow.MlflowClient()
        pending, self._pending = self._pending, []
        for chunk in _chunks(pending, 1000):
            try:
                client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:  # noqa: BLE001 - training must go on when the server blips
                self._pending[:0] = chunk
                print(f"wakelab: warning: could not log {len(chunk)} metrics to MLflow ({exc}); will retry")
                break
        self._last_flush = time.monotonic()

    # -- artifacts ---------------------------------------------------------------------------------------------
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow.log_text(text, artifact_file)

    # -- end ---------------------------------------------------------------------------------------------------
    def end(self, status: str, error: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
            if error is not None:
                text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "traceback.txt"
                    path.write_text(text, encoding="utf-8")
                    self._mlflow.log_artifact(str(path))
        finally:
            self._mlflow.end_run(status=status)

    def ui_url(self) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}"


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def status_for(error: BaseException | None) -> str:
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt):
        return "KILLED"
    return "FAILED"
