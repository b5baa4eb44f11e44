"""The sweep's ``comparison.html``: one page with the table, the plots and the children's trajectories side by side.

The table keeps its first column (the child) in place while it scrolls sideways; the plots are embedded (base64
PNG), so the page is one file that MLflow's artifact viewer shows offline. The trajectories come from each child's
``trajectory/trajectory.npz`` (the ``trajectory`` plugin writes it) and are drawn in one shared projection, the PCA
of the base rows, under one step slider: children on one base model (and one ``trajectory.seed``) fitted the same
basis, which the page checks through the projections' fingerprints. Children on different base models have no
common picture: the side-by-side part is refused in one line, and the table and plots stay.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..analysis.trajectory.frames import Trajectory, load_trajectory
from ..analysis.trajectory.page import PAGE_CSS, compare_fragment

__all__ = ["ChildTrajectory", "comparison_page", "side_by_side"]

TRAJECTORY_FILE = Path("trajectory") / "trajectory.npz"

_CSS = """
.scroll{overflow-x:auto;max-width:100%;border:1px solid #ddd}
.scroll table{border-collapse:separate;border-spacing:0}
.scroll th,.scroll td{border-bottom:1px solid #ddd;border-right:1px solid #eee;padding:4px 8px;text-align:right;
white-space:nowrap;background:#fff}
.scroll th{background:#f4f4f4}
.scroll td:first-child,.scroll th:first-child{position:sticky;left:0;z-index:1;text-align:left;background:#f9f9f9;
border-right:2px solid #ccc}
.plots{display:flex;flex-wrap:wrap;gap:10px}
.plots figure{margin:0}
.plots img{width:520px;border:1px solid #eee}
"""


@dataclass
class ChildTrajectory:
    """What the side-by-side part needs of one finished child."""

    label: str
    folder: Path  # the child's output folder
    base_model: str


def side_by_side(children: Sequence[ChildTrajectory], warn: Callable[[str], None]
                 ) -> tuple[list[tuple[str, Trajectory]], str | None]:  # fmt: skip
    """The children's trajectories in one shared projection, or ``([], why not)`` in one line."""
    models = {c.base_model for c in children}
    if len(models) > 1:
        named = "; ".join(f"{c.label}: {c.base_model}" for c in children)
        return [], (f"side-by-side trajectories refused: the children have different base models ({named}), so no "
                    "projection is shared; sweep one base model at a time to watch them together")  # fmt: skip
    runs, missing = [], []
    for child in children:
        path = child.folder / TRAJECTORY_FILE
        if not path.is_file():
            missing.append(child.label)
            continue
        try:
            runs.append((child.label, load_trajectory(path)))
        except (OSError, ValueError, KeyError) as exc:
            warn(f"{child.label}: its trajectory ({path}) could not be read and is left out: {exc}")
    if missing:
        warn(f"no trajectory for {', '.join(missing)}: run the sweep with --plugin trajectory (the demo preset has it)")
    runs = [(label, traj) for label, traj in runs if any(v.name == "base" for v in traj.views)]
    if not runs:
        return [], "no child has a trajectory to show side by side (run the sweep with --plugin trajectory)"
    prints = {traj.view("base").projection.fingerprint() for _, traj in runs}
    if len(prints) > 1:
        return [], ("side-by-side trajectories refused: the children's base projections differ (different base rows "
                    "or trajectory.seed), so their pictures would not share axes")  # fmt: skip
    return runs, None


def _plot_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem.replace("_", " "))
    return f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'


def comparison_page(title: str, table: str, notes: Sequence[str], plots: Sequence[Path],
                    runs: list[tuple[str, Trajectory]], refused: str | None) -> str:  # fmt: skip
    """The whole page: ``table`` is the ``<table>`` element; ``runs`` from :func:`side_by_side`."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>wakelab sweep</title>",
        f"<style>{PAGE_CSS}{_CSS}</style></head><body><h3>{html.escape(title)}</h3>",
        f"<div class='scroll' id='table'>{table}</div>",
        "".join(f"<p>{html.escape(n)}</p>" for n in notes),
        "<h4>Trajectories, side by side</h4>",
    ]
    if runs:
        parts.append(compare_fragment(runs))
    else:
        parts.append(f"<p class='note' id='refused'>{html.escape(refused or '')}</p>")
    shown = [p for p in plots if p.is_file()]
    if shown:
        parts.append("<h4>Plots</h4><div class='plots'>" + "".join(_plot_html(p) for p in shown) + "</div>")
    parts.append("</body></html>\n")
    return "".join(parts)
