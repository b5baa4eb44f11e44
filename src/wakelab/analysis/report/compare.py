"""``wakelab analyze RUN RUN ...``: several runs side by side in one comparison run."""

from __future__ import annotations

from pathlib import Path

from ...errors import WakelabError
from .. import plots
from ..dynamics.from_recording import analyse_recording
from ..sink import AnalysisSink
from .sections import _fmt
from .target import (
    CUT_SHORT_TAG,
    AnalysisReport,
    AnalyzeOptions,
    Warn,
    _collecting,
    _new_run,
    _outer_run,
    _resolve,
    _Run,
    default_recording,
    loss_history,
)


def compare_runs(targets: list[str], opts: AnalyzeOptions | None = None, warn: Warn | None = None) -> AnalysisReport:
    """Overlay several runs' loss curves (and with ``opts.recording``, displacement per step and freeze onset) and
    log the plots and tables to a new MLflow run tagged ``wakelab.analysis.kind=comparison``."""
    opts = opts or AnalyzeOptions()
    warnings: list[str] = []
    warn = _collecting(warn, warnings)
    if opts.recording:
        raise WakelabError(
            "--recording PATH names one recording; to compare runs, give --recording alone (each run's own)"
        )
    runs = [_resolve(t, warn) for t in targets]
    labels: list[str] = []
    for run in runs:
        name = run.label
        if name in labels:
            name = f"{name} ({run.run_id[:8] if run.run_id else run.run_dir})"
        labels.append(name)
    local = Path(opts.out) if opts.out else runs[0].run_dir / "analysis"
    client, dest, created = None, None, False
    if opts.mlflow:
        client = runs[0].client
        compared = ",".join(r.run_id or str(r.run_dir) for r in runs)
        tags = {"wakelab.analysis.kind": "comparison", "wakelab.analysis.compared_runs": compared}
        dest = _outer_run(client, tags, exclude=None)
        created = dest is None
        if created:
            dest = _new_run(client, runs[0], "comparison-" + "-vs-".join(labels)[:200], tags, None)
    sink = AnalysisSink(local, dest, client)
    report = AnalysisReport(local, dest, warnings=warnings)
    status = "FAILED"
    try:
        _compare_into(runs, labels, opts, sink, report, warn)
        status = "FINISHED"
    finally:
        try:
            if status == "FINISHED":
                sink.flush()
                for run in runs:
                    if dest and run.run_id:
                        run.client.set_tag(run.run_id, "wakelab.analysis.comparison_run", dest)
        finally:
            if created:
                client.set_terminated(dest, status)
    report.files = list(sink.files)
    return report


def _compare_into(
    runs: list[_Run], labels: list[str], opts: AnalyzeOptions, sink: AnalysisSink, report: AnalysisReport, warn: Warn
) -> None:
    lines = report.summary
    lines.append(f"comparison of {len(runs)} runs: " + ", ".join(labels))
    series, loss_rows, run_rows = {}, [], []
    for run, label in zip(runs, labels, strict=True):
        history = loss_history(run.run_id, run.run_dir, run.client)
        row = {"run": label, "run_id": run.run_id, "run_dir": str(run.run_dir)}
        if history is None:
            warn(f"run {label} has no loss history; left out of the loss plot")
        else:
            steps, losses, _ = history
            series[label] = (steps, losses)
            loss_rows += [
                {"run": label, "run_id": run.run_id, "step": s, "loss": v} for s, v in zip(steps, losses, strict=True)
            ]
            row.update(final_step=steps[-1], final_loss=losses[-1])
            lines.append(f"  {label}: loss {losses[0]:.4g} -> {losses[-1]:.4g} over steps {steps[0]}..{steps[-1]}")
        run_rows.append(row)
    fig = plots.curves(series, title="Training loss by run")
    sink.figure("comparison/loss_curves", fig)
    sink.table("comparison/loss_curves", loss_rows)
    report.figures["loss_curves"] = fig
    report.results["loss_series"] = {k: list(v) for k, v in series.items()}

    if opts.recording is not None:
        disp_series, onset_series, step_rows = {}, {}, []
        for run, label, row in zip(runs, labels, run_rows, strict=True):
            result = analyse_recording(default_recording(run.run_dir, run.run_id, run.client),
                                       freeze_threshold=opts.freeze_threshold)  # fmt: skip
            steps = [r["step"] for r in result.freeze_onset]
            disp_series[label] = (steps, [r["mean_displacement"] for r in result.freeze_onset])
            onset_series[label] = (steps, [r["unchanged_share"] for r in result.freeze_onset])
            step_rows += [{"run": label, "step": r["step"], "unchanged_share": r["unchanged_share"],
                           "mean_displacement": r["mean_displacement"]} for r in result.freeze_onset]  # fmt: skip
            row.update(recording=str(result.path), recording_complete=result.complete,
                       displacement_mean=result.displacement_summary["all"]["mean"],
                       frozen=result.freeze["frozen"], frozen_group=result.freeze["group"])  # fmt: skip
            lines.append(f"  {label}: recording {result.path} ({len(result.steps)} steps"
                         + ("" if result.complete else ", CUT SHORT") + f"), mean displacement "
                         f"{_fmt(result.displacement_summary['all']['mean'])}, "
                         f"{'frozen' if result.freeze['frozen'] else 'not frozen'}")  # fmt: skip
            if not result.complete:
                sink.tags({CUT_SHORT_TAG: "true"})
        fig_d = plots.curves(disp_series, title="Mean displacement per step by run",
                             ylabel="mean L2 distance per step (embedding units)")  # fmt: skip
        fig_o = plots.curves(onset_series, title="Freeze onset by run: rows unchanged from the previous step",
                             ylabel="share of rows unchanged")  # fmt: skip
        sink.figure("comparison/displacement_per_step", fig_d)
        sink.figure("comparison/freeze_onset", fig_o)
        sink.table("comparison/dynamics_per_step", step_rows)
        report.figures.update(displacement_per_step=fig_d, freeze_onset=fig_o)
    sink.table("comparison/runs", run_rows)
    for message in report.warnings:
        lines.append(f"warning    {message}")
    where = f"MLflow run {sink.run_id} under analysis/comparison/" if sink.run_id else "no MLflow run (--no-mlflow)"
    lines.append(f"logged to  {where}; files in {sink.local_dir}")
    sink.text("comparison/summary.txt", report.text)
    report.metric_names = sink.metric_names
