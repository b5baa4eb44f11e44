"""Example plugin (docs/plugins.md): log which new tokens moved furthest, every `top_movers.every` steps.

It shows the four things most plugins do: declare its own settings (the ``top_movers`` config section), keep what
it needs at run start, look at the rows after each step through ``state.rows`` (whatever strategy holds them), and
put results in MLflow through the run context. Activate it with ``wakelab run --plugin top_movers`` from the
repository root (``./plugins`` is searched); ``--set top_movers.top=10`` changes a setting.
"""

from __future__ import annotations

import json

import torch
from pydantic import Field

import wakelab


class TopMoversConfig(wakelab.PluginConfig):
    """The `top_movers` example plugin: how often to log the largest displacement, and how many tokens to list."""

    every: int = Field(10, ge=1, description="Optimizer steps between `top_movers.max_displacement` metrics.")
    top: int = Field(5, ge=1, description="New tokens listed in top_movers.json, furthest-moved first.")


_run = None
_start: torch.Tensor | None = None


@wakelab.hookimpl
def config_section():
    return "top_movers", TopMoversConfig


@wakelab.hookimpl
def on_run_start(run):
    global _run, _start
    _run, _start = None, None
    if not run.is_main_process:  # torchrun: one process writes top_movers.json
        return
    _run = run
    _start = run.rows.values(run.rows.new_ids).float().clone()


@wakelab.hookimpl
def on_step_end(state):
    if _run is None or _start is None or state.step % _run.config.top_movers.every:
        return
    moved = (state.rows.values(state.rows.new_ids).float() - _start).norm(dim=1)
    _run.log_metrics({"top_movers.max_displacement": float(moved.max())}, state.step)


@wakelab.hookimpl
def on_run_end(run, status):
    if _start is None:
        return
    moved = (run.rows.values(run.rows.new_ids).float() - _start).norm(dim=1)
    order = torch.argsort(moved, descending=True)[: run.config.top_movers.top]
    ids = run.rows.new_ids[order].tolist()
    table = [
        {"token": run.tokenizer.convert_ids_to_tokens(i), "id": i, "displacement": float(moved[j])}
        for i, j in zip(ids, order.tolist(), strict=True)
    ]
    path = run.output_dir / "top_movers.json"
    path.write_text(json.dumps(table, indent=2) + "\n")
    run.log_artifact(path, "plugins")
