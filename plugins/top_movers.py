"""Example plugin (docs/plugins.md): log which new tokens moved furthest, every `every` steps.

It shows the three things most plugins do: keep what it needs at run start, look at the rows after each step
through ``state.rows`` (whatever strategy holds them), and put results in MLflow through the run context.
Activate it with ``wakelab run --plugin top_movers`` from the repository root (``./plugins`` is searched).
"""

from __future__ import annotations

import json

import torch

import wakelab

EVERY = 10
TOP = 5

_run = None
_start: torch.Tensor | None = None


@wakelab.hookimpl
def on_run_start(run):
    global _run, _start
    _run = run
    _start = run.rows.values(run.rows.new_ids).float().clone()


@wakelab.hookimpl
def on_step_end(state):
    if _run is None or _start is None or state.step % EVERY:
        return
    moved = (state.rows.values(state.rows.new_ids).float() - _start).norm(dim=1)
    _run.log_metrics({"top_movers.max_displacement": float(moved.max())}, state.step)


@wakelab.hookimpl
def on_run_end(run, status):
    if _start is None:
        return
    moved = (run.rows.values(run.rows.new_ids).float() - _start).norm(dim=1)
    order = torch.argsort(moved, descending=True)[:TOP]
    ids = run.rows.new_ids[order].tolist()
    table = [
        {"token": run.tokenizer.convert_ids_to_tokens(i), "id": i, "displacement": float(moved[j])}
        for i, j in zip(ids, order.tolist())
    ]
    path = run.output_dir / "top_movers.json"
    path.write_text(json.dumps(table, indent=2) + "\n")
    run.log_artifact(path, "plugins")
