"""The trajectory page and the sweep's side-by-side page in headless Chromium (Debian's, driven by Playwright).

Built from a synthetic trajectory (no training): 40 words crowded together, so that labels would pile up if they
could. Checks what a reader relies on: no label overlaps another (their bounding boxes), the slider moves every
panel and chart together, hover shows the word, its meaning word and its neighbours, zoom and "fit" work, and both
projections say what variance they keep. Skipped without Chromium, except in CI. Screenshots go to
$WAKELAB_UI_SCREENSHOTS when set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS, _need_browser

from wakelab.analysis.trajectory.frames import TrajectoryBuilder
from wakelab.analysis.trajectory.meaning import Meanings
from wakelab.analysis.trajectory.page import write_compare_html, write_html

WORDS = ("riverrun moonbrook smirtle glimmerous thundersome wendelight crumbledown mistwhorl brightwater stonehallow "
         "duskmere fernwhistle hollowmoor quillstream ravenfold saltmarrow thornwick umberglade vesperlane "
         "willowmist ashenbrook bramblecoat cinderfell dovetide emberwash frostling gildenrun heathermoor ironvale "
         "junipine kestrelwing larkspurn marrowdeep nettlebloom oakenshaw pebblerun quenchwood rushmere sablewind "
         "tidewrack").split()  # fmt: skip


def _trajectory(seed: int = 0, frames: int = 8, spread: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(3000, 32, generator=gen) * torch.linspace(3, 0.2, 32)
    targets = base[torch.arange(40) * 7]
    names = [f"meaning{i}" for i in range(40)]
    meanings = Meanings(names, targets.clone(), [[i * 7] for i in range(40)])
    builder = TrajectoryBuilder(base, [f"base{i}" for i in range(3000)], tracked=list(range(40)),
                                tracked_words=list(WORDS), meanings=meanings, projections=("focus", "base"),
                                backdrop=800, neighbours=3, seed=seed)  # fmt: skip
    rows = base.mean(0) + spread * torch.randn(60, 32, generator=gen)  # 40 tracked + 20 as density, crowded
    for step in range(frames):
        builder.add(step * 5, rows)
        rows = rows.clone()
        rows[:30] += 0.15 * (targets[:30] - rows[:30])
        rows[30:40] -= 0.05 * targets[30:40]
    return builder.result()


def _boxes_overlap(boxes):
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
                    and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"]):  # fmt: skip
                return a, b
    return None


def _label_boxes(page, scope=""):
    return [el.bounding_box() for el in page.locator(f"{scope} .lbl").all()]


@pytest.fixture
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _shots(tmp_path) -> Path:
    folder = Path(os.environ.get("WAKELAB_UI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _open(browser, path: Path, errors: list):
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
    page.goto(path.as_uri(), wait_until="load")
    return page


def test_run_page_labels_never_overlap_and_the_slider_moves_picture_and_chart(browser, tmp_path):
    errors: list[str] = []
    page = _open(browser, write_html(_trajectory(), tmp_path / "t.html"), errors)
    panel = "window.WLP[0]"
    assert page.evaluate(f"{panel}.f") == 7 and page.locator("#step").inner_text() == "35 (8/8)"
    boxes = _label_boxes(page)
    assert 3 <= len(boxes) < 40 + 40, "some words are labelled, the rest are left to hover"
    assert _boxes_overlap(boxes) is None
    summary = page.locator(".summary").inner_text()
    assert summary.startswith("Of 40 words with a meaning word, 30 moved closer to it and 10 moved away")
    assert "step 0 → 35" in summary
    assert "focus: " in page.locator("#variance").inner_text() and "base: " in page.locator("#variance").inner_text()
    page.screenshot(path=str(_shots(tmp_path) / "trajectory-page-test.png"), full_page=True)

    # The slider moves the picture, the labels, the chart and the summary line together.
    page.locator("#slider").evaluate("s => { s.value = 0; s.dispatchEvent(new Event('input')); }")
    assert page.evaluate(f"{panel}.f") == 0 and page.locator("#step").inner_text() == "0 (1/8)"
    assert "0 moved closer" in page.locator(".summary").inner_text()
    assert _boxes_overlap(_label_boxes(page)) is None
    page.locator("#slider").evaluate("s => { s.value = 7; s.dispatchEvent(new Event('input')); }")

    # Hover: the word, its meaning word with the distance, and its nearest base tokens.
    x, y = page.evaluate(f"""(() => {{ const P = {panel}, v = P.D.views[P.v], t = P.D.labelOrder[0], a = v.xy[P.f];
        const r = P.canvas.getBoundingClientRect();
        return [r.left + P.cam.ox + a[2*t]*P.cam.sx, r.top + P.cam.oy - a[2*t+1]*P.cam.sy]; }})()""")
    page.mouse.move(x, y)
    tip = page.locator(".tip")
    assert tip.is_visible()
    word = page.evaluate(f"{panel}.D.words[{panel}.D.labelOrder[0]]")
    assert tip.inner_text().startswith(word) and "meaning: meaning" in tip.inner_text()
    assert "nearest base tokens: base" in tip.inner_text()

    # Zoom in at the cursor, then "fit all" and "fit new tokens" bring the views back.
    fitted = page.evaluate(f"{panel}.cam.sx")
    page.mouse.wheel(0, -400)
    assert page.evaluate(f"{panel}.cam.sx") > fitted * 1.5
    assert _boxes_overlap(_label_boxes(page)) is None
    page.locator("#all").click()
    assert page.evaluate(f"{panel}.cam.sx") < fitted
    page.locator("#fit").click()
    assert page.evaluate(f"{panel}.cam.sx") == pytest.approx(fitted)

    # The other projection: its own positions, labels still apart.
    page.locator("#proj").select_option("1")
    assert page.evaluate(f"{panel}.v") == 1 and _boxes_overlap(_label_boxes(page)) is None
    assert errors == []


def test_side_by_side_page_one_slider_moves_every_run(browser, tmp_path):
    errors: list[str] = []
    runs = [("init.method=spherical", _trajectory(seed=0)), ("init.method=subword", _trajectory(seed=0, spread=0.5))]
    page = _open(browser, write_compare_html(runs, tmp_path / "c.html"), errors)
    assert page.evaluate("window.WLP.length") == 2
    assert page.evaluate("window.WLP.map(p => p.f)") == [7, 7]
    page.locator("#slider").evaluate("s => { s.value = 2; s.dispatchEvent(new Event('input')); }")
    assert page.evaluate("window.WLP.map(p => p.f)") == [2, 2]
    assert page.evaluate("window.WLP[0].cam === window.WLP[1].cam"), "one camera: zoom and pan move both"
    for i in range(2):
        assert _boxes_overlap(_label_boxes(page, f".panel:nth-child({i + 1})")) is None
    assert page.locator(".summary").count() == 2
    page.screenshot(path=str(_shots(tmp_path) / "trajectory-compare-test.png"), full_page=True)
    assert errors == []
