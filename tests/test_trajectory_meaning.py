"""Meaning in the picture, the second fixed projection, label priority, and the sweep's side-by-side page (no
browser: tests/test_trajectory_page.py drives the pages in Chromium)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from wakelab.analysis.embeddings import top_k_cosine
from wakelab.analysis.trajectory.frames import (
    TrajectoryBuilder,
    describe,
    label_order,
    load_trajectory,
    save_trajectory,
    subset,
)
from wakelab.analysis.trajectory.meaning import closer_and_away, resolve_meanings
from wakelab.analysis.trajectory.page import page_data
from wakelab.analysis.trajectory.projection import fit_focus_projection, fit_projection
from wakelab.sweep.page import ChildTrajectory, comparison_page, side_by_side


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from wakelab.testing import build_tokenizer

    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    num_base = len(tok)
    tok.add_tokens(["riverrun", "moonbrook", "smirtle"])
    return tok, num_base


def _base(num_base: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_base, d, generator=gen) * torch.linspace(3, 0.2, d)


def test_meaning_rows_distances_and_words_outside_the_lexicon(tokenizer):
    tok, num_base = tokenizer
    base = _base(num_base)
    constituents = {"riverrun": ["river", "river run"], "moonbrook": ["water", "moon brook"],
                    "notaword": ["sea", "no ta"], "alsonot": ["hill", "al so"]}  # fmt: skip
    ids = [tok.convert_tokens_to_ids(w) for w in ("riverrun", "moonbrook", "smirtle")]
    warned = []
    meanings = resolve_meanings(constituents, tok, ids, base, num_base=num_base, source="c.tsv", warn=warned.append)
    assert meanings.words == ["river", "water", ""]
    # One line, with the count, for the words that are not new tokens; the rest are drawn.
    assert warned == ["c.tsv: 2 of 4 words are not new tokens of this run (not in the lexicon) and get no meaning "
                      "line: notaword, alsonot"]  # fmt: skip
    river = tok(" river", add_special_tokens=False)["input_ids"]
    assert torch.allclose(meanings.rows[0], base[river].mean(0))
    rows = torch.stack([meanings.rows[0] * 2.0, -meanings.rows[1], torch.randn(16)])
    distance = meanings.distance(rows)
    assert distance[0] == pytest.approx(0.0, abs=1e-5) and distance[1] == pytest.approx(2.0, abs=1e-5)
    assert np.isnan(distance[2])
    assert closer_and_away(np.array([0.5, 0.5, np.nan, 0.3]), np.array([0.2, 0.9, 0.1, 0.3])) == (1, 1, 1)


def test_focus_projection_is_fitted_once_on_base_rows_near_the_new_tokens():
    gen = torch.Generator().manual_seed(1)
    base = _base(500)
    anchors = base[:10] + 0.01 * torch.randn(10, 16, generator=gen)
    _, near = top_k_cosine(anchors, base, 3, chunk_size=4)  # chunked: 4 rows at a time
    assert near.shape == (10, 3) and all(int(near[i, 0]) == i for i in range(10))
    focus = fit_focus_projection(base, anchors, meaning_ids=[400, 401], rows_wanted=50)
    again = fit_focus_projection(base, anchors, meaning_ids=[400, 401], rows_wanted=50)
    assert focus is not None and np.allclose(focus.axes, again.axes) and focus.name == "focus"
    assert "base rows" in focus.fitted_on and "meaning words" in focus.fitted_on
    assert 0 < focus.explained[0] <= 1 and focus.explained[0] >= focus.explained[1]
    assert focus.fingerprint() != fit_projection(base).fingerprint()
    assert fit_focus_projection(base[:2], anchors[:1]) is None  # fewer than 3 rows: nothing to fit


def _moving(tokenizer=None, frames: int = 6):
    """A builder with both projections over rows that walk toward their meaning rows (one walks away)."""
    gen = torch.Generator().manual_seed(2)
    base = _base(300)
    new = torch.randn(5, 16, generator=gen) * 3
    from wakelab.analysis.trajectory.meaning import Meanings

    targets = base[[10, 20, 30, 40, 50]]
    meanings = Meanings(["ten", "twenty", "thirty", "forty", ""], targets.clone(), [[10], [20], [30], [40], []])
    builder = TrajectoryBuilder(base, [f"b{i}" for i in range(300)], tracked=[0, 1, 2, 3, 4],
                                tracked_words=["w0", "w1", "w2", "w3", "w4"], meanings=meanings,
                                projections=("focus", "base"), labels=[4])  # fmt: skip
    rows = new.clone()
    for step in range(frames):
        builder.add(step * 10, rows)
        rows = rows.clone()
        rows[:3] += 0.3 * (targets[:3] - rows[:3])  # toward the meaning word
        rows[3] -= 0.3 * targets[3]  # away from it
    return builder.result()


def test_trajectory_carries_both_projections_distances_and_label_order(tmp_path):
    traj = _moving()
    assert [v.name for v in traj.views] == ["focus", "base"]  # the first asked for is the default
    assert traj.xy is traj.view("focus").xy and not np.allclose(traj.view("base").xy, traj.xy)
    assert traj.distance.shape == (6, 5) and np.isnan(traj.distance[:, 4]).all()
    assert (traj.distance[-1, :3] < traj.distance[0, :3]).all() and traj.distance[-1, 3] > traj.distance[0, 3]
    # Labels: the chosen word first, then the words with a meaning word by how far they moved.
    assert traj.label_order[0] == 4 and set(traj.label_order[1:5]) == {0, 1, 2, 3}
    described = describe(traj)
    assert described["meaning"] == {"words": 4, "closer": 3, "away": 1, "unchanged": 0}
    assert set(described["projections"]) == {"focus", "base"}
    data = page_data(traj)
    assert [v["name"] for v in data["views"]] == ["focus", "base"] and data["meaning"][:2] == ["ten", "twenty"]
    assert data["dist"][0][4] is None and data["views"][0]["mxy"][8] is None  # no meaning word: no point
    # Saved and read back whole (the sweep's side-by-side page reads it).
    back = load_trajectory(save_trajectory(traj, tmp_path / "t.npz"))
    assert back.steps == traj.steps and back.label_order == traj.label_order
    assert np.allclose(back.view("base").xy, traj.view("base").xy) and np.allclose(back.distance, traj.distance,
                                                                                  equal_nan=True)  # fmt: skip
    assert back.view("base").projection.fingerprint() == traj.view("base").projection.fingerprint()
    short = subset(traj, [0, 5])
    assert short.steps == [0, 50] and short.distance.shape == (2, 5) and short.view("base").xy.shape == (2, 5, 2)


def test_label_order_without_meanings_is_top_movers():
    assert label_order([0.1, 3.0, 0.5], []) == [1, 2, 0]
    assert label_order([0.1, 3.0, 0.5], ["x", "", "y"]) == [2, 0, 1]
    assert label_order([0.1, 3.0, 0.5], ["x", "", "y"], chosen=[1]) == [1, 2, 0]


def test_sweep_page_refuses_side_by_side_across_base_models_and_keeps_the_table(tmp_path):
    traj = _moving()
    for name in ("a", "b"):
        (tmp_path / name / "trajectory").mkdir(parents=True)
        save_trajectory(traj, tmp_path / name / "trajectory" / "trajectory.npz")
    warned = []
    children = [ChildTrajectory("a", tmp_path / "a", "demo"), ChildTrajectory("b", tmp_path / "b", "other/model")]
    runs, refused = side_by_side(children, warned.append)
    assert runs == [] and refused.startswith("side-by-side trajectories refused: the children have different base")
    assert "\n" not in refused and "a: demo; b: other/model" in refused
    page = comparison_page("Sweep over init.method", "<table><tr><td>a</td></tr></table>", ["note"], [], runs, refused)
    assert "<table>" in page and "refused" in page and "WL.Panel" not in page

    children[1].base_model = "demo"
    runs, refused = side_by_side(children, warned.append)
    assert refused is None and [label for label, _ in runs] == ["a", "b"]
    plot = tmp_path / "loss_curves.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(plot)
    page = comparison_page("Sweep", "<table></table>", [], [plot], runs, None)
    assert "data:image/png;base64," in page and "WL.Slider" in page and "position:sticky" in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), "the page must fetch nothing"
