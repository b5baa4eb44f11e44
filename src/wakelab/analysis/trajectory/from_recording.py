"""``wakelab analyze RUN --recording``: the trajectory, the per-token table and image frames from a recording.

The recording gives the new rows at each recorded step; the base rows (frozen, so the same at every step) and the
tokenizer come from the run's initial state. With the whole history at hand the top movers can be chosen
(``--tokens top:K``; ``auto`` picks them when there are more new rows than ``--max-tokens``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...errors import WakelabError
from ..probe import probe
from ..sink import AnalysisSink
from .frames import MAX_FRAMES, cap_frames
from .stills import frame_image
from .watch import constituents_for, finish_watch, log_frame, log_table, probe_setup, start_watch

__all__ = ["IMAGE_FRAMES", "PROBE_STEPS", "recording_trajectory"]

IMAGE_FRAMES = 100  # frames logged as MLflow images (each is a PNG artifact); the HTML page keeps up to MAX_FRAMES
PROBE_STEPS = 6  # recorded steps the meaning probe runs at (evenly spread, first and last included)


def _probe_over_steps(state, rec, positions, new_ids, steps, sink: AnalysisSink, warn,
                      ) -> tuple[dict | None, dict | None]:  # fmt: skip
    """The meaning probe at a few recorded steps (the recorded rows put into the model): metrics
    ``analysis/probe_kl`` and ``analysis/probe_substitution`` by step; the first and last step's scores."""
    prepared = probe_setup(state.config, state.tokenizer, state.rows.num_base, warn=warn)
    if prepared is None:
        return None, None
    recorded = set(new_ids)
    missing = [w.word for w in prepared.words if w.token_id not in recorded]
    prepared.words = [w for w in prepared.words if w.token_id in recorded]
    if missing:
        warn(f"meaning probe: {len(missing)} words have no rows in the recording and are left out: "
             f"{', '.join(missing[:10])}")  # fmt: skip
    if not prepared.words:
        return None, None
    ids = torch.tensor(new_ids)
    view = rec["embeddings"]
    chosen, _ = cap_frames(steps, PROBE_STEPS)
    results = {}
    for index in chosen:
        step = steps[index]
        state.rows.load_rows(ids, view.at_step(step)[positions])
        rec.release()  # the step's mapped pages leave the resident set; the rows are copied out
        results[step] = probe(state.model, prepared)
        values = list(results[step].values())
        if values:
            kl, substitution = [v["kl"] for v in values], [v["substitution"] for v in values]
            sink.metrics({"probe_kl": sum(kl) / len(kl), "probe_substitution": sum(substitution) / len(kl)}, step)
    return results[steps[chosen[0]]], results[steps[chosen[-1]]]


def recording_trajectory(
    recording_path: Path,
    run_target: str,
    sink: AnalysisSink,
    prefix: str,
    *,
    tokens: str = "auto",
    max_tokens: int = 40,
    seed: int = 0,
    from_step: int | None = None,
    to_step: int | None = None,
    warn: Callable[[str], None] = print,
    projection: str = "focus",
    labels: str = "auto",
) -> dict[str, Any]:
    """Draw the recording's new rows; files go to ``sink`` under ``prefix``; returns the summary values."""
    from ...data.corpus import read_text, resolve_data_paths, text_form, tokenize
    from ...run.state import load_trained
    from ...storage.recording import open as open_recording

    rec = open_recording(recording_path)
    try:
        if "embeddings" not in rec.fields:
            raise WakelabError(
                f"recording {recording_path} has no embeddings (it has {', '.join(rec.fields) or 'none'}); a "
                "trajectory needs them: record with --plugin recorder --set recorder.fields=embeddings (or the default "
                "fields)"
            )
        if len(rec) == 0:
            raise WakelabError(f"recording {recording_path} has no complete step to draw")
        state = load_trained(run_target, initial=True)
        num_base = state.rows.num_base
        ids = list(rec.token_ids or [])
        positions = [i for i, t in enumerate(ids) if t >= num_base]
        if not positions:
            raise WakelabError(
                f"recording {recording_path} holds no new-token rows; record them with --set recorder.rows=new"
            )
        new_ids = [ids[i] for i in positions]
        lo, hi = from_step if from_step is not None else -1, to_step if to_step is not None else int(rec.steps[-1])
        steps = [int(s) for s in rec.steps if lo <= s <= hi]
        if not steps:
            raise WakelabError(f"recording {recording_path} has no step between --from-step and --to-step")
        hint = "give --from-step/--to-step or record with a larger recorder.every"
        keep, message = cap_frames(steps, MAX_FRAMES, hint)
        if message:
            warn(message)
        view = rec["embeddings"]
        first, last = view.at_step(steps[0])[positions].float(), view.at_step(steps[-1])[positions].float()
        rec.release()  # every read copies out of the shard maps: unmapped, their pages leave the resident set
        base_rows = state.rows.values(range(num_base), share=True)  # a view: no copy of the base rows
        builder = start_watch(base_rows, state.tokenizer, new_ids, first, steps[0], tokens=tokens,
                              max_tokens=max_tokens, seed=seed, movement=(last - first).norm(dim=1).tolist(),
                              warn=warn, constituents=constituents_for(state.config), projection=projection,
                              labels=labels)  # fmt: skip
        for index in keep[1:]:
            builder.add(steps[index], view.at_step(steps[index])[positions])
            rec.release()
        probe_before, probe_after = _probe_over_steps(state, rec, positions, new_ids, steps, sink, warn)
        try:
            corpus = resolve_data_paths(state.config)[1]
            corpus_ids = tokenize(read_text(corpus, "corpus", text_form(state.config)), state.tokenizer)
        except (WakelabError, OSError) as exc:
            warn(f"corpus frequencies left out of the token table: {exc}")
            corpus_ids = None
    finally:
        rec.close()
    out = finish_watch(builder, sink.local_dir / prefix, start_rows=first, end_rows=last, corpus_ids=corpus_ids,
                       probe_before=probe_before, probe_after=probe_after, max_frames=MAX_FRAMES)  # fmt: skip
    sink.files += [p for p in out.files if p not in sink.files]
    sink.metrics(out.metrics, steps[-1])
    if sink.client is not None and sink.run_id is not None:
        traj = builder.result()
        frames, _ = cap_frames(traj.steps, IMAGE_FRAMES)
        for index in frames:
            log_frame(sink.client, sink.run_id, frame_image(traj, index), traj.steps[index])
        log_table(sink.client, sink.run_id, out.table, f"analysis/{prefix}/tokens_table.json")
    return {"tracked": len(builder.tracked), "new_rows": len(new_ids), "frames": len(builder.steps),
            "folder": str(out.folder), **out.metrics}  # fmt: skip
