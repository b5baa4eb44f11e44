"""Watching the new tokens: the glue the live ``trajectory`` plugin and ``wakelab analyze --recording`` share.

:func:`start_watch` picks the tokens to draw and fits the run's fixed projection; frames are added as steps come;
:func:`finish_watch` writes the HTML page, the GIF, the per-token table (CSV + JSON) and the probe scores into one
folder and returns what to log. :func:`probe_setup` finds the meaning probe's words and held-out contexts from a
run's config (``init.constituents``, ``data.heldout``). MLflow helpers log a frame as an image with a step (the UI's
image slider) and a table (the UI's table view).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import WakelabError
from ...storage.writepoint import published_dir
from .. import probe as probe_mod
from .frames import (
    MAX_FRAMES,
    TrajectoryBuilder,
    cap_frames,
    describe,
    read_words_file,
    save_trajectory,
    select_tokens,
    subset,
    token_text,
)
from .meaning import resolve_meanings
from .page import LABEL_MAX, write_html
from .projection import PROJECTIONS
from .stills import write_gif
from .table import COLUMNS, corpus_counts, token_rows

__all__ = ["WatchOutputs", "constituents_for", "finish_watch", "log_frame", "log_table", "probe_setup", "start_watch"]

Warn = Callable[[str], None]
FRAME_KEY = "trajectory"


def start_watch(
    base_rows: torch.Tensor,
    tokenizer,
    new_ids: Sequence[int],
    new_rows: torch.Tensor,
    step: int,
    *,
    tokens: str = "auto",
    max_tokens: int = 40,
    backdrop: int = 2000,
    neighbours: int = 5,
    seed: int = 0,
    movement: Sequence[float] | None = None,
    warn: Warn | None = None,
    title: str = "new tokens among the base tokens",
    constituents: tuple[str, dict[str, list[str]]] | None = None,
    projection: str = PROJECTIONS[0],
    labels: str = "auto",
) -> TrajectoryBuilder:
    """A builder with the projections fitted and its first frame (``new_rows`` at ``step``).

    ``constituents``: ``(where from, {word: [meaning word, part, ...]})`` (:func:`constituents_for`): the tracked
    words' meaning words are drawn and their distances charted. ``projection``: the page's default projection (both
    are fitted). ``labels``: ``auto`` (words with a meaning word, then top movers) or a words file labelled first.
    """
    if len(new_ids) == 0:
        raise WakelabError("this run adds no new tokens: there is nothing to watch (give vocab.lexicon a word list)")
    words = [token_text(tokenizer, i) for i in new_ids]
    tracked = select_tokens(tokens, words, max_tokens=max_tokens, seed=seed, movement=movement, warn=warn)
    tracked_words = [words[i] for i in tracked]
    chosen: list[int] = []
    if str(labels).strip() != "auto":
        wanted = read_words_file(labels)
        where = {w: i for i, w in enumerate(tracked_words)}
        chosen = [where[w] for w in wanted if w in where]
        if not chosen and warn is not None:
            warn(f"labels file {labels}: none of its {len(wanted)} words is a tracked new token; labelling the words "
                 "with a meaning word and the top movers instead")  # fmt: skip
    meanings = None
    if constituents is not None:
        source, table = constituents
        meanings = resolve_meanings(table, tokenizer, [new_ids[i] for i in tracked], base_rows,
                                    num_base=int(base_rows.shape[0]), source=source, warn=warn)  # fmt: skip
    order = [projection, *(p for p in PROJECTIONS if p != projection)]
    builder = TrajectoryBuilder(
        base_rows,
        lambda i: token_text(tokenizer, i),
        tracked=tracked,
        tracked_words=tracked_words,
        backdrop=backdrop,
        neighbours=neighbours,
        seed=seed,
        title=title,
        meanings=meanings,
        projections=order,
        labels=chosen,
    )
    builder.all_words = words
    builder.new_ids = [int(i) for i in new_ids]
    builder.add(step, new_rows)
    return builder


@dataclass
class WatchOutputs:
    """What :func:`finish_watch` wrote and what to log."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def finish_watch(
    builder: TrajectoryBuilder,
    folder: str | Path,
    *,
    start_rows: torch.Tensor,
    end_rows: torch.Tensor,
    corpus_ids=None,
    probe_before: dict | None = None,
    probe_after: dict | None = None,
    freeze_threshold: float = 1e-6,
    html: bool = True,
    gif: bool = True,
    max_frames: int = MAX_FRAMES,
    fewer_frames_hint: str = "",
    label_max: int = LABEL_MAX,
    table_neighbours: bool = True,
) -> WatchOutputs:
    """Write ``trajectory.html``, ``trajectory.gif``, ``tokens.csv``/``tokens.json``, ``trajectory.json`` and
    ``probe.json`` (when probed) into ``folder``, and ``trajectory.npz`` (what a sweep's side-by-side page reads).
    ``table_neighbours=False`` leaves the table's nearest base tokens empty (the search is the one part whose time
    grows with new x base)."""
    final = Path(folder)
    out = WatchOutputs(final)
    # Written in a private folder and renamed whole: a full disk half-way leaves the folder before, never half of it.
    with published_dir(final) as folder:
        traj = builder.result()
        keep, message = cap_frames(traj.steps, max_frames, fewer_frames_hint)
        if message:
            out.messages.append(message)
            traj = subset(traj, keep)
        out.messages += traj.notes
        if html:
            out.files.append(write_html(traj, folder / "trajectory.html", label_max=label_max))
        if gif:
            out.files.append(write_gif(traj, folder / "trajectory.gif"))
        described = describe(traj)
        (folder / "trajectory.json").write_text(json.dumps(described, indent=1) + "\n", encoding="utf-8")
        out.files.append(folder / "trajectory.json")
        out.files.append(save_trajectory(traj, folder / "trajectory.npz"))
        if "meaning" in described:
            m = described["meaning"]
            out.messages.append(f"of {m['words']} words with a meaning word, {m['closer']} moved closer to it and "
                                f"{m['away']} moved away (cosine distance, first to last frame)")  # fmt: skip
            out.metrics["trajectory_meaning_closer"] = float(m["closer"])
            out.metrics["trajectory_meaning_away"] = float(m["away"])

        ids = builder.new_ids
        out.table = token_rows(
            builder.all_words,
            ids,
            start_rows,
            end_rows,
            nearest=builder.nearest if table_neighbours else (lambda rows: [[] for _ in range(len(rows))]),
            frequency=corpus_counts(corpus_ids, ids),
            probe_scores=probe_mod.by_word(probe_before, probe_after) if probe_after else None,
            freeze_threshold=freeze_threshold,
        )
        _write_table(out.table, folder / "tokens")
        out.files += [folder / "tokens.csv", folder / "tokens.json"]
        if probe_after:
            (folder / "probe.json").write_text(
                json.dumps({"before": probe_before, "after": probe_after}, indent=1) + "\n", encoding="utf-8"
            )
            out.files.append(folder / "probe.json")
            out.metrics.update(probe_mod.summarise(probe_before, probe_after))
    out.files = [final / path.relative_to(folder) for path in out.files]
    frozen = sum(1 for row in out.table if row["frozen"])
    out.metrics["trajectory_frozen_share"] = frozen / max(len(out.table), 1)
    out.metrics["trajectory_mean_displacement"] = float(np.mean([row["displacement"] for row in out.table]))
    return out


def _write_table(rows: list[dict[str, Any]], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    with stem.with_suffix(".csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})


# ----------------------------------------------------------------------------------------------------------------------
# The meaning probe's inputs, from a run's config


def constituents_for(config) -> tuple[str, dict[str, list[str]]] | None:
    """The run's constituents file and its table, or None when it has none.

    ``init.constituents``: a file, ``demo`` (the demo's), or unset (the demo's when the lexicon is the demo's).
    """
    from ...data.demo_texts import read_constituents

    name = config.init.constituents
    if name is None and config.vocab.lexicon == "demo":
        name = "demo"
    if name is None:
        return None
    if name == "demo":
        from ...data.demo import ensure_demo_texts

        path = ensure_demo_texts().constituents
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise WakelabError(f"init.constituents: no file at {path}; give a constituents file, `demo` or null")
    return str(path), read_constituents(path)


def probe_setup(
    config, tokenizer, num_base: int, *, contexts: int = 4, max_words: int = 64, seed: int = 0, warn: Warn | None = None
) -> probe_mod.Probe | None:
    """The probe for this run, or None when it has no constituents file or no held-out text (said through ``warn``).

    The constituents file is ``init.constituents`` (``demo``: the demo's; unset with the demo lexicon: the demo's).
    """
    from ...data.corpus import resolve_data_paths

    found = constituents_for(config)
    if found is None:
        return None
    path, table = found
    _, _, heldout = resolve_data_paths(config)
    if heldout is None:
        if warn:
            warn("meaning probe skipped: it needs held-out text (data.heldout)")
        return None
    text = Path(heldout).read_text(encoding="utf-8", errors="replace")
    built = probe_mod.build_probe(tokenizer, table, text, num_base=num_base, contexts=contexts,
                                  max_words=max_words, seed=seed)  # fmt: skip
    for line in built.report():
        if warn:
            warn(f"{line} ({path})")
    if not built.words:
        if warn:
            warn(f"meaning probe skipped: no word of {path} has a meaning word in the held-out text {heldout}")
        return None
    return built


# ----------------------------------------------------------------------------------------------------------------------
# MLflow


def log_frame(client, run_id: str, image: np.ndarray, step: int) -> None:
    """One frame under the image key ``trajectory``: the run's image view gets a step slider."""
    client.log_image(run_id, image, key=FRAME_KEY, step=int(step))


def log_table(client, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """The per-token table as an MLflow table (shown in the UI's artifact view and Evaluation tab)."""
    columns = {k: [row.get(k) for row in rows] for k in COLUMNS}
    client.log_table(run_id, data=columns, artifact_file=artifact_file)
