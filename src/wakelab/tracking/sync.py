"""Send what a run kept in ``mlflow_unlogged.json`` (the tracking server was away) to its MLflow run, exactly once.

A run whose tracking server stopped answering finishes anyway and saves what it could not log (see
``tracking.TrackedRun.save_unlogged``): metrics with their steps and timestamps, params, tags, artifacts by local
path, and the final status. :func:`sync` sends those in that order, the status last, so the run only shows its end
once everything else is there.

Exactly once: MLflow keeps every metric value it is sent, so a value sent twice is in the history twice. The
metrics go in chunks, and a ledger beside the file (``mlflow_unlogged.sent.json``, written atomically) records how
many are sent and which chunk was in flight, with the file's checksum (a ledger of another file is ignored). A sync
that is interrupted (Ctrl-C, a kill, the server gone again) is run again and goes on from the ledger; only the chunk
that was in flight when it stopped is uncertain, and its values are looked up in the run's metric history first, so
those the server did take are not sent again. Params (never changed once logged), tags, artifacts (same path, same
file) and the status are idempotent by nature.

When all is sent, the file and its ledger are renamed ``mlflow_unlogged.synced.json`` (kept as the record of what
was sent late); a second sync finds nothing to send and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WakelabError
from ..storage import crashpoint
from .runs import RUN_HTTP_POLICY, UNLOGGED_FILE, TrackingIncomplete, _environ, _reason, log_new_params

LEDGER_FILE = "mlflow_unlogged.sent.json"
SYNCED_FILE = "mlflow_unlogged.synced.json"
CHUNK = 1000  # metric values per request (MLflow's log_batch limit)


class SyncError(WakelabError):
    """The file to sync is missing or unreadable."""


@dataclass
class SyncResult:
    run_id: str
    tracking_uri: str
    metrics: int = 0  # values sent by this sync
    skipped: int = 0  # values of an interrupted chunk the server already had
    params: int = 0
    tags: int = 0
    artifacts: int = 0
    status: str | None = None
    synced_to: Path | None = None
    nothing_to_do: bool = False
    notes: list[str] = field(default_factory=list)


def find_file(target: str | os.PathLike) -> Path:
    """``RUN_DIR`` or the file itself -> the ``mlflow_unlogged.json`` to send."""
    path = Path(target)
    if path.is_dir():
        path = path / UNLOGGED_FILE
    return path


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fresh_ledger() -> dict[str, Any]:
    return {"metrics_sent": 0, "in_flight": None, "params": False, "tags": False, "artifacts_sent": 0}


def _read_ledger(path: Path) -> dict[str, Any]:
    ledger = _fresh_ledger()
    if path.is_file():
        try:
            ledger.update(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SyncError(f"{path} is corrupted; delete it and sync again (values may then be sent twice)") from None
    return ledger


def sync(
    target: str | os.PathLike, tracking_uri: str | None = None, say: Callable[[str], None] = lambda _: None
) -> SyncResult:
    """Send what ``target`` (a run directory or its ``mlflow_unlogged.json``) holds; see the module docstring."""
    path = find_file(target)
    folder = path.parent
    if not path.is_file():
        if (folder / SYNCED_FILE).is_file():
            kept = json.loads((folder / SYNCED_FILE).read_text(encoding="utf-8"))
            return SyncResult(kept.get("run_id", "?"), kept.get("tracking_uri", "?"), nothing_to_do=True)
        raise SyncError(
            f"nothing to sync: {path} does not exist (a run writes it only when its tracking server stopped "
            "answering); give the run's output directory"
        )
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        run_id = kept["run_id"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise SyncError(f"{path} is not a wakelab mlflow_unlogged.json (no run_id); give the run's file") from None
    uri = tracking_uri or kept.get("tracking_uri")
    ledger_path = folder / LEDGER_FILE
    ledger = _read_ledger(ledger_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if ledger.get("file_sha256") not in (None, digest):  # a ledger of an older file (a resumed run wrote a new one)
        ledger = _fresh_ledger()
    ledger["file_sha256"] = digest
    result = SyncResult(run_id, uri)

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    step = "the run"
    try:
        with _environ(RUN_HTTP_POLICY, override=False):
            client.get_run(run_id)  # the run is there (a 404 here is a wrong server, said below)
            step = "metrics"
            _send_metrics(client, run_id, kept.get("metrics") or [], ledger, ledger_path, result)
            step = "params"
            if not ledger["params"] and kept.get("params"):
                log_new_params(client, run_id, kept["params"])
                result.params = len(kept["params"])
            ledger["params"] = True
            _write_json_atomic(ledger_path, ledger)
            step = "tags"
            if not ledger["tags"] and kept.get("tags"):
                from mlflow.entities import RunTag

                client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in kept["tags"].items()])
                result.tags = len(kept["tags"])
            ledger["tags"] = True
            _write_json_atomic(ledger_path, ledger)
            artifacts = kept.get("artifacts") or []
            for index in range(ledger["artifacts_sent"], len(artifacts)):
                artifact = artifacts[index]
                local = Path(artifact["path"])
                step = f"artifact {local}"
                if not local.exists():
                    result.notes.append(f"{local} is gone; that artifact was not sent")
                elif local.is_dir():
                    client.log_artifacts(run_id, str(local), artifact.get("artifact_path"))
                    result.artifacts += 1
                else:
                    client.log_artifact(run_id, str(local), artifact.get("artifact_path"))
                    result.artifacts += 1
                ledger["artifacts_sent"] = index + 1
                _write_json_atomic(ledger_path, ledger)
            if kept.get("status"):
                step = f"the final status {kept['status']}"
                client.set_terminated(run_id, kept["status"])
                result.status = kept["status"]
    except WakelabError:
        raise
    except Exception as exc:  # noqa: BLE001 - an outage, or a store that refuses: say where it stopped
        sent = ledger["metrics_sent"]
        total = len(kept.get("metrics") or [])
        raise TrackingIncomplete(
            f"sync of {path} to {uri} stopped while sending {step} ({_reason(exc)}); {sent} of {total} metric values "
            f"are sent and recorded in {ledger_path}; run `wakelab sync {folder}` again to send the rest "
            "(nothing is sent twice)"
        ) from None
    merged = {**kept, "synced": ledger}
    _write_json_atomic(folder / SYNCED_FILE, merged)
    path.unlink()
    ledger_path.unlink(missing_ok=True)
    result.synced_to = folder / SYNCED_FILE
    return result


def _send_metrics(client, run_id: str, metrics: list[dict], ledger: dict, ledger_path: Path, result) -> None:
    """Chunks from the ledger's count on; a chunk left in flight by an interrupted sync is checked first."""
    from mlflow.entities import Metric

    while ledger["metrics_sent"] < len(metrics):
        start = ledger["metrics_sent"]
        end = min(start + CHUNK, len(metrics))
        chunk = [Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"])) for m in metrics[start:end]]
        if ledger["in_flight"] is not None:
            chunk = _not_yet_logged(client, run_id, chunk)
            result.skipped += (end - start) - len(chunk)
        ledger["in_flight"] = [start, end]
        _write_json_atomic(ledger_path, ledger)
        if chunk:
            client.log_batch(run_id, metrics=chunk)
        crashpoint.reached("sync-sent")  # the chunk is on the server, the ledger does not say so yet
        result.metrics += len(chunk)
        ledger["metrics_sent"], ledger["in_flight"] = end, None
        _write_json_atomic(ledger_path, ledger)


def _not_yet_logged(client, run_id: str, chunk: list) -> list:
    """The values of ``chunk`` that the run's metric history does not hold yet (same key, step, time and value)."""
    held: dict[str, set] = {}
    for key in {m.key for m in chunk}:
        held[key] = {(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)}
    return [m for m in chunk if (m.step, m.timestamp, m.value) not in held[m.key]]


def describe(result: SyncResult) -> list[str]:
    """What the CLI prints: what this sync sent, where to."""
    if result.nothing_to_do:
        return [f"nothing to sync: run {result.run_id} was synced before (its record is {SYNCED_FILE})"]
    sent = [f"{result.metrics} metric values"]
    if result.skipped:
        sent.append(f"({result.skipped} more the server already had)")
    sent += [f"{result.params} params", f"{result.tags} tags", f"{result.artifacts} artifacts"]
    if result.status:
        sent.append(f"the final status {result.status}")
    lines = [f"synced run {result.run_id} to {result.tracking_uri}: " + ", ".join(sent)]
    lines += [f"  note: {note}" for note in result.notes]
    if result.synced_to is not None:
        lines.append(f"  the record of what was sent: {result.synced_to}")
    return lines
