"""How a group of rows moves over a recording: raw displacement, per unit of learning rate, and split into the
group's common drift and each row's motion relative to it.

"Frozen" asks whether rows still move *relative to each other*: in the Wordybird runs the untrained rows slide
almost uniformly (the notebook: mean displacement 0.247, max 0.255), a drift of the whole group that says nothing
about rows learning. With ``d_i = x_i(t) - x_i(t0)`` for the group's rows i:

- raw: mean_i |d_i|, what the notebook reports;
- drift: |mean_i d_i|, the displacement of the group's centroid;
- relative: mean_i |d_i - mean_j d_j|, what is left once the common drift is taken out;
- per unit of learning rate: each of the above divided by the sum of the learning rates of the steps between t0
  and t (a learning rate decaying to zero stops rows by itself; this separates that from the rows' own slowing).

Per step it also counts the share of the group's rows that did not change at all (bit-identical to the previous
recorded step), the freeze signal of round-to-nearest bf16. A recording with the ``master`` field (fp32 master
copies, `train.precision=fp32-master`) gets the same three figures for the masters as ``master_*``: what the
optimizer moved, next to what the model uses.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...storage.recording import Recording
from .steps import _unchanged_rows


def split_displacement(start: torch.Tensor, current: torch.Tensor) -> dict[str, float]:
    """Raw mean displacement of the rows, the norm of their mean displacement (drift), and the mean remainder."""
    delta = current.float() - start.float()
    drift = delta.mean(dim=0)
    return {
        "raw": float(delta.norm(dim=1).mean()),
        "drift": float(drift.norm()),
        "relative": float((delta - drift).norm(dim=1).mean()),
    }


def group_motion(rec: Recording, rows: torch.Tensor | None = None) -> dict[str, Any]:
    """One pass over ``rec``: per recorded step, the group's displacement from the first step (raw, drift,
    relative, and each per unit of the learning rate summed since the first step) and its unchanged-row share."""
    lrs = rec["lr"][:].to(torch.float64).tolist() if "lr" in rec.fields else None
    losses = rec["loss"][:].to(torch.float64).tolist() if "loss" in rec.fields else None
    names = ["embeddings"] + (["master"] if "master" in rec.fields else [])
    kinds = ("raw", "drift", "relative") + (("master_raw", "master_drift", "master_relative") if len(names) > 1 else ())
    out: dict[str, Any] = {"steps": [], "lr_sum": [], "unchanged_share": [], "loss": [], **{k: [] for k in kinds}}
    start = prev = start_master = None
    lr_sum = 0.0
    for position, (step, values) in enumerate(rec.iter_step_fields(names)):
        cur = values["embeddings"] if rows is None else values["embeddings"][rows]
        if start is None:
            start = cur
        if prev is not None and lrs is not None and not math.isnan(lrs[position]):
            lr_sum += lrs[position]
        parts = split_displacement(start, cur)
        if "master" in values:  # the fp32 copy the optimizer steps, next to the bf16 rows the model uses
            master = values["master"] if rows is None else values["master"][rows]
            start_master = master if start_master is None else start_master
            parts.update({f"master_{k}": v for k, v in split_displacement(start_master, master).items()})
        out["steps"].append(step)
        for key in kinds:
            out[key].append(parts[key])
        out["lr_sum"].append(lr_sum)
        unchanged = None
        if prev is not None:
            same = _unchanged_rows(prev, cur)
            unchanged = float(same.float().mean()) if same.numel() else None
        out["unchanged_share"].append(unchanged)
        out["loss"].append(losses[position] if losses is not None else None)
        prev = cur
    for key in kinds:
        out[f"{key}_per_lr"] = [v / s if s > 0 else None for v, s in zip(out[key], out["lr_sum"], strict=False)]
    return out


def late_unchanged_share(motion: dict[str, Any], tail: float = 0.25) -> float | None:
    """Mean unchanged-row share over the last ``tail`` of the steps (1.0: nothing moved there)."""
    shares = [s for s in motion["unchanged_share"] if s is not None]
    if not shares:
        return None
    count = max(1, int(round(len(shares) * tail)))
    return sum(shares[-count:]) / count


def freeze_onset_step(motion: dict[str, Any], share: float = 0.99) -> int | None:
    """The first step from which at least ``share`` of the group's rows stay bit-identical at every later step."""
    onset = None
    for step, unchanged in zip(motion["steps"], motion["unchanged_share"], strict=False):
        if unchanged is None:
            continue
        if unchanged >= share:
            onset = step if onset is None else onset
        else:
            onset = None
    return onset
