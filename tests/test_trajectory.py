"""Trajectories: a projection fixed once per run, the self-contained page, the GIF and frames, token selection."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from wakelab.analysis.trajectory.frames import TrajectoryBuilder, cap_frames, fit_projection, select_tokens
from wakelab.analysis.trajectory.page import write_html
from wakelab.analysis.trajectory.stills import frame_image, write_gif
from wakelab.errors import WakelabError


def _builder(base, new, **kw):
    return TrajectoryBuilder(base, [f"b{i}" for i in range(len(base))], tracked=list(range(len(new))),
                             tracked_words=[f"w{i}" for i in range(len(new))], **kw)  # fmt: skip


def test_projection_is_fitted_once_on_base_rows_and_a_still_row_stays_put():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(300, 16, generator=gen) * torch.linspace(3, 0.1, 16)
    new = torch.randn(4, 16, generator=gen)
    builder = _builder(base, new, backdrop=50)
    frames = [new.clone()]
    for _ in range(5):  # rows 1..3 move, row 0 never does
        step = frames[-1].clone()
        step[1:] += 0.5 * torch.randn(3, 16, generator=gen)
        frames.append(step)
    for step, rows in enumerate(frames):
        builder.add(step * 10, rows)
    traj = builder.result()
    assert np.allclose(traj.xy[:, 0], traj.xy[0, 0]), "a row that does not move must stay put on screen"
    assert np.abs(traj.xy[-1, 1:] - traj.xy[0, 1:]).max() > 0.1
    # The basis depends on the base rows alone: refitting (with other new rows around) gives the same picture.
    again = fit_projection(base)
    assert np.allclose(again(frames[3]), traj.xy[3], atol=1e-5)
    assert np.allclose(builder.projection.axes, again.axes)
    # The first axis is the base rows' direction of largest variance (the first coordinate here).
    assert abs(again.axes[0][0]) > 0.9
    assert traj.extent == builder.extent and traj.steps == [0, 10, 20, 30, 40, 50]


def test_untracked_new_rows_become_a_density():
    base = torch.randn(100, 8)
    new = torch.randn(30, 8)
    builder = TrajectoryBuilder(base, [str(i) for i in range(100)], tracked=[0, 5], tracked_words=["a", "b"])
    builder.add(0, new)
    traj = builder.result()
    assert traj.untracked == 28 and traj.xy.shape == (1, 2, 2)
    assert int(traj.density[0].sum()) <= 28 and int(traj.density[0].sum()) >= 20  # a few may fall off the extent


def test_html_is_self_contained_and_carries_every_frame(tmp_path):
    base, new = torch.randn(200, 8), torch.randn(6, 8)
    builder = _builder(base, new, neighbours=3)
    for step in range(4):
        builder.add(step, new + step * 0.1)
    path = write_html(builder.result(), tmp_path / "t.html")
    page = path.read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), "the page must fetch nothing"
    assert "https://" not in page and 'type="range"' in page
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert data["steps"] == [0, 1, 2, 3] and data["words"] == [f"w{i}" for i in range(6)]
    assert len(data["views"][0]["xy"]) == 4 and len(data["views"][0]["xy"][0]) == 12
    assert all(len(n) == 3 for n in data["nb"][0]) and set(data["vocab"]) <= {f"b{i}" for i in range(200)}


def test_gif_and_frames(tmp_path):
    from PIL import Image

    base, new = torch.randn(100, 8), torch.randn(3, 8)
    builder = _builder(base, new)
    for step in range(3):
        builder.add(step, new + step)
    traj = builder.result()
    image = frame_image(traj, 2)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    gif = Image.open(write_gif(traj, tmp_path / "t.gif"))
    assert gif.n_frames == 3


def test_token_selection_reports_unknown_words_and_uses_the_rest(tmp_path):
    words = ["riverrun", "moonbrook", "smirtle", "glimmerous"]
    listed = tmp_path / "words.txt"
    listed.write_text("# pick\nmoonbrook\nnotaword\nsmirtle\n")
    warned = []
    assert select_tokens(str(listed), words, max_tokens=10, warn=warned.append) == [1, 2]
    assert "1 of 3 words are not new tokens" in warned[0] and "notaword" in warned[0]
    listed.write_text("nope\n")
    with pytest.raises(WakelabError, match="none of its 1 words is a new token"):
        select_tokens(str(listed), words, max_tokens=10)
    assert select_tokens("top:2", words, max_tokens=10, movement=[0.1, 3.0, 0.2, 2.0]) == [1, 3]
    sampled = select_tokens("sample:2", words, max_tokens=10, seed=3)
    assert len(set(sampled)) == 2 and set(sampled) <= set(range(len(words)))  # two different new tokens
    assert sampled == select_tokens("sample:2", words, max_tokens=10, seed=3)  # the seed gives the same two again
    picks = {tuple(sorted(select_tokens("sample:2", words, max_tokens=10, seed=seed))) for seed in range(8)}
    assert len(picks) > 1  # and another seed may pick others: a sample, not the first two
    with pytest.raises(WakelabError, match="top movers are known only once training is over"):
        select_tokens("top:2", words, max_tokens=10)
    with pytest.raises(WakelabError, match="is not auto, all, sample:K, top:K or an existing words file"):
        select_tokens("bogus", words, max_tokens=10)


def test_too_many_frames_are_capped_with_a_hint():
    keep, message = cap_frames(list(range(1000)), 100, "record every 10th step")
    assert len(keep) == 100 and keep[0] == 0 and keep[-1] == 999
    assert "1000 steps are more frames" in message and "record every 10th step" in message
    assert cap_frames([1, 2, 3], 100) == ([0, 1, 2], None)
