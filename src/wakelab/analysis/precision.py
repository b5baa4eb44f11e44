"""The Wordybird question answered from a sweep over ``train.precision`` (crossed with ``train.scheduler``).

Is the untrained rows' freeze a property of learning, of the learning rate decaying to zero, or of round-to-nearest
bf16 storage? Each child continues the same checkpoint under one precision setting and one schedule and records
every step; this module reads each child's recording and logs to the sweep's parent run:

    comparison/precision.{json,md}      one row per child: the untrained rows' displacement from the start (raw,
                                        the group's common drift, the motion relative to it, each per unit of
                                        learning rate), the share of them that still change per step at the end,
                                        freeze onset and verdict, lattice hops, share of updates rounded away, loss
    comparison/untrained_motion.png     the untrained rows' relative motion and unchanged share over the steps
    tag wakelab.precision.verdict       one sentence computed from the numbers (see :func:`verdict`)

A child "keeps the rows moving" when, over the last quarter of its steps, at least 1% of the untrained rows change
(any bit) per step on average; below that they are frozen, as the notebook reads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..logs import warn
from ..tracking.runs import tag_value

MOVING_SHARE = 0.01  # at least this share of the untrained rows changes per step late in the run: still moving
REMEDIES = ("fp32-master", "stochastic", "kahan")

Log = Callable[[str], None]


def _recording_path(child) -> Path:
    config = child.config
    return Path(config.recorder.path) if config.recorder.path else child.output_dir / "recording"


def child_row(child) -> dict[str, Any]:
    """The comparison's figures for one finished child (or a note saying why there are none)."""
    from ..storage.recording import open as open_recording
    from .dynamics.from_recording import analyse_recording, read_masks
    from .dynamics.groups import freeze_onset_step, group_motion, late_unchanged_share

    t = child.config.train
    row: dict[str, Any] = {
        "child": child.label,
        "precision": t.precision,
        "scheduler": t.scheduler,
        "status": child.status,
        "run_id": child.run_id,
    }
    path = _recording_path(child)
    if child.status != "FINISHED" or not (path / "index.json").exists():
        row["note"] = "no recording" if child.status == "FINISHED" else child.error
        return row
    rec = open_recording(path)
    try:
        masks = read_masks(rec, rec.fields["embeddings"].shape[0])
        rows = torch.nonzero(masks.untrained).reshape(-1) if masks is not None and masks.untrained.any() else None
        row["group"] = "untrained" if rows is not None else "all tracked rows"
        row["group_rows"] = int(rows.numel()) if rows is not None else int(rec.fields["embeddings"].shape[0])
        motion = group_motion(rec, rows)
        dynamics = analyse_recording(rec)
    finally:
        rec.close()
    late = late_unchanged_share(motion)
    losses = [v for v in motion["loss"] if v is not None and not math.isnan(v)]
    hops = dynamics.lattice_hops or []
    nonzero = sum(h["nonzero_updates"] for h in hops)
    row.update(
        steps=f"{motion['steps'][0]}..{motion['steps'][-1]}",
        raw=motion["raw"][-1],
        drift=motion["drift"][-1],
        relative=motion["relative"][-1],
        raw_per_lr=motion["raw_per_lr"][-1],
        relative_per_lr=motion["relative_per_lr"][-1],
        master_relative=motion["master_relative"][-1] if "master_relative" in motion else None,
        late_changed_share=None if late is None else 1 - late,
        freeze_onset=freeze_onset_step(motion),
        frozen=dynamics.freeze["frozen"],
        rows_hopped_per_step=(sum(h["rows_moved"] for h in hops) / len(hops)) if hops else None,
        rounded_away_share=(sum(h["rounded_away"] for h in hops) / nonzero) if nonzero else None,
        final_loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        curve={k: motion[k] for k in ("steps", "raw", "drift", "relative", "relative_per_lr", "unchanged_share")},
    )
    row["moving"] = row["late_changed_share"] is not None and row["late_changed_share"] >= MOVING_SHARE
    return row


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def verdict(rows: list[dict[str, Any]]) -> str:
    """One sentence that separates the schedule from rounding, from the children that finished.

    The reference is bf16 under the notebook's linear decay (or under the one schedule swept, without a schedule
    axis); a constant rate, where swept, tells the schedule's part."""
    by = {(r["precision"], r["scheduler"]): r for r in rows if "moving" in r}
    schedules = {schedule for _, schedule in by}
    main = "linear" if "linear" in schedules or not schedules else sorted(schedules)[0]
    decay = "the linear decay" if main == "linear" else f"the {main} schedule"
    base = by.get(("bf16", main))
    if base is None:
        return f"no verdict: no bf16 child under {decay} finished (it is the notebook's setting)"
    who = "untrained rows" if base.get("group", "untrained") == "untrained" else "tracked rows"
    if base["moving"]:
        sentence = (
            f"no freeze to explain: under {decay} {_pct(base['late_changed_share'])} of the {who} "
            "still change per step in bf16 at the end"
        )
        return sentence + _rounding_slows(by, main, base)
    constant = by.get(("bf16", "constant")) if main != "constant" else None
    schedule = constant is not None and constant["moving"]
    remedies = [p for p in REMEDIES if by.get((p, main), {}).get("moving")]
    remedies_constant = [p for p in REMEDIES if by.get((p, "constant"), {}).get("moving")]
    frozen = f"under {decay} bf16 freezes them ({_pct(base['late_changed_share'])} change per step at the end)"
    if schedule and remedies:
        return (
            f"both: {frozen}, under a constant rate they keep moving in bf16 "
            f"({_pct(constant['late_changed_share'])}), and under the decay {', '.join(remedies)} keep them "
            "moving too: the decaying rate shrinks the updates below half a bf16 step, and rounding drops them"
        )
    if schedule:
        return (
            f"under a constant rate the {who} keep moving in bf16 "
            f"({_pct(constant['late_changed_share'])} change per step at the end) while {frozen}: "
            "the freeze follows the schedule"
        )
    if remedies or remedies_constant:
        which = sorted(set(remedies) | set(remedies_constant), key=REMEDIES.index)
        also = "; bf16 freezes them under a constant rate too" if constant is not None else ""
        return f"only {', '.join(which)} keep them moving ({frozen}{also}): the freeze is rounding"
    return (
        f"the {who} freeze under every setting and schedule swept: the freeze is a property of learning "
        "(their updates vanish), not of the schedule or of bf16 rounding"
    )


#: A remedy that keeps this many more of the rows changing (absolute share) than bf16 shows rounding at work.
SLOWED_BY = 0.10


def _rounding_slows(by: dict, schedule: str, base: dict[str, Any]) -> str:
    """A partial freeze: bf16 still moves some rows, while a remedy under the same schedule moves clearly more."""
    ahead = [
        (p, by[(p, schedule)]["late_changed_share"])
        for p in REMEDIES
        if (p, schedule) in by and by[(p, schedule)]["late_changed_share"] - base["late_changed_share"] >= SLOWED_BY
    ]
    if not ahead:
        return ""
    shares = sorted(share for _, share in ahead)
    kept = _pct(shares[0]) if shares[0] == shares[-1] else f"{_pct(shares[0])}-{_pct(shares[-1])}"
    return (
        f"; but rounding holds part of them still: under the same schedule {', '.join(p for p, _ in ahead)} "
        f"keep {kept} changing"
    )


COLUMNS = (
    ("child", "child"),
    ("raw", "displacement"),
    ("drift", "common drift"),
    ("relative", "relative motion"),
    ("raw_per_lr", "displacement / Σlr"),
    ("relative_per_lr", "relative / Σlr"),
    ("master_relative", "relative motion of the fp32 masters"),
    ("late_changed_share", "rows changing per step (last quarter)"),
    ("freeze_onset", "freeze onset"),
    ("rows_hopped_per_step", "rows hopped per step"),
    ("rounded_away_share", "updates rounded away"),
    ("final_loss", "loss (last 10)"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key in ("late_changed_share", "rounded_away_share"):
        return f"{value:.1%}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(label for _, label in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = [row["child"]] + [_cell(k, row.get(k)) for k, _ in COLUMNS[1:]]
        if "note" in row:
            cells = [row["child"]] + [f"({row['note']})"] + ["—"] * (len(COLUMNS) - 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_precision(client, plan, parent_id: str, out: Path, log: Log) -> str:
    """Write and log the precision comparison of a sweep's children; returns its markdown (table + verdict)."""
    rows = []
    for child in plan.children:
        try:
            rows.append(child_row(child))
        except Exception as exc:  # noqa: BLE001 - one unreadable recording leaves a gap, not a lost comparison
            warn(f"could not analyse the recording of {child.label}: {exc}")
            rows.append(
                {
                    "child": child.label,
                    "precision": child.config.train.precision,
                    "scheduler": child.config.train.scheduler,
                    "note": f"unreadable recording: {exc}",
                }
            )
    sentence = verdict(rows)
    group = next((r["group"] for r in rows if "group" in r), "untrained")
    notes = [
        f"rows: {'the untrained rows (masks.safetensors)' if group == 'untrained' else group} of each recording; "
        "displacement from the first recorded step; "
        "common drift = |mean displacement vector|; relative motion = mean |displacement - common drift|; "
        "Σlr = the learning rates of the recorded steps summed",
        f"a child keeps the rows moving when >= {MOVING_SHARE:.0%} of them change per step over its last quarter",
        "rows hopped and updates rounded away: every tracked row, from the recorded Adam moments and rate "
        "(what round-to-nearest bf16 would drop; the remedies keep those updates)",
    ]
    markdown = f"## The Wordybird question\n\n**Verdict:** {sentence}\n\n{table(rows)}\n" + "".join(
        f"- {n}\n" for n in notes
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.md").write_text(markdown)
    (out / "precision.json").write_text(
        json.dumps({"verdict": sentence, "children": rows, "notes": notes}, indent=1, default=str) + "\n"
    )
    _plot(rows, out / "untrained_motion.png")
    client.set_tag(parent_id, "wakelab.precision.verdict", tag_value(sentence))
    for name in ("precision.md", "precision.json", "untrained_motion.png"):
        if (out / name).exists():
            client.log_artifact(parent_id, str(out / name), "comparison")
    log(f"verdict: {sentence}")
    return "\n" + markdown


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from .plots import new_figure, save_figure

    curves = [r for r in rows if r.get("curve")]
    if not curves:
        return
    fig, (left, right) = new_figure(ncols=2, width=6.0)
    for row in curves:
        c = row["curve"]
        style = "-" if row["scheduler"] == "linear" else "--"
        left.plot(c["steps"], c["relative"], style, label=row["child"])
        shares = [(s, 1 - u) for s, u in zip(c["steps"], c["unchanged_share"], strict=False) if u is not None]
        if shares:
            right.plot(*zip(*shares, strict=False), style, label=row["child"])
    left.set_title("untrained rows: motion relative to their common drift")
    left.set_xlabel("step")
    left.set_ylabel("mean L2 distance")
    right.set_title("share of untrained rows that changed this step")
    right.set_xlabel("step")
    right.set_ylabel("share")
    right.legend(fontsize=7, loc="best")
    save_figure(fig, path)
