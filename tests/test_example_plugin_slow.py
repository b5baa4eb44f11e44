"""An outside plugin, end to end: pip-install examples/wakelab-norm-watch, see it, configure it, run it, remove it."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from conftest import tiny_overrides

from wakelab.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "wakelab-norm-watch"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def installed_files(dist: str) -> list[Path]:
    shown = subprocess.run([*PIP, "show", "-f", dist], capture_output=True, text=True, check=True).stdout
    location = Path(next(line.split(":", 1)[1].strip() for line in shown.splitlines() if line.startswith("Location:")))
    files = shown.split("Files:", 1)[1].split()
    return [location / f for f in files]


@pytest.mark.slow
def test_outside_plugin_installs_configures_runs_logs_and_uninstalls(tiny_model, texts, tmp_path):
    source = tmp_path / "wakelab-norm-watch"
    shutil.copytree(EXAMPLE, source)  # setuptools writes build/ and *.egg-info next to the sources: not in the checkout
    subprocess.run([*PIP, "install", "-q", "--no-deps", "--no-build-isolation", str(source)], check=True)
    importlib.invalidate_caches()
    try:
        files = installed_files("wakelab-norm-watch")
        listing = CliRunner().invoke(main, ["plugins"]).output
        lines = listing.splitlines()
        row = next(i for i, line in enumerate(lines) if line.startswith("norm_watch "))
        assert "entry point (wakelab" in lines[row] and "0.2.0" in lines[row]
        assert "on_step_end" in lines[row] and "config_section" in lines[row]
        assert "config: norm_watch.every, norm_watch.alarm" in "\n".join(lines[row : row + 3])

        values = tiny_overrides(tiny_model, texts, **{"train.max_steps": 6, "norm_watch.every": 2})
        args = ["run", "--no-progress", "--plugin", "norm_watch"]
        for key, value in values.items():
            args += ["--set", f"{key}={value}"]
        bad = CliRunner().invoke(main, [*args, "--set", "norm_watch.every=0"])
        assert bad.exit_code == 2 and "plugin 'norm_watch': config key 'norm_watch.every': got 0" in bad.stderr
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert run.data.params["norm_watch.every"] == "2"
        assert float(run.data.params["norm_watch.base_norm"]) > 0
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "norm_watch.ratio")
        assert [m.step for m in history] == [2, 4, 6]
        saved = json.loads((tmp_path / "out" / "norm_watch.json").read_text())
        assert [h["step"] for h in saved["history"]] == [2, 4, 6]
        artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plugins")]
        assert artifacts == ["plugins/norm_watch.json"]
    finally:
        subprocess.run([*PIP, "uninstall", "-y", "-q", "wakelab-norm-watch"], check=True)
        sys.modules.pop("wakelab_norm_watch", None)
        importlib.invalidate_caches()
    assert not [f for f in files if f.exists() and f.suffix != ".pyc"], "pip uninstall left files behind"
    assert "norm_watch" not in CliRunner().invoke(main, ["plugins"]).output
    gone = CliRunner().invoke(main, ["run", "--no-progress", "--plugin", "norm_watch"])
    assert gone.exit_code == 2 and "unknown plugin 'norm_watch'" in gone.stderr
