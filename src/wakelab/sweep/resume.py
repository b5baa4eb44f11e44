"""``wakelab sweep --resume PARENT``: finish a sweep that was stopped (SIGTERM, preemption, Ctrl-C) or crashed.

A sweep writes ``sweep.json`` into its folder when its parent run opens: the swept key and values and the base
config, so the same plan can be rebuilt later without the original command line. Resuming reopens the parent run and
treats each child by what its folder and its MLflow run say: a child whose run FINISHED is kept as it is; one that
stopped with a complete checkpoint continues from it in its own run (``wakelab resume``'s bit-exact path); any other
starts again from the beginning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import validate
from ..errors import ConfigError

SWEEP_FILE = "sweep.json"


def save_sweep_file(plan, parent_id: str, experiment_id: str) -> Path:
    """The plan as ``<root>/sweep.json``, so ``--resume`` can rebuild it."""
    record = {
        "parent_run_id": parent_id,
        "experiment_id": experiment_id,
        "over": list(plan.over),
        "constituents": str(plan.constituents_path) if plan.constituents_path else None,
        "top_k": plan.top_k,
        "evaluate": plan.evaluate,
        "base": plan.base.model_dump(mode="json"),
    }
    plan.root.mkdir(parents=True, exist_ok=True)
    path = plan.root / SWEEP_FILE
    tmp = path.with_name(SWEEP_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def find_sweep_file(parent: str) -> Path:
    """``parent`` is the sweep's folder or its parent run id; the sweep file it names, or a one-line error."""
    folder = Path(parent)
    if not folder.is_dir():
        from ..tracking.runs import mlflow_client

        try:
            run = mlflow_client().get_run(parent)
        except Exception:  # noqa: BLE001 - not a run id this store knows
            raise ConfigError(
                f"--resume {parent}: neither a sweep folder nor a sweep's parent run id in this "
                "tracking store; give the folder the sweep wrote (its --output-dir)"
            ) from None
        where = run.data.tags.get("wakelab.output_dir")
        if run.data.tags.get("wakelab.sweep") != "parent" or not where:
            raise ConfigError(f"--resume {parent}: run {parent} is not a sweep's parent run")
        folder = Path(where)
    path = folder / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(
            f"--resume {parent}: {path} not found; only sweeps started by this wakelab version can be "
            "resumed (run the sweep again with --overwrite)"
        )
    return path


@dataclass
class SavedSweep:
    """What ``sweep.json`` holds: enough to rebuild the plan (``plan_sweep(base, over, ...)``) and find the parent."""

    base: Any
    over: list[str]
    constituents: str | None
    top_k: int
    parent_run_id: str
    experiment_id: str
    evaluate: bool = False  # --evaluate: each finished child is evaluated, the resumed ones too


def load_sweep(parent: str) -> SavedSweep:
    path = find_sweep_file(parent)
    record = json.loads(path.read_text(encoding="utf-8"))
    return SavedSweep(
        validate(record["base"]),
        list(record["over"]),
        record.get("constituents"),
        int(record.get("top_k", 10)),
        record["parent_run_id"],
        record["experiment_id"],
        bool(record.get("evaluate", False)),
    )


def reopen_parent(client, parent_id: str) -> None:
    """The parent run is RUNNING again while the rest of the sweep runs."""
    client.update_run(parent_id, status="RUNNING")


def prepare_child(client, child) -> str | None:
    """What to do with ``child`` on resume: keep it (status FINISHED, metrics read back), continue from the
    checkpoint returned (its run id kept), or start afresh (None, no run id)."""
    from ..run.engine import RUN_FILE
    from ..storage.checkpoints import list_checkpoints

    run_file = child.output_dir / RUN_FILE
    if not run_file.is_file():
        return None
    try:
        run_id = json.loads(run_file.read_text())["run_id"]
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - a run of another store, or a damaged file: start the child again
        return None
    if run.info.status == "FINISHED":
        child.run_id, child.status, child.metrics = run_id, "FINISHED", dict(run.data.metrics)
        return None
    found = list_checkpoints(child.output_dir)
    if not found:
        return None
    child.run_id = run_id
    return str(found[-1])
