"""The docs stay true: the generated reference matches the config, the worked example runs, --help has examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_overrides

from wakelab import engine
from wakelab.cli import main
from wakelab.config import build_config, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown(), "run `make docs` to regenerate docs/configuration.md"


def test_command_reference_is_current():
    from wakelab.cli import help_markdown

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == help_markdown(), "run `make docs` to regenerate docs/cli.md"


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


@pytest.mark.parametrize("command", ["run", "plugins", "config-keys", "show-config", "presets"])
def test_every_command_help_has_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "wakelab " in result.output.split("Example", 1)[1]


def test_all_registered_commands_have_examples():
    for name, command in main.commands.items():
        help_text = command.help or ""
        assert "Example" in help_text, f"`wakelab {name} --help` has no example"


def test_worked_example_plugin_runs(tiny_model, texts, tmp_path, monkeypatch):
    overrides = tiny_overrides(tiny_model, texts, **{"train.max_steps": 10, "top_movers.top": 4})
    overrides["plugins"] = ["top_movers"]
    result = engine.run(build_config(None, None, overrides, cwd=ROOT), progress=False, cwd=ROOT)
    table = json.loads((result.output_dir / "top_movers.json").read_text())
    assert len(table) == 4  # its own config section: top_movers.top
    assert table == sorted(table, key=lambda row: -row["displacement"])
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(result.run_id, "top_movers.max_displacement")
    assert [m.step for m in history] == [10]
    assert history[0].value == pytest.approx(table[0]["displacement"], rel=1e-5)
    assert mlflow.get_run(result.run_id).data.params["top_movers.every"] == "10"
