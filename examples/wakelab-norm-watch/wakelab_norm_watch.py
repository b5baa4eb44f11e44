"""wakelab plugin ``norm_watch``: how large the new rows grow compared with the base rows, while they train.

New rows that drift far above the base rows' norm dominate the softmax; this logs their mean norm as a multiple
of the base rows' every ``norm_watch.every`` steps (metric ``norm_watch.ratio``), tags the run when the ratio
passes ``norm_watch.alarm``, and writes the last values to ``norm_watch.json`` (an MLflow artifact).

It uses only what ``wakelab`` exports, takes its settings from its own config section, and is found through the
``wakelab`` entry-point group in this distribution's pyproject.toml.
"""

from __future__ import annotations

import json

import torch
from pydantic import Field

import wakelab


class NormWatchConfig(wakelab.PluginConfig):
    """The `norm_watch` plugin: mean new-row norm / mean base-row norm, logged every few steps."""

    every: int = Field(5, ge=1, description="Optimizer steps between `norm_watch.ratio` metrics.")
    alarm: float = Field(3.0, gt=0, description="Tag the run `norm_watch.alarm` when the ratio passes this.")


_state: dict = {}


@wakelab.hookimpl
def config_section():
    return "norm_watch", NormWatchConfig


@wakelab.hookimpl
def on_run_start(run: wakelab.RunContext):
    _state.clear()
    if not run.is_main_process:  # torchrun: one process logs and writes norm_watch.json
        return
    base = run.rows.values(torch.arange(run.rows.num_base)).float().norm(dim=1).mean().item()
    _state.update(run=run, base=base, history=[])
    run.log_params({"norm_watch.base_norm": round(base, 6)})


@wakelab.hookimpl
def on_step_end(state: wakelab.StepState):
    run = _state.get("run")
    if run is None or state.step % run.config.norm_watch.every:
        return
    ratio = state.rows.values(state.rows.new_ids).float().norm(dim=1).mean().item() / _state["base"]
    _state["history"].append({"step": state.step, "ratio": ratio})
    run.log_metrics({"norm_watch.ratio": ratio}, state.step)
    if ratio > run.config.norm_watch.alarm:
        run.set_tags({"norm_watch.alarm": f"step {state.step}: ratio {ratio:.3g}"})


@wakelab.hookimpl
def on_run_end(run: wakelab.RunContext, status: str):
    if "run" not in _state:
        return
    path = run.output_dir / "norm_watch.json"
    path.write_text(json.dumps({"base_norm": _state["base"], "history": _state["history"]}, indent=2) + "\n")
    run.log_artifact(path, "plugins")
