"""`wakelab ui` in a real browser: a tiny run and its analysis, seen through the MLflow UI in headless Chromium.

Chromium comes from Debian (`apt-get install chromium`, /usr/bin/chromium); Playwright for Python drives it and
never downloads a browser of its own. Without Chromium the test is skipped, except in CI (CI=true), where it fails.
Screenshots go to $WAKELAB_UI_SCREENSHOTS when set (docs/img/ holds one), else to the test's temp folder.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
UI_START_TIMEOUT_S = 240
PAGE_TIMEOUT_MS = 60_000


def _need_browser():
    """Playwright + Debian's Chromium: skipped locally when missing, a failure in CI."""
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[test]')")
    if missing:
        message = "browser test needs " + " and ".join(missing) + "; `bash scripts/ci-system-deps.sh` installs them"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class UiProcess:
    """`wakelab ui` as a user starts it, its stdout read line by line until it prints the URL."""

    def __init__(self, cwd: Path, port: int):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wakelab", "ui", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = re.search(r"MLflow UI: (http://\S+)", line)
            if match:
                return match.group(1)
        raise AssertionError("wakelab ui printed no URL:\n" + "".join(self.output)[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # wakelab ui stops the server's whole process group
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("WAKELAB_UI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_port_in_use_is_one_error_line_before_starting_anything(tmp_path):
    from click.testing import CliRunner

    from wakelab.cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["ui", "--port", str(port)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"wakelab: error: {lines[0].removeprefix('wakelab: error: ')}"]
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "--port" in lines[0]


def test_a_server_uri_needs_no_local_ui(monkeypatch):
    from click.testing import CliRunner

    from wakelab.cli.main import main

    server = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    result = CliRunner().invoke(main, ["ui"])
    assert result.exit_code == 0, result.output
    assert f"{server}/" in result.output


@pytest.mark.slow
def test_ui_shows_params_loss_chart_vocab_report_and_plots(tiny_model, texts, tmp_path, screenshots):
    _need_browser()
    from click.testing import CliRunner
    from playwright.sync_api import expect, sync_playwright

    from wakelab.cli.main import main
    from wakelab.config import build_config
    from wakelab.run import engine

    timings = {}
    started = time.monotonic()
    config = build_config(None, None, tiny_overrides(tiny_model, texts, **{"train.max_steps": 6}))
    result = engine.run(config, progress=False)
    analysed = CliRunner().invoke(main, ["analyze", "out", "--no-static", "--no-eval"])
    assert analysed.exit_code == 0, analysed.output
    timings["run + analyze"] = time.monotonic() - started

    started = time.monotonic()
    ui = UiProcess(tmp_path, free_port())
    try:
        url = ui.wait_for_url(UI_START_TIMEOUT_S)
        timings["ui start"] = time.monotonic() - started
        # The runs view of the run's experiment, on loopback: MLflow 3 would open on its GenAI view otherwise.
        assert re.fullmatch(
            rf"http://127\.0\.0\.1:\d+/#/experiments/{result.experiment_id}/runs\?workflowType=machine_learning", url
        ), url
        base = url.split("#", 1)[0].rstrip("/")

        started = time.monotonic()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            expect.set_options(timeout=PAGE_TIMEOUT_MS)

            # The runs list: the run is there.
            page.goto(url, wait_until="load")
            run_name = mlflow_run_name(result.run_id)
            expect(page.get_by_role("link", name=run_name)).to_be_visible()
            _close_assistant(page)
            page.screenshot(path=str(screenshots / "ui-runs.png"))

            # The run page: params (the flattened config).
            page.goto(
                f"{base}/#/experiments/{result.experiment_id}/runs/{result.run_id}?workflowType=machine_learning",
                wait_until="load",
            )
            expect(page.get_by_role("tab", name="Model metrics")).to_be_visible()
            _close_assistant(page)
            expect(page.get_by_text("Parameters (", exact=False)).to_be_visible()
            expect(page.get_by_text("added_tokens", exact=True)).to_be_visible()
            page.get_by_placeholder("Search parameters").fill("train.lr")
            expect(page.get_by_text("train.lr", exact=True)).to_be_visible()
            expect(page.get_by_text("0.01", exact=True)).to_be_visible()  # the value tiny_overrides set
            page.screenshot(path=str(screenshots / "ui-run-overview.png"))

            # The loss chart (the tab polls, so wait for the plot itself, not for network idle).
            page.get_by_role("tab", name="Model metrics").click()
            page.get_by_placeholder("Search metric charts").fill("loss")
            card = page.get_by_test_id("experiment-view-compare-runs-card").filter(has_text="loss").first
            expect(card).to_be_visible()
            expect(card.locator(".js-plotly-plot .main-svg").first).to_be_visible()
            expect(card.locator(".scatterlayer .trace").first).to_be_attached()
            page.screenshot(path=str(screenshots / "ui-loss-chart.png"))

            # The vocabulary report artifact, shown as text.
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("vocab_report.json", exact=True).click()
            expect(page.get_by_text('"new_vocab_size"', exact=False).first).to_be_visible()
            expect(page.get_by_text('"rejected"', exact=False).first).to_be_visible()
            page.screenshot(path=str(screenshots / "ui-vocab-report.png"))

            # The analysis plots (wakelab analyze logged them under analysis/), shown as images.
            page.get_by_text("analysis", exact=True).click()
            page.get_by_text("loss", exact=True).click()
            page.get_by_text("loss_curve.png", exact=True).click()
            image = page.locator("img[src^='blob:']").first
            expect(image).to_be_visible()
            page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=image.element_handle())
            page.screenshot(path=str(screenshots / "ui-analysis-plot.png"))
            browser.close()
        timings["browser"] = time.monotonic() - started
    finally:
        ui.stop()
    assert ui.proc.returncode is not None
    print(
        "ui browser test timings: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f"; screenshots in {screenshots}"
    )


def mlflow_run_name(run_id: str) -> str:
    import mlflow

    return mlflow.get_run(run_id).info.run_name


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its Assistant panel beside every page; close it so the screenshots show the run."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


@pytest.mark.slow
def test_ui_shows_the_trajectory_page_and_scrubs_its_frames(tiny_model, texts, tmp_path, screenshots):
    """The trajectory plugin's page opens in MLflow's artifact viewer (offline, scripts run) and its slider moves;
    the frames logged with a step get the UI's image step slider."""
    _need_browser()
    from playwright.sync_api import expect, sync_playwright

    from wakelab.config import build_config
    from wakelab.run import engine

    overrides = tiny_overrides(tiny_model, texts, **{"train.max_steps": 6, "plugins": ["trajectory"],
                                                     "trajectory.every": 2})  # fmt: skip
    result = engine.run(build_config(None, None, overrides), progress=False)
    ui = UiProcess(tmp_path, free_port())
    try:
        url = ui.wait_for_url(UI_START_TIMEOUT_S)
        base = url.split("#", 1)[0].rstrip("/")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            expect.set_options(timeout=PAGE_TIMEOUT_MS)
            page.route(re.compile(r"^https?://(?!127\.0\.0\.1)"), lambda route: route.abort())  # offline, provably
            page.goto(
                f"{base}/#/experiments/{result.experiment_id}/runs/{result.run_id}?workflowType=machine_learning",
                wait_until="load",
            )
            expect(page.get_by_role("tab", name="Artifacts")).to_be_visible()
            _close_assistant(page)
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("trajectory", exact=True).first.click()
            page.get_by_text("trajectory.html", exact=True).click()
            frame = page.frame_locator("iframe").first
            expect(frame.locator("canvas.plot")).to_be_visible()
            expect(frame.locator("#step")).to_contain_text("6 (4/4)")  # the last frame is drawn first
            frame.locator("#slider").evaluate("s => { s.value = 0; s.dispatchEvent(new Event('input')); }")
            expect(frame.locator("#step")).to_contain_text("0 (1/4)")
            frame.locator("#slider").evaluate("s => { s.value = 3; s.dispatchEvent(new Event('input')); }")
            boxes = [label.bounding_box() for label in frame.locator(".lbl").all()]
            assert boxes and not any(  # labels never overlap, in the artifact viewer too
                a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
                and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"]
                for i, a in enumerate(boxes) for b in boxes[i + 1 :]
            )  # fmt: skip
            page.screenshot(path=str(screenshots / "ui-trajectory.png"))

            # The frames, logged with mlflow.log_image(key="trajectory", step=...): the runs' chart view takes an
            # "Image grid" chart of the key, whose step slider scrubs through training.
            page.goto(
                f"{base}/#/experiments/{result.experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART",
                wait_until="load",
            )
            _close_assistant(page)
            page.get_by_role("button", name="Add chart").first.click()
            page.get_by_role("menuitem", name="Image grid").click()
            dialog = page.get_by_role("dialog", name="Add new chart")
            dialog.get_by_role("combobox", name=re.compile("Images")).click()
            page.get_by_role("option", name="trajectory").click()
            page.keyboard.press("Escape")
            slider = dialog.get_by_role("slider").first
            expect(slider).to_be_enabled()
            step = dialog.get_by_role("spinbutton").first
            expect(step).to_have_attribute("max", "6")  # frames at steps 0, 2, 4, 6
            box = slider.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + 600, box["y"] + box["height"] / 2, steps=8)  # drag the thumb to the end
            page.mouse.up()
            expect(step).to_have_value("6")
            dialog.get_by_role("switch", name="Show run parameters").click()  # the frame, not 80 params, on screen
            expect(dialog.locator("img").first).to_be_visible()
            page.screenshot(path=str(screenshots / "ui-trajectory-frames.png"))
            browser.close()
    finally:
        ui.stop()
