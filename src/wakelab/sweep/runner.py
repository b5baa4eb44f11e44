"""``wakelab sweep``: one experiment under several values of one config key, compared side by side in MLflow.

Top to bottom: :func:`plan_sweep` resolves and checks everything up front (the key, every child's config, the init
plugins, the output folders, the constituents file), so bad input stops the sweep before any child starts. Then
:func:`run_sweep` opens the parent MLflow run (or attaches to ``MLFLOW_RUN_ID``, as under ``mlflow run``), and for
each value creates a child run tagged ``mlflow.parentRunId`` and runs ``engine.run`` inside it (passing the
child's ``run_id``; nothing goes through the environment), one child after another in this process. A child that
fails is marked FAILED and the others go on. Last, :func:`compare` reads each finished child back (the rows right
after init and at the end, its logged loss and norms) and logs the comparison to the parent under ``comparison/``:

    comparison.{csv,json,md}        one row per child: held-out perplexity before/after, final loss, mean new-row
                                    norm at step 0 and at the end, nearest-neighbour hit rates at step 0 and at the end
    comparison.html                 the table (first column fixed), the plots embedded, and the children's
                                    trajectories side by side in one shared projection under one step slider
    neighbours.json                 each evaluated word's top-k base-token neighbours at step 0 and at the end
    loss_curves.png  perplexity.png  new_row_norm.png  hit_rates.png

Hit rate: for each word of the constituents file that is a new token, its top-k base-token neighbours by cosine;
a hit is the meaning word (``hit_meaning``), or the meaning word or one of the words it blends (``hit_any``), among
them. The step-0 rates show what the init alone gives (``subword`` starts each word at its pieces, so its step-0
neighbours partly reflect the init itself); the final rates what training added.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import logs
from ..logs import warn
from ..run import stopping
from ..tracking import runs as tracking
from . import resume as sweep_resume
from .compare import _one_line, compare
from .plan import Child, SweepPlan

SWEEP_TAG = "wakelab.sweep"
Log = Callable[[str], None]


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_id: str
    children: list[Child]
    comparison_dir: Path
    table: str
    tracking_uri: str

    @property
    def failed(self) -> list[Child]:
        return [c for c in self.children if c.status != "FINISHED"]


def _open_parent(client, plan: SweepPlan, cwd: Path | None) -> tuple[str, str, bool]:
    """The parent run: the one ``MLFLOW_RUN_ID`` names (``mlflow run``), else a new one.

    Returns (run id, experiment id, attached)."""
    tags = {
        SWEEP_TAG: "parent",
        "wakelab.sweep.key": plan.canonical,
        "wakelab.sweep.values": ",".join(c.text for c in plan.children),
        "wakelab.output_dir": str(plan.root.resolve()),
        **tracking.run_tags(plan.base.preset, cwd),
    }
    attach = os.environ.get("MLFLOW_RUN_ID")
    if attach:
        run = client.get_run(attach)
        for key, value in tags.items():
            client.set_tag(attach, key, value)
        return attach, run.info.experiment_id, True
    experiment_id = tracking.ensure_experiment(plan.base.tracking.experiment)
    name = plan.base.tracking.run_name or f"sweep-{plan.key}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    return run.info.run_id, experiment_id, False


def _log_parent_params(client, run_id: str, plan: SweepPlan) -> None:
    params = {
        "sweep.key": plan.canonical,
        "sweep.values": ",".join(c.text for c in plan.children),
        "sweep.children": len(plan.children),
        "sweep.top_k": plan.top_k,
        "sweep.constituents": str(plan.constituents_path) if plan.constituents_path else "None",
        **{k: v for k, v in plan.base.flat().items() if k not in plan.canonical.split(",")},
    }
    tracking.log_new_params(client, run_id, params)


def run_child(
    client,
    child: Child,
    parent_id: str,
    experiment_id: str,
    *,
    overwrite: bool,
    progress: bool,
    cwd: Path | None,
    resume_from: str | None = None,
) -> None:
    """Run one child inside its own MLflow run, nested under the parent; a failure is recorded, not raised.

    ``resume_from``: a checkpoint of the child's earlier, stopped run (``child.run_id``), continued in that run."""
    from ..run import engine

    if resume_from is None or child.run_id is None:
        run = client.create_run(
            experiment_id,
            run_name=child.label,
            tags={
                "mlflow.parentRunId": parent_id,
                SWEEP_TAG: "child",
                "wakelab.sweep.parent": parent_id,
                "wakelab.sweep.key": child.label.split("=", 1)[0],
                "wakelab.sweep.value": child.text,
            },
        )
        child.run_id, resume_from = run.info.run_id, None
    try:
        result = engine.run(
            child.config,
            overwrite=overwrite and resume_from is None,
            resume_from=resume_from,
            progress=progress,
            cwd=cwd,
            run_id=child.run_id,
        )
        # A resumed child's run holds what its first part logged too (held-out perplexity before, ...).
        child.status = "FINISHED"
        child.metrics = {**(dict(client.get_run(child.run_id).data.metrics) if resume_from else {}), **result.metrics}
    except KeyboardInterrupt:
        child.status, child.error = "KILLED", "interrupted"
        _close_child(client, child)
        raise
    except Exception as exc:  # noqa: BLE001 - one child's failure must not stop the others
        child.status, child.error = "FAILED", _one_line(exc)
        warn(f"sweep: {child.label} failed: {child.error}")
        _close_child(client, child)
    finally:
        gc.collect()


def _close_child(client, child: Child) -> None:
    """Mark a child that did not finish; the engine closed it already unless it failed before opening it."""
    try:
        client.set_tag(child.run_id, "wakelab.sweep.status", child.status.lower())
        if child.error:
            client.set_tag(child.run_id, "wakelab.error", tracking.tag_value(child.error))
        if client.get_run(child.run_id).info.status == "RUNNING":
            client.set_terminated(child.run_id, child.status)
    except Exception as exc:  # noqa: BLE001 - the tracking store blipped; say so and go on
        warn(f"could not mark child run {child.run_id} {child.status}: {exc}")


@stopping.handles_signals  # a stop signal ends the running child and the parent KILLED; --resume goes on
def run_sweep(
    plan: SweepPlan,
    *,
    overwrite: bool = False,
    progress: bool = True,
    cwd: Path | None = None,
    log: Log = logs.log,
    resume: sweep_resume.SavedSweep | None = None,
) -> SweepResult:
    """Run every child of ``plan`` under one parent run and log the comparison to the parent.

    ``resume``: the saved sweep being resumed; its parent run is reopened, finished children are kept, a stopped
    one continues from its checkpoint, the others run."""
    tracking.check_reachable()
    client = tracking.mlflow_client()
    started = time.monotonic()
    if resume is None:
        parent_id, experiment_id, attached = _open_parent(client, plan, cwd)
    else:
        parent_id, experiment_id, attached = resume.parent_run_id, resume.experiment_id, False
        sweep_resume.reopen_parent(client, parent_id)
    status, failure = "FINISHED", None
    try:
        sweep_resume.save_sweep_file(plan, parent_id, experiment_id)
        _log_parent_params(client, parent_id, plan)
        for number, child in enumerate(plan.children, start=1):
            checkpoint = sweep_resume.prepare_child(client, child) if resume is not None else None
            if child.status == "FINISHED":
                log(f"sweep: child {number}/{len(plan.children)}: {child.label} finished before; kept")
                continue
            how = f" (continuing from {checkpoint})" if checkpoint else ""
            log(f"sweep: child {number}/{len(plan.children)}: {child.label} -> {child.output_dir}{how}")
            run_child(
                client,
                child,
                parent_id,
                experiment_id,
                overwrite=overwrite or resume is not None,
                progress=progress,
                cwd=cwd,
                resume_from=checkpoint,
            )
            stopping.current().raise_if_signalled(f"as {child.label} finished")  # it came after its last step
        comparison_dir, table = compare(client, plan, parent_id, log)
        if "train.precision" in plan.canonical.split(","):
            from ..analysis.precision import compare_precision

            table += compare_precision(client, plan, parent_id, comparison_dir, log)
        failed = [c.label for c in plan.children if c.status != "FINISHED"]
        client.set_tag(parent_id, "wakelab.sweep.failed_children", ",".join(failed))
        client.log_metric(parent_id, "sweep_children_finished", len(plan.children) - len(failed))
        client.log_metric(parent_id, "sweep_children_failed", len(failed))
        client.log_metric(parent_id, "sweep_seconds", time.monotonic() - started)
        if len(failed) == len(plan.children):
            status = "FAILED"
    except BaseException as exc:  # noqa: BLE001 - the parent must end FAILED or KILLED, never RUNNING
        status, failure = tracking.status_for(exc), exc
        if isinstance(exc, KeyboardInterrupt):
            running = next((c.label for c in plan.children if c.status == "KILLED"), None)
            raise stopping.Stopped(
                getattr(exc, "signum", 2),
                f"sweep stopped{' by ' + stopping.signal_name(exc.signum) if hasattr(exc, 'signum') else ''}; "
                f"{'the parent run and ' + running + ' are' if running else 'the parent run is'} marked KILLED; "
                f"continue with: wakelab sweep --resume {parent_id}",
            ) from None
        raise
    finally:
        stopping.current().closing()  # a signal now must not leave the parent RUNNING
        _end_parent(client, parent_id, status, failure, attached)
    return SweepResult(parent_id, experiment_id, plan.children, comparison_dir, table, tracking.tracking_uri())


def _end_parent(client, run_id: str, status: str, failure: BaseException | None, attached: bool) -> None:
    try:
        if failure is not None and not isinstance(failure, KeyboardInterrupt):
            client.set_tag(run_id, "wakelab.error", tracking.tag_value(_one_line(failure)))
        # Under `mlflow run` the run belongs to it: it marks the run when this process exits.
        if not attached or status != "FINISHED":
            client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001
        warn(f"could not close the sweep's parent run {run_id}: {exc}")
