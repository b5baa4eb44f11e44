"""Plot helpers: each builds a titled, labelled figure that saves as a non-empty PNG."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from wakelab.analysis import plots  # noqa: E402
from wakelab.analysis.dynamics.steps import centroid_track, freeze_onset  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _saved(fig: Figure, tmp_path, name: str):
    path = plots.save_figure(fig, tmp_path / "figures" / f"{name}.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 1000
    return path


def _assert_labelled(ax) -> None:
    assert ax.get_title()
    assert ax.get_xlabel()
    assert ax.get_ylabel()


def _line(ax, label_or_index):
    """(x, y) of one plotted line, by legend label or position, with NaN for gaps."""
    lines = ax.get_lines()
    line = (
        lines[label_or_index]
        if isinstance(label_or_index, int)
        else next(ln for ln in lines if ln.get_label() == label_or_index)
    )
    return np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)


def _legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [text.get_text() for text in legend.get_texts()]


def test_norm_histogram(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base, new = torch.rand(1000, generator=generator) + 1, torch.rand(20, generator=generator) + 3
    fig = plots.norm_histogram(base, new)
    ax = fig.axes[0]
    # Each histogram is a share of its own rows: the bars of each sum to 1, and sit where its values are.
    base_bars, new_bars = ax.containers
    assert sum(bar.get_height() for bar in base_bars) == pytest.approx(1.0)
    assert sum(bar.get_height() for bar in new_bars) == pytest.approx(1.0)
    filled = [bar for bar in new_bars if bar.get_height() > 0]
    assert min(bar.get_x() for bar in filled) >= float(new.min()) - 0.1
    assert sum(bar.get_height() for bar in base_bars if bar.get_x() >= 2.0) == 0, "no base norm is above 2"
    assert ax.get_title() == "Embedding row norms"
    assert "L2 norm" in ax.get_xlabel()
    _assert_labelled(ax)
    assert _legend_labels(ax) == ["base tokens (n=1000)", "new tokens (n=20)"]
    _saved(fig, tmp_path, "norms")


def test_norm_histogram_without_new_tokens_has_no_legend(tmp_path):
    fig = plots.norm_histogram([1.0, 2.0, 2.5, 3.0], [])
    assert fig.axes[0].get_legend() is None
    _saved(fig, tmp_path, "norms_base_only")


def test_loss_curve_single_and_overlaid(tmp_path):
    steps = list(range(100))
    fig = plots.loss_curve(steps, [5.0 / (1 + s) for s in steps], label="run a")
    ax = fig.axes[0]
    xs, ys = _line(ax, 0)
    assert xs.tolist() == steps and ys[0] == 5.0 and ys[99] == pytest.approx(0.05)
    assert ax.get_title() == "Training loss"
    assert ax.get_xlabel() == "optimizer step"
    assert ax.get_legend() is None  # one series

    same = plots.loss_curve(steps, [4.0 / (1 + s) for s in steps], label="run b", ax=ax)
    assert same is fig
    assert _legend_labels(ax) == ["run a", "run b"]
    assert _line(ax, "run b")[1][0] == 4.0
    _saved(fig, tmp_path, "loss")


def test_curves_several_runs(tmp_path):
    series = {name: ([0, 10, 20], [3.0, 2.0 - i * 0.1, 1.5]) for i, name in enumerate(["lr 1e-3", "lr 1e-4", "fp32"])}
    fig = plots.curves(series, title="Loss by run", xlabel="optimizer step", ylabel="loss (nats/token)")
    ax = fig.axes[0]
    assert ax.get_title() == "Loss by run"
    assert ax.get_ylabel() == "loss (nats/token)"
    assert _legend_labels(ax) == list(series)
    for name, (xs, ys) in series.items():
        assert [v.tolist() for v in _line(ax, name)] == [xs, ys]
    _saved(fig, tmp_path, "curves")


def test_freeze_onset_plot_from_real_records(tmp_path):
    steps = [torch.full((10, 4), 1.0, dtype=torch.bfloat16)]
    for i in range(1, 30):
        nxt = steps[-1].clone()
        nxt[: max(0, 10 - i)] += 0.5
        steps.append(nxt)
    fig = plots.freeze_onset_plot(freeze_onset(steps))
    ax = fig.axes[0]
    # Step i leaves rows 10-i.. unchanged: the share climbs by a tenth a step until every row is frozen.
    xs, share = _line(ax, "rows unchanged (share)")
    assert xs.tolist() == list(range(1, 30))
    assert share[:10].tolist() == pytest.approx([0.1 * i for i in range(1, 11)])
    assert (share[9:] == 1.0).all()
    _, moved = _line(fig.axes[1], "mean displacement")
    assert moved[0] > 0 and (moved[9:] == 0).all()
    assert ax.get_title() == "Freeze onset: rows left bit-identical by each step"
    assert ax.get_ylabel() == "share of rows unchanged"
    assert fig.axes[1].get_ylabel() == "mean L2 distance per step"
    assert len(_legend_labels(ax)) == 2
    _saved(fig, tmp_path, "freeze")


def test_lattice_hops_plot_handles_missing_share(tmp_path):
    records = [
        {
            "step": s,
            "coords_moved": 100 - s,
            "rounded_away": s,
            "nonzero_updates": 100,
            "subhalf_ulp_share": s / 100 if s else None,
        }
        for s in range(0, 40)
    ]
    fig = plots.lattice_hops_plot(records)
    ax = fig.axes[0]
    assert _line(ax, "coordinates moved")[1].tolist() == [100 - s for s in range(40)]
    assert _line(ax, "updates rounded away")[1].tolist() == list(range(40))
    _, share = _line(fig.axes[1], "share of updates below half an ULP")
    assert np.isnan(share[0]) and share[1:].tolist() == pytest.approx([s / 100 for s in range(1, 40)])
    assert ax.get_title() == "bf16 lattice hops per step"
    assert ax.get_xlabel() == "optimizer step"
    assert len(_legend_labels(ax)) == 3
    _saved(fig, tmp_path, "hops")


def test_centroid_plot_two_panels(tmp_path):
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(20, 8, generator=generator)
    records = centroid_track(((points * (1 - t / 20)) + t * 0.1 for t in range(20)), torch.ones(20, dtype=torch.bool))
    fig = plots.centroid_plot(records)
    left, right = fig.axes
    _, norms = _line(left, 0)
    assert norms.tolist() == pytest.approx([r["centroid_norm"] for r in records])
    _, radius = _line(right, "max distance (radius)")
    assert radius.tolist() == pytest.approx([r["radius"] for r in records])
    assert norms[-1] > norms[0] and radius[-1] < radius[0], "the points drift away while shrinking together"
    assert left.get_title() == "Centroid norm of tracked rows"
    assert right.get_title() == "Bounding radius of tracked rows"
    assert right.get_ylabel() == "L2 distance from centroid"
    _assert_labelled(left)
    _saved(fig, tmp_path, "centroid")


def test_figures_are_not_registered_with_pyplot():
    before = plt.get_fignums()
    plots.curves({"a": ([0, 1], [1, 0])}, title="t", xlabel="x", ylabel="y")
    assert plt.get_fignums() == before


def test_save_figure_closes_a_pyplot_figure(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [2, 0, 1])
    ax.set_title("pyplot figure")
    number = fig.number
    assert plt.fignum_exists(number)
    _saved(fig, tmp_path, "pyplot")
    assert not plt.fignum_exists(number)


@pytest.mark.parametrize("values", [[1.0, None, 3.0], torch.tensor([1.0, 2.0, 3.0])])
def test_as_array_accepts_lists_with_gaps_and_tensors(values):
    array = plots._as_array(values)
    assert array.shape == (3,)
    assert array[0] == 1.0
