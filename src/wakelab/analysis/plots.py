"""Figures for the analyses, drawn off-screen.

Every helper builds a :class:`matplotlib.figure.Figure` on an Agg canvas directly instead of going through
``pyplot``: nothing is ever shown, no GUI backend is touched, and figures are not kept alive by pyplot's global
registry. Each figure has a title, axis labels with units and, when it has more than one series, a legend.
Write it with :func:`save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "centroid_plot",
    "curves",
    "freeze_onset_plot",
    "lattice_hops_plot",
    "loss_curve",
    "new_figure",
    "norm_histogram",
    "save_figure",
]

DPI = 120
STEP_LABEL = "optimizer step"
LOSS_LABEL = "cross-entropy loss (nats/token)"


def new_figure(ncols: int = 1, width: float = 7.0, height: float = 4.5) -> tuple[Figure, list[Axes]]:
    """A figure with ``ncols`` side-by-side axes on an Agg canvas (never displayed)."""
    fig = Figure(figsize=(width * ncols if ncols > 1 else width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at 120 dpi (creating parent folders) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    if getattr(fig.canvas, "manager", None) is not None:  # a pyplot figure passed in: release it from pyplot
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def _as_array(values) -> np.ndarray:
    """A float array from a list, numpy array or tensor; ``None`` entries become NaN (gaps in the line)."""
    if values is None:
        return np.empty(0)
    if hasattr(values, "detach"):
        return values.detach().float().cpu().numpy().reshape(-1)
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _column(records: Sequence[Mapping], key: str) -> np.ndarray:
    return _as_array([record.get(key) for record in records])


def _legend_if_several(ax: Axes, *more: Axes) -> None:
    """Add one legend for the labelled lines of ``ax`` (and twin axes) when there are two or more."""
    handles, labels = [], []
    for axis in (ax, *more):
        h, lab = axis.get_legend_handles_labels()
        handles += h
        labels += lab
    if len(handles) > 1:
        ax.legend(handles, labels, loc="best")


# --------------------------------------------------------------------------------------------------------------
# Embedding matrix
# --------------------------------------------------------------------------------------------------------------


def norm_histogram(norms_base, norms_new, bins: int = 60) -> Figure:
    """Histogram of row L2 norms, base vocabulary vs new tokens, on shared bins.

    Each histogram is normalised to its own row count (y = share of rows per bin): there are usually a few
    hundred new tokens against a hundred thousand base tokens, so raw counts would hide the new ones.
    """
    base, new = _as_array(norms_base), _as_array(norms_new)
    fig, (ax,) = new_figure()
    both = np.concatenate([base, new])
    edges = np.histogram_bin_edges(both, bins=bins) if both.size else bins
    for values, label, colour in ((base, "base tokens", "tab:blue"), (new, "new tokens", "tab:orange")):
        if values.size:
            weights = np.full(values.shape, 1.0 / values.size)
            ax.hist(values, bins=edges, weights=weights, alpha=0.6, label=f"{label} (n={values.size})", color=colour)
    ax.set_title("Embedding row norms")
    ax.set_xlabel("row L2 norm (embedding units)")
    ax.set_ylabel("share of rows per bin")
    _legend_if_several(ax)
    return fig


# --------------------------------------------------------------------------------------------------------------
# Loss curves
# --------------------------------------------------------------------------------------------------------------


def loss_curve(steps, losses, label: str | None = None, ax: Axes | None = None) -> Figure:
    """Training loss against step. Pass ``ax`` (from an earlier call's ``fig.axes[0]``) to add another run.

    A legend appears once the axes hold two or more labelled runs.
    """
    if ax is None:
        fig, (ax,) = new_figure()
        ax.set_title("Training loss")
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(LOSS_LABEL)
    else:
        fig = ax.figure
    ax.plot(_as_array(steps), _as_array(losses), label=label)
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    _legend_if_several(ax)
    return fig


def curves(
    series: Mapping[str, tuple[Sequence, Sequence]],
    title: str,
    xlabel: str = STEP_LABEL,
    ylabel: str = LOSS_LABEL,
) -> Figure:
    """Several named ``(x, y)`` series on one axes, e.g. the loss curves of several runs."""
    fig, (ax,) = new_figure()
    for name, (xs, ys) in series.items():
        ax.plot(_as_array(xs), _as_array(ys), label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _legend_if_several(ax)
    return fig


# --------------------------------------------------------------------------------------------------------------
# Dynamics records (see wakelab.analysis.dynamics.steps)
# --------------------------------------------------------------------------------------------------------------


def freeze_onset_plot(records: Sequence[Mapping]) -> Figure:
    """Share of rows unchanged from the previous step (left axis) and mean displacement (right axis)."""
    fig, (ax,) = new_figure()
    steps = _column(records, "step")
    ax.plot(steps, _column(records, "unchanged_share"), color="tab:blue", label="rows unchanged (share)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Freeze onset: rows left bit-identical by each step")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("share of rows unchanged")
    right = ax.twinx()
    right.plot(steps, _column(records, "mean_displacement"), color="tab:red", label="mean displacement")
    right.set_ylabel("mean L2 distance per step")
    _legend_if_several(ax, right)
    return fig


def lattice_hops_plot(records: Sequence[Mapping]) -> Figure:
    """Coordinates that hopped a bf16 lattice step vs updates rounded away, and the rounded-away share."""
    fig, (ax,) = new_figure()
    steps = _column(records, "step")
    ax.plot(steps, _column(records, "coords_moved"), color="tab:blue", label="coordinates moved")
    ax.plot(steps, _column(records, "rounded_away"), color="tab:orange", label="updates rounded away")
    ax.set_title("bf16 lattice hops per step")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("coordinates per step")
    right = ax.twinx()
    right.plot(
        steps,
        _column(records, "subhalf_ulp_share"),
        color="tab:green",
        linestyle="--",
        label="share of updates below half an ULP",
    )
    right.set_ylim(-0.02, 1.02)
    right.set_ylabel("share of nonzero updates")
    _legend_if_several(ax, right)
    return fig


def centroid_plot(records: Sequence[Mapping]) -> Figure:
    """Two panels: the norm of the tracked rows' centroid, and their bounding radius, against step."""
    fig, (left, right) = new_figure(ncols=2, width=5.5)
    steps = _column(records, "step")
    left.plot(steps, _column(records, "centroid_norm"), color="tab:purple")
    left.set_title("Centroid norm of tracked rows")
    left.set_xlabel(STEP_LABEL)
    left.set_ylabel("centroid L2 norm")
    right.plot(steps, _column(records, "radius"), color="tab:brown", label="max distance (radius)")
    if any(record.get("mean_distance") is not None for record in records):
        right.plot(steps, _column(records, "mean_distance"), color="tab:gray", linestyle="--", label="mean distance")
    right.set_title("Bounding radius of tracked rows")
    right.set_xlabel(STEP_LABEL)
    right.set_ylabel("L2 distance from centroid")
    _legend_if_several(right)
    return fig
