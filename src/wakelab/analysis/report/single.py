"""``wakelab analyze RUN``: one run's report."""

from __future__ import annotations

import time
from pathlib import Path

from .. import plots
from ..dynamics.from_recording import analyse_recording
from ..sink import AnalysisSink
from .sections import _perplexity, _samples, _static_lines, dynamics_lines, dynamics_outputs, static_analysis
from .target import (
    AnalysisReport,
    AnalyzeOptions,
    Warn,
    _collecting,
    _open_destination,
    _recording_path,
    _resolve,
    _Run,
    _saved_tokenizer,
    _state_label,
    _state_target,
    loss_history,
)


def analyze_run(target: str, opts: AnalyzeOptions | None = None, warn: Warn | None = None) -> AnalysisReport:
    """Analyse one run (directory, checkpoint or MLflow run id) and log it; see the module docstring."""
    opts = opts or AnalyzeOptions()
    warnings: list[str] = []
    warn = _collecting(warn, warnings)
    run = _resolve(target, warn)
    # Bad input is found before anything is written or a run is created.
    recording_path = _recording_path(run, opts.recording) if opts.recording is not None else None
    state_target = _state_target(run, opts.checkpoint) if opts.static else None
    local = Path(opts.out) if opts.out else run.run_dir / "analysis"
    client, dest, created = _open_destination(
        run, opts, f"analysis-{run.label}", {"wakelab.analysis.output_dir": str(run.run_dir)}
    )
    sink = AnalysisSink(local, dest, client)
    report = AnalysisReport(local, dest, warnings=warnings)
    status = "FAILED"
    try:
        _analyze_into(run, opts, state_target, recording_path, sink, report, warn)
        status = "FINISHED"
    finally:
        try:
            if status == "FINISHED":
                sink.flush()
        finally:
            if created:
                client.set_terminated(dest, status)
    report.files = list(sink.files)
    return report


def _analyze_into(
    run: _Run,
    opts: AnalyzeOptions,
    state_target: str | None,
    recording_path: Path | None,
    sink: AnalysisSink,
    report: AnalysisReport,
    warn: Warn,
) -> None:
    """The report's sections in order: the state (static geometry, samples, perplexity), the loss, the dynamics
    and trajectory of the recording, then the summary."""
    lines = report.summary
    history = loss_history(run.run_id, run.run_dir, run.client)
    label, tokenizer, state_lines = None, None, []
    if opts.static:
        label, tokenizer, state_lines = _state_section(run, opts, state_target, history, sink, report, warn)
    else:
        tokenizer = _saved_tokenizer(run.run_dir)
    head = f"analysis of {run.label} ({run.run_dir})"
    if label is not None:
        head += f", state {label} (step {report.results['state']['step']})"
    lines.append(head)
    lines += state_lines
    lines.append(_loss_section(run, history, sink, report))
    if recording_path is not None:
        lines += _recording_section(run, opts, recording_path, tokenizer, sink, report, warn)
    for message in report.warnings:
        lines.append(f"warning    {message}")
    where = f"MLflow run {sink.run_id} under analysis/" if sink.run_id else "no MLflow run (--no-mlflow)"
    lines.append(f"logged to  {where}; files in {sink.local_dir}")
    sink.text("summary.txt", report.text)
    sink.tags({"wakelab.analysis.last": time.strftime("%Y-%m-%dT%H:%M:%S")})
    report.metric_names = sink.metric_names


def _state_section(run: _Run, opts: AnalyzeOptions, state_target: str | None, history, sink: AnalysisSink,
                   report: AnalysisReport, warn: Warn) -> tuple[str, object, list[str]]:  # fmt: skip
    """The trained state: static geometry, text samples and held-out perplexity; (label, tokenizer, lines)."""
    from ...run.state import load_trained

    final_step = history[0][-1] if history else None
    state = load_trained(state_target, initial=opts.initial)
    label = _state_label(state, opts.initial)
    if final_step is None:
        final_step = state.config.train.max_steps
    step = 0 if opts.initial else (state.step if state.step is not None else final_step)
    if label.startswith("checkpoint") and opts.checkpoint is None and not Path(run.target, "manifest.json").exists():
        warn(f"{run.run_dir} has no final rows; analysed its latest checkpoint ({label})")
    static = static_analysis(state, opts, sink, label, step, warn)
    report.results["static"] = static
    report.results["state"] = {"label": label, "step": step}
    lines = _static_lines(static, state.rows.num_base, state.rows.num_total)
    samples = _samples(state, opts, sink, label, warn) if opts.samples else []  # before perplexity frees the model
    ppl = _perplexity(run, state, state_target, opts, sink, label, step, warn)
    report.results["perplexity"] = ppl
    lines += ppl.pop("lines") + samples
    return label, state.tokenizer, lines


def _loss_section(run: _Run, history, sink: AnalysisSink, report: AnalysisReport) -> str:
    """The loss curve (from MLflow, else the checkpoints' trainer state); its summary line."""
    if not history:
        return "loss       no loss history (MLflow has no `loss` metric and no checkpoint has trainer_state.json)"
    steps, losses, source = history
    sink.table("loss/loss_curve", [{"step": s, "loss": v} for s, v in zip(steps, losses, strict=True)])
    fig = plots.loss_curve(steps, losses, label=run.label)
    sink.figure("loss/loss_curve", fig)
    report.figures["loss_curve"] = fig
    report.results["loss"] = {"steps": steps, "losses": losses, "source": source}
    return (
        f"loss       {len(steps)} points, step {steps[0]}: {losses[0]:.4g} -> step {steps[-1]}: {losses[-1]:.4g} "
        f"(from {source})"
    )


def _recording_section(run: _Run, opts: AnalyzeOptions, recording_path: Path, tokenizer, sink: AnalysisSink,
                       report: AnalysisReport, warn: Warn) -> list[str]:  # fmt: skip
    """The recording's dynamics (and its trajectory unless --no-trajectory); their summary lines."""
    result = analyse_recording(recording_path, from_step=opts.from_step, to_step=opts.to_step,
                               freeze_threshold=opts.freeze_threshold)  # fmt: skip
    prefix = "dynamics" if recording_path.name == "recording" else f"dynamics-{recording_path.name}"
    dynamics_outputs(result, sink, prefix, tokenizer)
    report.results["dynamics"] = result
    lines = dynamics_lines(result)
    if not result.complete:
        warn(f"recording {recording_path} was cut short (its writer did not finish); analysed its "
             f"{len(result.steps)} complete steps")  # fmt: skip
    if opts.trajectory:
        from ..trajectory.from_recording import recording_trajectory

        traj_prefix = prefix.replace("dynamics", "trajectory", 1)
        drawn = recording_trajectory(recording_path, run.target, sink, traj_prefix, tokens=opts.trajectory_tokens,
                                     seed=opts.seed, from_step=opts.from_step, to_step=opts.to_step,
                                     warn=warn)  # fmt: skip
        report.results["trajectory"] = drawn
        lines.append(f"trajectory {drawn['tracked']} of {drawn['new_rows']} new rows over {drawn['frames']} "
                     f"frames: {drawn['folder']}/trajectory.html, .gif, tokens.csv")  # fmt: skip
    return lines
