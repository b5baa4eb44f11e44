"""Trajectories: the new tokens moving among the base tokens, in 2-D pictures whose axes never change during a run.

Each projection (:mod:`.projection`: PCA of all base rows, or of the base rows around the new tokens and their
meaning words) is fitted once and then applied unchanged to every frame. Base rows do not train, so they stay put,
and a new row that does not move stays put too: motion on screen is motion in the model, not a re-fitted basis
turning under the points. Tracked tokens get a trail, their nearest base tokens (cosine, among all base rows) and,
when the constituents are known, their cosine distance to their meaning word (:mod:`.meaning`) at each frame; the
other new tokens are drawn as a density, so 44,195 new tokens cost the picture no more than 40.

This module collects the frames (:class:`TrajectoryBuilder` -> :class:`Trajectory`); the pictures are drawn by
:mod:`.page` (the self-contained HTML page) and :mod:`.stills` (GIF and image frames). The
live plugin (``wakelab.plugins.trajectory``) and ``wakelab analyze --recording`` both build one through
:mod:`.watch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import WakelabError
from ..embeddings import top_k_cosine
from .meaning import Meanings, closer_and_away
from .projection import PROJECTIONS, Projection, fit_focus_projection, fit_projection

__all__ = [
    "MAX_FRAMES",
    "Projection",
    "Trajectory",
    "TrajectoryBuilder",
    "View",
    "cap_frames",
    "describe",
    "fit_projection",
    "label_order",
    "load_trajectory",
    "read_words_file",
    "save_trajectory",
    "select_tokens",
    "subset",
    "token_text",
]

#: More frames than this make the page slow to load and the slider useless; callers subsample to it and say how
#: to plot fewer.
MAX_FRAMES = 400
DENSITY_BINS = 40


def token_text(tokenizer, token_id: int) -> str:
    """The token as a reader would write it (decoded, stripped), or the raw token when it does not decode alone."""
    if tokenizer is None:
        return str(int(token_id))
    try:
        text = tokenizer.decode([int(token_id)]).strip()
    except Exception:  # noqa: BLE001 - a token that does not decode alone: show the raw token
        text = "\ufffd"
    if not text or "\ufffd" in text:
        text = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    return text


# ----------------------------------------------------------------------------------------------------------------------
# Which tokens to draw, which frames to keep


def read_words_file(path: str | Path) -> list[str]:
    """Words, one a line (or separated by spaces); ``#`` starts a comment."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WakelabError(f"cannot read the words file {path}: {exc}") from None
    words: list[str] = []
    for line in text.splitlines():
        words += line.split("#", 1)[0].split()
    return list(dict.fromkeys(words))


def select_tokens(
    spec: str,
    words: Sequence[str],
    *,
    max_tokens: int,
    seed: int = 0,
    movement: Sequence[float] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[int]:
    """Positions (into ``words``) of the tokens to draw with labels and trails.

    ``spec``: ``auto`` (all when at most ``max_tokens``, else the top movers when ``movement`` is known, else a
    seeded sample), ``all``, ``sample:K``, ``top:K`` (largest ``movement``), or a path to a words file (words not
    in ``words`` are reported through ``warn`` and the rest are used).
    """
    count = len(words)
    text = str(spec).strip()
    if text in ("auto", "all"):
        if text == "all" or count <= max_tokens:
            return list(range(count))
        text = f"top:{max_tokens}" if movement is not None else f"sample:{max_tokens}"
    for kind in ("sample", "top"):
        if text.startswith(f"{kind}:"):
            k = text.split(":", 1)[1]
            if not k.isdigit() or int(k) < 1:
                raise WakelabError(f"trajectory tokens '{text}': K must be a whole number >= 1 ({kind}:20)")
            k = min(int(k), count)
            if kind == "top":
                if movement is None:
                    raise WakelabError(
                        f"trajectory tokens '{text}': the top movers are known only once training is over; use "
                        "sample:K or a words file live, or top:K with `wakelab analyze --recording`"
                    )
                order = np.argsort(-np.asarray(movement, dtype=np.float64), kind="stable")
                return sorted(int(i) for i in order[:k])
            generator = torch.Generator().manual_seed(int(seed))
            return sorted(torch.randperm(count, generator=generator)[:k].tolist())
    path = Path(text).expanduser()
    if not path.is_file():
        raise WakelabError(f"trajectory tokens '{text}' is not auto, all, sample:K, top:K or an existing words file")
    wanted = read_words_file(path)
    where = {w: i for i, w in enumerate(words)}
    missing = [w for w in wanted if w not in where]
    picked = [where[w] for w in wanted if w in where]
    if not picked:
        raise WakelabError(
            f"words file {path}: none of its {len(wanted)} words is a new token of this run; list words of the lexicon"
        )
    if missing and warn is not None:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        warn(f"words file {path}: {len(missing)} of {len(wanted)} words are not new tokens of this run and are left "
             f"out: {shown}")  # fmt: skip
    return picked


def cap_frames(steps: Sequence[int], max_frames: int = MAX_FRAMES, how: str = "") -> tuple[list[int], str | None]:
    """Positions of at most ``max_frames`` evenly spread steps (first and last kept), and a message when capped."""
    count = len(steps)
    if count <= max_frames:
        return list(range(count)), None
    keep = sorted({int(round(i)) for i in np.linspace(0, count - 1, max_frames)})
    message = (f"{count} steps are more frames than a browser page can take; plotting {len(keep)} evenly spread "
               f"ones. To plot fewer, {how or 'record or capture fewer steps'}")  # fmt: skip
    return keep, message


# ----------------------------------------------------------------------------------------------------------------------
# Building a trajectory frame by frame


@dataclass
class View:
    """The trajectory in one fixed projection: positions per frame, the backdrop, meaning points and density."""

    projection: Projection
    xy: np.ndarray  # [frames, tracked, 2]
    base_xy: np.ndarray  # [sampled base rows, 2]
    meaning_xy: np.ndarray  # [tracked, 2]; NaN where a word has no meaning word
    density: list[np.ndarray] = field(default_factory=list)  # per frame [bins, bins] counts of the untracked new rows
    extent: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)  # x0, x1, y0, y1 (fixed on the first frame)

    @property
    def name(self) -> str:
        return self.projection.name

    @property
    def explained(self) -> tuple[float, float]:
        return self.projection.explained

    def frames(self, keep: Sequence[int]) -> View:
        keep = list(keep)
        return View(self.projection, self.xy[keep], self.base_xy, self.meaning_xy,
                    [self.density[i] for i in keep] if self.density else [], self.extent)  # fmt: skip


@dataclass
class Trajectory:
    """Everything a picture needs: per frame the tracked tokens' positions (in each projection), their neighbours and
    their distance to their meaning word, and the backdrop. ``views[0]`` is the default projection."""

    steps: list[int]
    words: list[str]  # tracked tokens
    token_ids: list[int]
    views: list[View]
    neighbours: list[list[list[str]]]  # [frames][tracked][k] nearest base tokens
    base_words: list[str]
    title: str = "new tokens among the base tokens"
    untracked: int = 0
    meaning_words: list[str] = field(default_factory=list)  # per tracked word ('' when none)
    distance: np.ndarray | None = None  # [frames, tracked] cosine distance to the meaning word (NaN: none)
    movement: list[float] = field(default_factory=list)  # per tracked word: L2 distance moved, first to last frame
    label_order: list[int] = field(default_factory=list)  # tracked positions, most worth a label first
    notes: list[str] = field(default_factory=list)  # lines the page shows (e.g. words left out)

    def __len__(self) -> int:
        return len(self.steps)

    def view(self, name: str) -> View:
        for view in self.views:
            if view.name == name:
                return view
        raise KeyError(name)

    # The default view's fields, as the single-projection code reads them.
    xy = property(lambda self: self.views[0].xy)
    base_xy = property(lambda self: self.views[0].base_xy)
    density = property(lambda self: self.views[0].density)
    extent = property(lambda self: self.views[0].extent)
    explained = property(lambda self: self.views[0].explained)


def label_order(movement: Sequence[float], meaning_words: Sequence[str], chosen: Sequence[int] = ()) -> list[int]:
    """Which tracked words deserve a label first: a chosen list (in its order), then the words with a meaning word
    (the probed ones), then the rest, each group largest movers first. The page labels as many as fit unoverlapped."""
    order = list(dict.fromkeys(int(i) for i in chosen))
    taken = set(order)
    by_motion = sorted(range(len(movement)), key=lambda i: (-float(movement[i]), i))
    order += [i for i in by_motion if i not in taken and meaning_words and meaning_words[i]]
    taken = set(order)
    return order + [i for i in by_motion if i not in taken]


class TrajectoryBuilder:
    """Collects frames: give it the base rows once, then each step's rows of the new tokens.

    ``projections``: which fixed projections to fit (:data:`~.projection.PROJECTIONS`), the first the default; the
    focus projection is fitted on the first frame (it needs the tracked rows at the start) and is left out, with a
    note, when it cannot be fitted. ``meanings``: the tracked words' meaning words (:mod:`.meaning`), or None.
    ``labels``: tracked positions to label first (a chosen list).
    """

    def __init__(
        self,
        base_rows: torch.Tensor,
        base_words: Sequence[str] | Callable[[int], str],
        *,
        tracked: Sequence[int],
        tracked_words: Sequence[str],
        backdrop: int = 2000,
        neighbours: int = 5,
        seed: int = 0,
        title: str = "new tokens among the base tokens",
        meanings: Meanings | None = None,
        projections: Sequence[str] = ("base",),
        labels: Sequence[int] = (),
    ):
        unknown = [p for p in projections if p not in PROJECTIONS]
        if unknown or not projections:
            raise WakelabError(f"trajectory projections {list(projections)}: choose from {', '.join(PROJECTIONS)}")
        # Kept as given (a view of the model's weights costs nothing): the projection samples it, and the nearest
        # base tokens are found a chunk at a time (top_k_cosine), so no copy of all base rows is ever made.
        base = base_rows.detach()
        self.projection = fit_projection(base, seed=seed)
        self._base = base
        self._wanted = list(dict.fromkeys(projections))
        self.seed = int(seed)
        generator = torch.Generator().manual_seed(int(seed) + 1)
        self._sample = torch.randperm(base.shape[0], generator=generator)[: min(backdrop, base.shape[0])].sort().values
        self._sample = self._sample.to(base.device)
        self._word = base_words if callable(base_words) else (lambda i, w=base_words: w[i])
        self.base_xy = self.projection(base[self._sample])
        self.base_words = [self._word(int(i)) for i in self._sample]
        self.k = int(neighbours)
        self.tracked = list(tracked)
        self.tracked_words = list(tracked_words)
        self.title = title
        self.meanings = meanings
        self.labels = list(labels)
        self.steps: list[int] = []
        self.neighbours: list[list[list[str]]] = []
        self.distance: list[np.ndarray] = []
        self.untracked = 0
        self.views: list[View] = []
        self.notes: list[str] = []
        self._first: torch.Tensor | None = None
        self._last: torch.Tensor | None = None
        self.all_words: list[str] = list(tracked_words)  # every new token's text (the per-token table's rows)
        self.new_ids: list[int] = list(tracked)

    @property
    def extent(self) -> tuple[float, float, float, float] | None:
        return self.views[0].extent if self.views else None

    def nearest(self, rows: torch.Tensor) -> list[list[str]]:
        """The ``k`` nearest base tokens (cosine) of each row: a chunked top-k, memory O(chunk x d) per call."""
        if self.k <= 0 or rows.shape[0] == 0:
            return [[] for _ in range(rows.shape[0])]
        _, top = top_k_cosine(rows.detach(), self._base, self.k)
        return [[self._word(i) for i in row] for row in top.tolist()]

    def _fit_views(self, tracked_rows: torch.Tensor, xy_all_of: Callable[[Projection], np.ndarray]) -> None:
        """Fit the chosen projections once (on the first frame) and fix each view's extent."""
        meaning_ids = sorted({i for ids in (self.meanings.base_ids if self.meanings else []) for i in ids})
        for name in self._wanted:
            if name == "base":
                projection = self.projection
            else:
                projection = fit_focus_projection(self._base, tracked_rows, meaning_ids=meaning_ids, seed=self.seed)
                if projection is None:
                    self.notes.append("the focus projection needs at least 3 base rows near the new tokens; left out")
                    continue
            base_xy = self.base_xy if projection is self.projection else projection(self._base[self._sample])
            meaning_xy = np.full((len(self.tracked), 2), np.nan, np.float32)
            if self.meanings is not None and self.meanings.known.any():
                known = self.meanings.known
                meaning_xy[known] = projection(self.meanings.rows[torch.from_numpy(known)])
            xy_all = xy_all_of(projection)
            points = np.concatenate([base_xy, xy_all, meaning_xy[~np.isnan(meaning_xy[:, 0])]])
            lo, hi = np.percentile(points, 0.5, axis=0), np.percentile(points, 99.5, axis=0)
            pad = (hi - lo) * 0.25 + 1e-6
            extent = (float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1]))
            self.views.append(View(projection, np.zeros((0, len(self.tracked), 2), np.float32), base_xy, meaning_xy,
                                   [], extent))  # fmt: skip
        if not self.views:  # only when focus alone was asked for and could not be fitted
            self._wanted = ["base"]
            self._fit_views(tracked_rows, xy_all_of)

    def add(self, step: int, new_rows: torch.Tensor) -> np.ndarray:
        """One frame from the rows of ALL new tokens at ``step`` (the untracked ones make the density)."""
        new_rows = new_rows.detach().float().cpu()
        tracked_rows = new_rows[self.tracked]
        if not self.views:
            self._fit_views(tracked_rows, lambda p: p(new_rows))
            self._first = tracked_rows.clone()
        self._last = tracked_rows.clone()
        rest = np.ones(new_rows.shape[0], dtype=bool)
        rest[self.tracked] = False
        self.untracked = int(rest.sum())
        for view in self.views:
            xy_all = view.projection(new_rows)
            view.xy = np.concatenate([view.xy, xy_all[self.tracked][None]])
            if self.untracked:
                x0, x1, y0, y1 = view.extent
                grid, _, _ = np.histogram2d(xy_all[rest, 0], xy_all[rest, 1], bins=DENSITY_BINS,
                                            range=[[x0, x1], [y0, y1]])  # fmt: skip
                view.density.append(grid.astype(np.int32))
        self.steps.append(int(step))
        self.neighbours.append(self.nearest(tracked_rows))
        if self.meanings is not None:
            self.distance.append(self.meanings.distance(tracked_rows))
        return self.views[0].xy[-1]

    def result(self) -> Trajectory:
        movement = ((self._last - self._first).norm(dim=1).tolist() if self._first is not None
                    else [0.0] * len(self.tracked))  # fmt: skip
        meaning_words = list(self.meanings.words) if self.meanings is not None else []
        notes = list(self.notes) + (list(self.meanings.messages) if self.meanings is not None else [])
        return Trajectory(
            steps=list(self.steps),
            words=self.tracked_words,
            token_ids=list(self.tracked),
            views=[View(v.projection, v.xy, v.base_xy, v.meaning_xy, list(v.density), v.extent) for v in self.views],
            neighbours=self.neighbours,
            base_words=self.base_words,
            title=self.title,
            untracked=self.untracked,
            meaning_words=meaning_words,
            distance=np.stack(self.distance) if self.distance else None,
            movement=movement,
            label_order=label_order(movement, meaning_words, self.labels),
            notes=notes,
        )


def subset(traj: Trajectory, frames: Sequence[int]) -> Trajectory:
    """The same trajectory on chosen frames only (for a frame cap)."""
    frames = list(frames)
    return replace(
        traj,
        steps=[traj.steps[i] for i in frames],
        views=[v.frames(frames) for v in traj.views],
        neighbours=[traj.neighbours[i] for i in frames],
        distance=traj.distance[frames] if traj.distance is not None else None,
    )


def describe(traj: Trajectory) -> dict[str, Any]:
    """A short JSON description: what was drawn and how the picture's axes were made."""
    out: dict[str, Any] = {
        "frames": len(traj),
        "steps": [traj.steps[0], traj.steps[-1]] if len(traj) else [],
        "tracked": len(traj.words),
        "untracked_as_density": traj.untracked,
        "backdrop_base_rows": int(len(traj.base_xy)),
        "projection": f"{traj.views[0].name}: PCA of {traj.views[0].projection.fitted_on}, fitted once",
        "explained_variance": list(traj.explained),
        "projections": {
            v.name: {
                "fitted_on": v.projection.fitted_on,
                "explained_variance": list(v.explained),
                "fingerprint": v.projection.fingerprint(),
            }
            for v in traj.views
        },  # fmt: skip
        "extent": list(traj.extent),
        "finite": bool(np.isfinite(traj.xy).all()) if traj.xy.size else True,
        "max_move": float(np.abs(traj.xy - traj.xy[:1]).max()) if traj.xy.size else math.nan,
    }
    if traj.distance is not None and len(traj):
        closer, away, same = closer_and_away(traj.distance[0], traj.distance[-1])
        out["meaning"] = {"words": int(np.sum([bool(w) for w in traj.meaning_words])), "closer": closer,
                          "away": away, "unchanged": same}  # fmt: skip
    return out


def save_trajectory(traj: Trajectory, path: str | Path) -> Path:
    """The trajectory as one ``.npz`` (arrays) with its words and neighbours as JSON inside: what a sweep reads back
    to draw its children side by side."""
    import json

    arrays: dict[str, np.ndarray] = {}
    for i, view in enumerate(traj.views):
        p = view.projection
        density = np.stack(view.density) if view.density else np.zeros((0, 0, 0), np.int32)
        arrays |= {f"v{i}_xy": view.xy, f"v{i}_base": view.base_xy, f"v{i}_meaning": view.meaning_xy,
                   f"v{i}_mean": p.mean, f"v{i}_axes": p.axes, f"v{i}_extent": np.asarray(view.extent),
                   f"v{i}_density": density}  # fmt: skip
    if traj.distance is not None:
        arrays["distance"] = traj.distance
    meta = {"steps": traj.steps, "words": traj.words, "token_ids": traj.token_ids, "neighbours": traj.neighbours,
            "base_words": traj.base_words, "title": traj.title, "untracked": traj.untracked,
            "meaning_words": traj.meaning_words, "movement": traj.movement, "label_order": traj.label_order,
            "notes": traj.notes, "views": [{"name": v.name, "fitted_on": v.projection.fitted_on,
                                            "explained": list(v.explained)} for v in traj.views]}  # fmt: skip
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    path = Path(path)
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def load_trajectory(path: str | Path) -> Trajectory:
    """What :func:`save_trajectory` wrote."""
    import json

    with np.load(Path(path)) as data:
        meta = json.loads(data["meta"].tobytes().decode("utf-8"))
        views = []
        for i, v in enumerate(meta["views"]):
            projection = Projection(data[f"v{i}_mean"], data[f"v{i}_axes"], tuple(v["explained"]), v["name"],
                                    v["fitted_on"])  # fmt: skip
            density = list(data[f"v{i}_density"]) if data[f"v{i}_density"].size else []
            extent = tuple(float(e) for e in data[f"v{i}_extent"])
            views.append(View(projection, data[f"v{i}_xy"], data[f"v{i}_base"], data[f"v{i}_meaning"], density,
                              extent))  # fmt: skip
        distance = data["distance"] if "distance" in data.files else None
    return Trajectory(meta["steps"], meta["words"], meta["token_ids"], views, meta["neighbours"], meta["base_words"],
                      meta["title"], meta["untracked"], meta["meaning_words"], distance, meta["movement"],
                      meta["label_order"], meta["notes"])  # fmt: skip
