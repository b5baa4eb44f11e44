"""The dynamics analyses of one recording, in a single streaming pass over its steps.

:func:`analyse_recording` reads a recording (``wakelab.storage.recording.open``) step by step and feeds the pure
functions of :mod:`wakelab.analysis.dynamics.steps` one step pair at a time:

- per-token displacement between two recorded steps (``from_step``/``to_step``, default first/last), summarised for
  all tracked rows and, when masks exist, for trained and untrained rows; the freeze verdict on the untrained rows
  (all tracked rows without masks);
- freeze onset per step: share of rows bit-identical to the previous recorded step, mean displacement per step;
- bf16 lattice hops per step (rows/coordinates that moved to another bf16 value; AdamW updates smaller than half a
  bf16 ULP, rounded away), from the recorded values, Adam moments and learning rate; skipped with a note when a
  field is missing;
- centroid norm and bounding radius of the untrained rows (all tracked rows without masks) at every step.

Memory: one recorded step of each needed field plus the previous step's values (and the ``from_step`` values) are
held at a time. The reader's shard handles are released after every step, so the memory-mapped pages of a shard do
not pile up in the resident set either: a 2.6 GB recording is analysed in a few hundred MB.

Masks: a ``masks.safetensors`` in the recording directory (or beside it) with ``trained_mask`` / ``untrained_mask``
(booleans) or ``trained_indices`` / ``untrained_indices`` says which rows the run trained. Masks and indices may be
over the tracked rows or over the whole vocabulary (then they are matched through the recording's ``token_ids``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import WakelabError
from ...storage.recording import Recording, RecordingError
from ...storage.recording import open as open_recording
from .steps import centroid_track, displacement, displacement_summary, freeze_onset, freeze_verdict, lattice_hops

__all__ = ["HOP_FIELDS", "MASKS_FILE", "DynamicsResult", "Masks", "analyse_recording", "describe", "read_masks"]

MASKS_FILE = "masks.safetensors"
#: Fields the lattice-hop analysis needs.
HOP_FIELDS = ("embeddings", "exp_avg", "exp_avg_sq", "lr")


@dataclass
class Masks:
    """Which tracked rows trained (``trained``) and which did not (``untrained``), as booleans over tracked rows."""

    trained: torch.Tensor
    untrained: torch.Tensor
    source: Path


@dataclass
class DynamicsResult:
    """Everything :func:`analyse_recording` found; lists of records are one dict per step (or step pair)."""

    path: Path
    complete: bool
    steps: list[int]
    fields: list[str]
    token_ids: list[int] | None
    from_step: int
    to_step: int
    displacement: torch.Tensor  # per tracked row, float32
    displacement_summary: dict
    freeze: dict  # freeze_verdict + "group"
    freeze_onset: list[dict]
    lattice_hops: list[dict] | None
    centroid: list[dict]
    centroid_group: str
    masks: Masks | None
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    motion: dict | None = None  # the freeze group's displacement split into drift and relative motion, per lr

    @property
    def num_rows(self) -> int:
        return int(self.displacement.numel())


# ----------------------------------------------------------------------------------------------------------------------
# Masks


def _as_row_mask(value: torch.Tensor, key: str, num_rows: int, token_ids: list[int] | None, file: Path) -> torch.Tensor:
    """A boolean mask over the tracked rows from a mask or an index tensor over tracked rows or the vocabulary."""
    value = value.reshape(-1)
    positions = torch.as_tensor(token_ids if token_ids is not None else range(num_rows), dtype=torch.long)
    if key.endswith("_mask"):
        value = value.to(torch.bool)
        if value.numel() == num_rows:
            return value
        if token_ids is not None and value.numel() > int(positions.max()):
            return value[positions]
        raise RecordingError(
            f"{file}: {key} has {value.numel()} entries, but the recording tracks {num_rows} rows"
            + (f" out of a vocabulary of at least {int(positions.max()) + 1}" if token_ids is not None else "")
        )
    ids = value.to(torch.long)
    if token_ids is None and ids.numel() and (int(ids.max()) >= num_rows or int(ids.min()) < 0):
        raise RecordingError(f"{file}: {key} holds ids outside the {num_rows} tracked rows")
    return torch.isin(positions, ids)


def read_masks(rec: Recording, num_rows: int) -> Masks | None:
    """The trained/untrained masks of ``masks.safetensors`` in or beside the recording directory, if there is one."""
    from safetensors.torch import load_file

    for file in (rec.path / MASKS_FILE, rec.path.parent / MASKS_FILE):
        if not file.is_file():
            continue
        try:
            data = load_file(str(file))
        except Exception as exc:  # noqa: BLE001 - any unreadable file: say which
            raise RecordingError(f"cannot read {file}: {exc}") from None
        found = {}
        for kind in ("trained", "untrained"):
            for suffix in ("_mask", "_indices"):
                key = kind + suffix
                if key in data:
                    found[kind] = _as_row_mask(data[key], key, num_rows, rec.token_ids, file)
                    break
        if not found:
            raise RecordingError(
                f"{file} has none of trained_mask, untrained_mask, trained_indices, untrained_indices "
                f"(it holds {', '.join(sorted(data)) or 'nothing'})"
            )
        trained = found.get("trained", ~found["untrained"] if "untrained" in found else None)
        untrained = found.get("untrained", ~trained)
        return Masks(trained=trained, untrained=untrained, source=file)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Streaming


def _step_position(steps: np.ndarray, step: int | None, default: int, what: str) -> int:
    if step is None:
        return default
    hits = np.flatnonzero(steps == int(step))
    if hits.size == 0:
        shown = f"{int(steps[0])}..{int(steps[-1])} ({steps.size} steps)"
        raise WakelabError(f"{what} {step} is not a recorded step; the recording has steps {shown}")
    return int(hits[0])


def _adam_settings(meta: dict) -> dict:
    return {
        "betas": (float(meta.get("adam_beta1", 0.9)), float(meta.get("adam_beta2", 0.999))),
        "eps": float(meta.get("adam_epsilon", 1e-8)),
        "weight_decay": float(meta.get("weight_decay", 0.0) or 0.0),
    }


def _subset_onset(prev: torch.Tensor, cur: torch.Tensor, rows: torch.Tensor, step: int, prev_step: int) -> dict:
    return freeze_onset([(prev_step, prev[rows]), (step, cur[rows])])[0]


def analyse_recording(
    rec_or_path: Recording | str | Path,
    *,
    from_step: int | None = None,
    to_step: int | None = None,
    freeze_threshold: float = 1e-6,
    masks: Masks | None | str = "auto",
) -> DynamicsResult:
    """Stream the recording once and compute every dynamics analysis (see the module docstring).

    ``masks="auto"`` reads ``masks.safetensors`` when present; pass ``None`` to ignore it or a :class:`Masks`.
    Raises :class:`~wakelab.errors.WakelabError` when the recording cannot be analysed (no embeddings field, no
    complete step, an unrecorded ``from_step``/``to_step``).
    """
    own = not isinstance(rec_or_path, Recording)
    rec = open_recording(rec_or_path) if own else rec_or_path
    try:
        result = _analyse(rec, from_step, to_step, freeze_threshold, masks)
        if len(result.steps) > 1:
            from .groups import group_motion

            group = result.masks.untrained if result.masks is not None and result.masks.untrained.any() else None
            result.motion = group_motion(rec, None if group is None else torch.nonzero(group).reshape(-1))
        return result
    finally:
        if own:
            rec.close()


def _analyse(rec: Recording, from_step, to_step, freeze_threshold, masks) -> DynamicsResult:
    """One pass over the recording's steps, between checks up front and the verdicts at the end."""
    notes: list[str] = []
    steps, num_rows, first, last = _check_steps(rec, from_step, to_step, notes)
    if masks == "auto":
        masks = read_masks(rec, num_rows)
    group, tracked = _tracked_group(masks, num_rows, notes)
    do_hops = _can_count_hops(rec, notes)
    walk = _walk(rec, steps, first, last, masks, tracked, do_hops)
    if walk.gaps:
        notes.append(
            f"lattice hops left out for {walk.gaps} step pair(s) that are not consecutive optimizer steps "
            "(recorder.every > 1) or have no learning rate"
        )
    disp = walk.displacement
    if steps.size == 1:
        notes.append("only one step is recorded: no displacement, freeze onset or lattice hops")
        disp = torch.zeros(num_rows)
    summary = displacement_summary(disp, masks.trained if masks is not None else None)
    if masks is not None and not torch.equal(masks.untrained, ~masks.trained):
        summary["untrained"] = displacement_summary(disp[masks.untrained])["all"]
    verdict = freeze_verdict(disp[tracked], freeze_threshold)
    verdict["group"] = group
    verdict["count"] = int(tracked.sum())
    return DynamicsResult(
        path=rec.path,
        complete=rec.complete,
        steps=[int(s) for s in steps],
        fields=list(rec.fields),
        token_ids=rec.token_ids,
        from_step=int(steps[first]),
        to_step=int(steps[last]),
        displacement=disp,
        displacement_summary=summary,
        freeze=verdict,
        freeze_onset=walk.onset,
        lattice_hops=walk.hops if do_hops else None,
        centroid=walk.centroid,
        centroid_group=group,
        masks=masks,
        meta={k: v for k, v in rec.meta.items() if isinstance(v, (str, int, float, bool))},
        notes=notes,
    )


def _check_steps(rec: Recording, from_step, to_step, notes: list[str]) -> tuple[np.ndarray, int, int, int]:
    """The recorded steps, the number of rows, and the positions of the first and last step to analyse."""
    if "embeddings" not in rec.fields:
        raise WakelabError(
            f"recording {rec.path} has no embeddings field (it has {', '.join(rec.fields) or 'none'}); record it "
            "with wakelab run --plugin recorder --set recorder.fields=embeddings,grads,exp_avg,exp_avg_sq,lr,loss"
        )
    spec = rec.fields["embeddings"]
    if len(spec.shape) != 2:
        raise WakelabError(f"recording {rec.path}: embeddings have per-step shape {spec.shape}, expected [rows, d]")
    steps = rec.steps
    if steps.size == 0:
        raise WakelabError(
            f"recording {rec.path} holds no complete step yet"
            + ("" if rec.complete else " (its writer stopped before finishing the first shard)")
        )
    if not rec.complete:
        notes.append(
            f"recording cut short: the writer did not finish (crash or kill); analysed the {steps.size} complete "
            f"steps {int(steps[0])}..{int(steps[-1])}"
        )
    first = _step_position(steps, from_step, 0, "--from-step")
    last = _step_position(steps, to_step, steps.size - 1, "--to-step")
    if first >= last and steps.size > 1:
        raise WakelabError(f"--from-step {int(steps[first])} must come before --to-step {int(steps[last])}")
    return steps, spec.shape[0], first, last


def _tracked_group(masks: Masks | None, num_rows: int, notes: list[str]) -> tuple[str, torch.Tensor]:
    """The rows the freeze verdict and centroid follow: the untrained ones when masks say which, else all."""
    if masks is None:
        return "all tracked rows", torch.ones(num_rows, dtype=torch.bool)
    notes.append(
        f"masks from {masks.source}: {int(masks.trained.sum())} trained, {int(masks.untrained.sum())} untrained rows"
    )
    if not masks.untrained.any():
        notes.append("none of the tracked rows is untrained: the freeze verdict and centroid use all tracked rows")
        return "all tracked rows", torch.ones(num_rows, dtype=torch.bool)
    return "untrained", masks.untrained


def _can_count_hops(rec: Recording, notes: list[str]) -> bool:
    """Lattice hops need the values and Adam's two moments at every step."""
    missing = [f for f in HOP_FIELDS if f not in rec.fields]
    if missing:
        notes.append(
            f"lattice hops skipped: the recording lacks {', '.join(missing)} (it needs {', '.join(HOP_FIELDS)})"
        )
        return False
    param_dtype = str(rec.meta.get("param_dtype", ""))
    if param_dtype and param_dtype != "bfloat16":
        notes.append(
            f"the parameters were {param_dtype}: updates below half a bf16 ULP were not lost in training; "
            "the rounded-away counts say what bf16 parameters would have lost"
        )
    return True


@dataclass
class _Walk:
    """What one pass over the steps collects."""

    onset: list[dict] = field(default_factory=list)
    hops: list[dict] = field(default_factory=list)
    centroid: list[dict] = field(default_factory=list)
    gaps: int = 0
    displacement: torch.Tensor | None = None


def _walk(rec: Recording, steps: np.ndarray, first: int, last: int, masks: Masks | None, tracked: torch.Tensor,
          do_hops: bool) -> _Walk:  # fmt: skip
    """Each step pair once: freeze onset (per group with masks), lattice hops, the centroid, and the displacement
    from the first analysed step to the last."""
    adam = _adam_settings(rec.meta)
    lrs = rec["lr"][:].to(torch.float64).tolist() if "lr" in rec.fields else None
    names = ["embeddings", "exp_avg", "exp_avg_sq"] if do_hops else ["embeddings"]
    tracked_rows = torch.nonzero(tracked).reshape(-1)
    groups = () if masks is None else (
        ("trained", torch.nonzero(masks.trained).reshape(-1)), ("untrained", torch.nonzero(masks.untrained).reshape(-1))
    )  # fmt: skip
    walk = _Walk()
    prev: torch.Tensor | None = None
    prev_step = None
    start_values: torch.Tensor | None = None
    for position, (step, values) in zip(range(steps.size), rec.iter_step_fields(names), strict=True):
        cur = values["embeddings"]
        if position == first:
            start_values = cur
        if position == last and start_values is not None:
            walk.displacement = displacement(start_values, cur)
        if prev is not None:
            record = freeze_onset([(prev_step, prev), (step, cur)])[0]
            record["previous_step"] = prev_step
            for name, rows in groups:
                sub = _subset_onset(prev, cur, rows, step, prev_step) if rows.numel() else {}
                record[f"{name}_unchanged_share"] = sub.get("unchanged_share")
                record[f"{name}_mean_displacement"] = sub.get("mean_displacement")
            walk.onset.append(record)
            if do_hops:
                if step == prev_step + 1 and not math.isnan(lrs[position]):
                    state = (values["exp_avg"], values["exp_avg_sq"])
                    walk.hops.extend(
                        lattice_hops(
                            [prev, cur], [state[0]] * 2, [state[1]] * 2, lrs[position], [prev_step, step], **adam
                        )
                    )
                else:
                    walk.gaps += 1
        walk.centroid.extend(centroid_track([(step, cur)], tracked_rows))
        prev, prev_step = cur, step
        del values
    return walk


def describe(result: DynamicsResult) -> dict[str, Any]:
    """The scalar facts of a result (for JSON and the summary)."""
    return {
        "recording": str(result.path),
        "complete": result.complete,
        "steps": len(result.steps),
        "first_step": result.steps[0],
        "last_step": result.steps[-1],
        "rows": result.num_rows,
        "fields": result.fields,
        "from_step": result.from_step,
        "to_step": result.to_step,
        "masks": str(result.masks.source) if result.masks is not None else None,
        "notes": result.notes,
    }
