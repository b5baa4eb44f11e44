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
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import WakelabError
from ..logs import warn

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: Opens the experiment in the MLflow UI's model-training (runs) view rather than its GenAI view.
MODEL_TRAINING_KIND = "custom_model_development"
MAX_PARAM_LENGTH = 6000
#: What a run could not log because the tracking store went away, saved in its output directory (JSON).
UNLOGGED_FILE = "mlflow_unlogged.json"


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
        with quiet_retries():
            MlflowClient().search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
        raise TrackingError(
            f"cannot reach the MLflow tracking store at {uri} ({_reason(exc)}); start the server or set "
            "MLFLOW_TRACKING_URI to a reachable one"
        ) from None


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(preset: str | None, cwd: Path | None = None) -> dict[str, str]:
    """The tags every run wakelab opens carries: preset, wakelab version and (in a git checkout) the commit."""
    tags = {"wakelab.preset": preset or "", "wakelab.version": library_versions().get("wakelab", "")}
    commit = git_commit(cwd)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


#: The MLflow 3 UI's model-training views (its default view is the GenAI one).
RUNS_VIEW = "#/experiments/{experiment_id}/runs?workflowType=machine_learning"
RUN_VIEW = "#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def ui_page(experiment_id: str, run_id: str | None = None) -> str:
    """The UI fragment (``#/experiments/...``) of a run, or of an experiment's runs, in the training view."""
    if run_id is None:
        return RUNS_VIEW.format(experiment_id=experiment_id)
    return RUN_VIEW.format(experiment_id=experiment_id, run_id=run_id)


def where_to_look(uri: str, experiment_id: str, run_id: str | None = None) -> list[str]:
    """Lines telling the user where to see a run: `wakelab ui` for a local store, the server's URL otherwise."""
    page = ui_page(experiment_id, run_id)
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return [
            "  wakelab ui        # starts the MLflow UI for this store on 127.0.0.1 and prints its URL",
            f"  then open http://127.0.0.1:5000/{page}",
        ]
    return [f"  {uri.rstrip('/')}/{page}"]


def ensure_experiment(name: str, client=None) -> str:
    """The id of experiment ``name``, made and tagged for the training view if need be.

    Two runs starting together into a new experiment race to create it and to tag it; the store refuses the second
    insert. Whoever loses finds the experiment (or the tag) already there, which is all it wanted.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name)
        except MlflowException:
            pass  # a peer created it between our look-up and our insert
        experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore) or set "
            "tracking.experiment to another name"
        )
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
        try:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        except MlflowException:
            if client.get_experiment(experiment.experiment_id).tags.get(EXPERIMENT_KIND_TAG) is None:
                raise
    return experiment.experiment_id


def log_new_params(client, run_id: str, params: dict[str, Any], sent: set[str] | None = None) -> None:
    """Log the params the run does not hold yet, cut to MLflow's length limit, 100 per request.

    MLflow refuses to change a logged param, so a resumed or attached run skips the keys it has; ``sent`` collects
    the keys that are on the run afterwards (to keep the others for a retry).
    """
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    if sent is not None:
        sent.update(k for k in params if k in existing)
    todo = [(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in existing]
    for chunk in _chunks(todo, 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
        if sent is not None:
            sent.update(k for k, _ in chunk)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("wakelab", "torch", "transformers", "accelerate", "mlflow", "safetensors", "bitsandbytes", "peft"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


class TrackingIncomplete(TrackingError):
    """Training finished and its files are on disk, but the tracking store went away and some of it was not logged.

    ``result`` is the run's ``RunResult``; the exit status (3) tells scripts apart from input errors (2).
    """

    exit_code = 3

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


#: While a run is open, MLflow's HTTP calls retry briefly (MLflow's own default waits minutes on a dead server, and
#: training would wait with it); once the server has failed, each call tries once, so training never stalls on it.
#: Variables the user set are left alone.
RUN_HTTP_POLICY = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
OFFLINE_HTTP_POLICY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
#: At the end, what is still buffered gets this many more tries, this many seconds apart.
FINAL_TRIES, FINAL_WAIT_S = 3, 2.0


@contextlib.contextmanager
def _environ(values: dict[str, str], override: bool = True) -> Iterator[None]:
    """Set environment variables for a block (only unset ones unless ``override``), then put them back."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if override or key not in os.environ:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def quiet_retries():
    """One quick try: MLflow's default HTTP retries wait minutes before saying a server is down.

    The one retry policy for a call that must not wait on a dead server (a note on a run that has ended, the UI's
    probe, a status read before an export): ``with quiet_retries(): ...``."""
    return _environ(OFFLINE_HTTP_POLICY)


#: MLflow refuses a tag value longer than this; every tag wakelab writes is cut to it (``tag_value``).
TAG_LIMIT = 5000


def tag_value(text: str) -> str:
    """``text`` cut to what MLflow stores as a tag value."""
    return text[:TAG_LIMIT]


def mlflow_client(tracking_uri: str | None = None):
    """An ``MlflowClient`` for the active store (or ``tracking_uri``): the one place wakelab makes one, so every
    MLflow client call goes through this module's view of the store."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri) if tracking_uri else MlflowClient()


def _open_experiment(mlflow, name: str):
    """Make ``name`` the active experiment (created and tagged if need be) for the run about to start."""
    return mlflow.set_experiment(experiment_id=ensure_experiment(name, mlflow.MlflowClient()))


def _is_client_error(exc: BaseException) -> bool:
    """A request the store understood and refused (bad value, unknown run): a bug to report, not an outage."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status != 429


class TrackedRun:
    """One MLflow run: opened (or attached) at start, closed with FINISHED, FAILED or KILLED.

    When the tracking server goes away mid-run, training goes on: metrics, params, tags and artifacts are kept and
    retried at each flush; what is still unsent at ``end`` is listed by :meth:`unlogged_message` and saved by
    :meth:`save_unlogged`. ``end`` never hangs on a dead server.
    """

    def __init__(
        self,
        experiment: str,
        run_name: str,
        tags: dict[str, str],
        run_id: str | None = None,
        system_metrics: bool = False,
    ):
        import mlflow

        self._mlflow = mlflow
        self._policy = _environ(RUN_HTTP_POLICY, override=False)
        self._policy.__enter__()
        try:
            attach_to = run_id or os.environ.get("MLFLOW_RUN_ID")
            if attach_to:
                self.run = mlflow.start_run(run_id=attach_to, log_system_metrics=system_metrics or None)
                self.attached = True
            else:
                _open_experiment(mlflow, experiment)
                self.run = mlflow.start_run(run_name=run_name, log_system_metrics=system_metrics or None)
                self.attached = False
            mlflow.set_tags(tags)
        except BaseException:
            self._policy.__exit__(None, None, None)
            raise
        self.run_id = self.run.info.run_id
        self.experiment_id = self.run.info.experiment_id
        self._pending: list[Any] = []
        self._pending_params: dict[str, str] = {}
        self._pending_tags: dict[str, str] = {}
        self._pending_artifacts: list[tuple[str, str | None]] = []
        self._last_flush = time.monotonic()
        self._closed = False
        #: The first failure while the store was unreachable, as (when, message); None while all is well.
        self.offline_since: tuple[str, str] | None = None
        self.status_unlogged: str | None = None

    @property
    def offline(self) -> bool:
        return self.offline_since is not None

    # -- one call to the store ------------------------------------------------------------------------------------
    def _send(self, what: str, call) -> bool:
        """Run ``call``; on an outage note it (one warning) and return False. A client error (4xx) is raised."""
        try:
            with _environ(OFFLINE_HTTP_POLICY) if self.offline else contextlib.nullcontext():
                call()
        except Exception as exc:  # noqa: BLE001 - an outage must never stop training
            if _is_client_error(exc):
                raise
            if not self.offline:
                reason = _reason(exc)
                self.offline_since = (time.strftime("%H:%M:%S"), reason)
                warn(
                    f"cannot reach the MLflow tracking store at {tracking_uri()} while logging {what} ({reason}); "
                    "training goes on, and what is not logged is kept and retried"
                )
            return False
        if self.offline:
            self.offline_since = None
            warn(f"the MLflow tracking store at {tracking_uri()} answers again; sending what was kept")
        return True

    # -- params, tags, metrics ---------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Params, skipping keys already logged with the same value (a resumed run logs its config again)."""
        fresh = {key: ("None" if value is None else str(value))[:MAX_PARAM_LENGTH] for key, value in params.items()}
        self._pending_params.update(fresh)
        self._send_params()

    def _send_params(self) -> None:
        if not self._pending_params:
            return
        existing: set[str] = set()

        def send():
            log_new_params(self._mlflow.MlflowClient(), self.run_id, self._pending_params, existing)

        self._send("params", send)
        self._pending_params = {k: v for k, v in self._pending_params.items() if k not in existing}

    def set_tags(self, tags: dict[str, str]) -> None:
        self._pending_tags.update(tags)
        tags = dict(self._pending_tags)
        if self._send("tags", lambda: self._mlflow.set_tags(tags)):
            self._pending_tags.clear()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics; they go out in batches so tracking never slows training."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), stamp, step) for k, v in metrics.items() if v is not None)
        if len(self._pending) >= 500 or time.monotonic() - self._last_flush > 10:
            self.flush()

    def flush(self) -> None:
        """Send what is buffered: params, tags and artifacts kept during an outage, then metrics in batches."""
        self._last_flush = time.monotonic()
        self._send_params()
        if self._pending_tags:
            self.set_tags({})
        while self._pending_artifacts:
            path, artifact_path = self._pending_artifacts[0]
            if not self._send(f"artifact {path}", lambda p=path, a=artifact_path: self._upload(Path(p), a)):
                break
            self._pending_artifacts.pop(0)
        client = self._mlflow.MlflowClient()
        while self._pending:
            chunk = self._pending[:1000]
            try:
                ok = self._send(f"{len(chunk)} metric values", lambda c=chunk: client.log_batch(self.run_id, metrics=c))
            except Exception as exc:  # noqa: BLE001 - a refused batch must not stop training either
                warn(f"MLflow refused {len(chunk)} metric values ({exc}); they are kept and reported at the end")
                ok = False
            if not ok:
                break
            del self._pending[: len(chunk)]

    @property
    def has_unlogged(self) -> bool:
        return bool(
            self._pending
            or self._pending_params
            or self._pending_tags
            or self._pending_artifacts
            or self.status_unlogged
        )

    # -- artifacts ---------------------------------------------------------------------------------------------
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or folder; during an outage it is kept (by path: the file stays on disk) and retried."""
        self._pending_artifacts.append((str(path), artifact_path))
        if len(self._pending_artifacts) == 1:
            if self._send(f"artifact {path}", lambda: self._upload(Path(path), artifact_path)):
                self._pending_artifacts.pop()

    def _upload(self, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send(f"text {artifact_file}", lambda: self._mlflow.log_text(text, artifact_file))

    # -- end ---------------------------------------------------------------------------------------------------
    def end(self, status: str, error: BaseException | None = None) -> None:
        """Flush (with a few more tries when the store is away) and close the run; never hangs, never raises
        for an outage. What could not be sent is then in :attr:`has_unlogged` / :meth:`unlogged_message`."""
        if self._closed:
            return
        self._closed = True
        outer_run_id = os.environ.get("MLFLOW_RUN_ID")
        try:
            if error is not None:
                text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                self._send("the traceback", lambda: self._mlflow.log_text(text, "traceback.txt"))
            for attempt in range(FINAL_TRIES):
                self.flush()
                if not (self._pending or self._pending_params or self._pending_tags or self._pending_artifacts):
                    break
                if attempt + 1 < FINAL_TRIES:
                    time.sleep(FINAL_WAIT_S)
        finally:
            # end_run takes the run off MLflow's stack before it tells the store, so a failure leaves nothing open.
            if not self._send(f"the final status {status}", lambda: self._mlflow.end_run(status=status)):
                self.status_unlogged = status
            self._policy.__exit__(None, None, None)
            if outer_run_id is not None:  # MLflow's end_run unsets it; the caller's (`mlflow run`'s) value stays
                os.environ["MLFLOW_RUN_ID"] = outer_run_id

    def unlogged_message(self, output_dir: str | Path | None = None, saved_to: str | Path | None = None) -> str:
        """One paragraph: which store, since when, what was not logged, where the files and the leftovers are."""
        parts = []
        if self._pending:
            names = sorted({m.key for m in self._pending})
            steps = [m.step for m in self._pending]
            parts.append(
                f"{len(self._pending)} metric values ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}; "
                f"steps {min(steps)}-{max(steps)})"
            )
        if self._pending_params:
            parts.append(f"{len(self._pending_params)} params")
        if self._pending_tags:
            parts.append(f"{len(self._pending_tags)} tags")
        if self._pending_artifacts:
            shown = ", ".join(Path(p).name for p, _ in self._pending_artifacts[:4])
            more = ", ..." if len(self._pending_artifacts) > 4 else ""
            parts.append(f"{len(self._pending_artifacts)} artifacts ({shown}{more})")
        if self.status_unlogged:
            parts.append(f"the final status {self.status_unlogged} (the run shows RUNNING there)")
        since = f" since {self.offline_since[0]} ({self.offline_since[1]})" if self.offline_since else ""
        message = (
            f"the MLflow tracking store at {tracking_uri()} stopped answering{since}; not logged to run "
            f"{self.run_id}: " + ", ".join(parts or ["nothing"])
        )
        if output_dir is not None:
            message += f". Training went on: the run's files are in {output_dir}"
        if saved_to is not None:
            message += (
                f"; the values not logged are in {saved_to}: send them with `wakelab sync {Path(saved_to).parent}`"
            )
        return message

    def save_unlogged(self, path: str | Path) -> Path:
        """Write what could not be logged as JSON (metrics as key/value/timestamp/step), to log it later by hand."""
        import json

        path = Path(path)
        record = {
            "tracking_uri": tracking_uri(),
            "run_id": self.run_id,
            "status": self.status_unlogged,
            "metrics": [
                {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self._pending
            ],
            "params": self._pending_params,
            "tags": self._pending_tags,
            "artifacts": [{"path": str(Path(p).resolve()), "artifact_path": a} for p, a in self._pending_artifacts],
        }
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return path


class RankRun:
    """The tracker of every process but the first under torchrun / accelerate launch: it logs nothing.

    Rank 0's :class:`TrackedRun` logs for the whole job (one MLflow run); the other ranks get its run id so the
    plugins and files they see agree, and otherwise the same methods, doing nothing.
    """

    attached = False
    offline = False
    has_unlogged = False
    status_unlogged = None

    def __init__(self, run_id: str | None, experiment_id: str | None):
        self.run_id = run_id
        self.experiment_id = experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def end(self, status: str, error: BaseException | None = None) -> None:
        pass


def _reason(exc: BaseException) -> str:
    """A few words for why a call to the store failed (urllib3's own message runs to hundreds of characters)."""
    text = str(exc)
    for needle, short in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("Name or service not known", "unknown host"),
        ("Failed to resolve", "unknown host"),
        ("Connection reset", "connection reset"),
        ("RemoteDisconnected", "connection closed"),
        ("Connection aborted", "connection closed"),
    ):
        if needle in text:
            return short
    return (text.strip().splitlines() or [type(exc).__name__])[0][:160]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def status_for(error: BaseException | None) -> str:
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt):
        return "KILLED"
    return "FAILED"
