"""A trajectory as still pictures: one frame as an RGB array (MLflow's image step slider) and an animated GIF.

The same reading as the page, without the interaction: the default projection, fading trails, an arrow from each
tracked word's first position to its current one, its meaning word as a marked base point with a thin line to it,
labels only where they do not overlap (the most worth labelling first, at most :data:`FRAME_LABELS`), and, when the
constituents are known, a small chart of each word's cosine distance to its meaning word up to this step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import WakelabError
from .frames import Trajectory, cap_frames
from .meaning import closer_and_away

__all__ = ["FRAME_LABELS", "GIF_MAX_FRAMES", "frame_image", "write_gif"]

GIF_MAX_FRAMES = 80
FRAME_LABELS = 12
WORD, MEANING, TRAIL_FRAMES = "#d95f02", "#1b9e77", 30


def _place_labels(ax, fig, items) -> None:
    """Annotate ``(x, y, text, colour)`` in order, dropping any label whose box would overlap one already placed."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for x, y, text, colour in items:
        for dx, dy, ha, va in ((4, 3, "left", "bottom"), (-4, 3, "right", "bottom"), (4, -3, "left", "top"),
                               (-4, -3, "right", "top")):  # fmt: skip
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, color=colour,
                               ha=ha, va=va, annotation_clip=True)  # fmt: skip
            box = note.get_window_extent(renderer)
            inside = ax.get_window_extent(renderer).contains(box.x0, box.y0) and ax.get_window_extent(
                renderer
            ).contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            note.remove()


def _figure(traj: Trajectory, index: int, size: float = 6.0, dpi: int = 80):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    chart = traj.distance is not None and bool(np.any(~np.isnan(traj.distance[0])))
    fig = Figure(figsize=(size, size * (1.3 if chart else 1.0)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    if chart:
        ax, bottom = fig.subplots(2, 1, height_ratios=[4, 1.2])
    else:
        ax, bottom = fig.add_subplot(1, 1, 1), None
    view = traj.views[0]
    x0, x1, y0, y1 = view.extent
    if view.density:
        grid = view.density[index]
        if grid.any():
            ax.imshow(np.ma.masked_equal(grid.T, 0), origin="lower", extent=(x0, x1, y0, y1), cmap="Blues", alpha=0.6,
                      aspect="auto", interpolation="nearest")  # fmt: skip
    ax.scatter(view.base_xy[:, 0], view.base_xy[:, 1], s=2, c="#c8c8c8", linewidths=0)
    now = view.xy[index]
    meant = ~np.isnan(view.meaning_xy[:, 0])
    if meant.any():
        lines = np.stack([now[meant], view.meaning_xy[meant]], 1)
        ax.add_collection(LineCollection(lines, colors=MEANING, linewidths=0.6, alpha=0.45, linestyles="dotted"))
        ax.scatter(view.meaning_xy[meant, 0], view.meaning_xy[meant, 1], s=22, marker="D", facecolors="white",
                   edgecolors=MEANING, linewidths=1.0)  # fmt: skip
    first = max(0, index - TRAIL_FRAMES)
    if index > first:  # fading trail: the older a segment, the fainter
        segments = np.stack([view.xy[first:index], view.xy[first + 1 : index + 1]], 2)  # [k, tracked, 2, 2]
        age = np.linspace(0.1, 0.7, index - first)[:, None].repeat(now.shape[0], 1)
        colours = np.zeros((*age.shape, 4))
        colours[..., :3] = (0.85, 0.37, 0.01)
        colours[..., 3] = age
        ax.add_collection(LineCollection(segments.reshape(-1, 2, 2), colors=colours.reshape(-1, 4), linewidths=1.0))
    start = view.xy[0]
    for (sx, sy), (nx, ny) in zip(start, now, strict=True):
        if (nx - sx) ** 2 + (ny - sy) ** 2 > ((x1 - x0) * 0.01) ** 2:
            ax.annotate("", (nx, ny), (sx, sy), arrowprops={"arrowstyle": "->", "color": WORD, "lw": 0.7,
                                                           "alpha": 0.6, "shrinkA": 0, "shrinkB": 3})  # fmt: skip
    ax.scatter(now[:, 0], now[:, 1], s=14, c=WORD, linewidths=0, zorder=3)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    fig.canvas.draw()
    items = [(now[t, 0], now[t, 1], traj.words[t], "#333333") for t in traj.label_order[:FRAME_LABELS]]
    items += [(view.meaning_xy[t, 0], view.meaning_xy[t, 1], traj.meaning_words[t], MEANING)
              for t in traj.label_order[:FRAME_LABELS] if meant[t]]  # fmt: skip
    _place_labels(ax, fig, items)
    ax.set_xlabel(f"{view.name} PCA, axis 1: {view.explained[0]:.1%} of the variance of the rows it was fitted on",
                  fontsize=8)  # fmt: skip
    ax.set_ylabel(f"axis 2: {view.explained[1]:.1%}", fontsize=8)
    more = f"; {traj.untracked} more as density" if traj.untracked else ""
    ax.set_title(f"{traj.title}: step {traj.steps[index]}{more}", fontsize=9)
    if bottom is not None:
        distance = traj.distance[: index + 1]
        for t in np.flatnonzero(~np.isnan(traj.distance[0])):
            closer = distance[-1, t] < distance[0, t]
            bottom.plot(traj.steps[: index + 1], distance[:, t], color=MEANING if closer else "#b2182b", lw=0.7,
                        alpha=0.6)  # fmt: skip
        bottom.set_xlim(traj.steps[0], max(traj.steps[-1], traj.steps[0] + 1))
        finite = traj.distance[~np.isnan(traj.distance)]
        bottom.set_ylim(float(finite.min()) - 0.02, float(finite.max()) + 0.02)
        near, away, _ = closer_and_away(traj.distance[0], traj.distance[index])
        bottom.set_title(f"cosine distance to the meaning word: {near} closer, {away} farther", fontsize=8)
        bottom.tick_params(labelsize=7)
    return fig


def frame_image(traj: Trajectory, index: int, size: float = 6.0, dpi: int = 80) -> np.ndarray:
    """Frame ``index`` as an RGB ``uint8`` array (for ``mlflow.log_image``)."""
    fig = _figure(traj, index, size, dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def write_gif(traj: Trajectory, path: str | Path, *, max_frames: int = GIF_MAX_FRAMES, ms_per_frame: int = 150) -> Path:
    """An animated GIF of the trajectory (at most ``max_frames`` evenly spread frames, the last held longer)."""
    from PIL import Image

    if len(traj) == 0:
        raise WakelabError("a trajectory with no frames cannot be drawn")
    frames, _ = cap_frames(traj.steps, max_frames)
    images = [Image.fromarray(frame_image(traj, i, size=5.0, dpi=80)).convert("P", palette=Image.ADAPTIVE)
              for i in frames]  # fmt: skip
    durations = [ms_per_frame] * (len(images) - 1) + [ms_per_frame * 8]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False)
    return path
