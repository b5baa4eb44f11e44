"""`wakelab sweep --over` takes a plugin's config key like a core one, with the same checks before any child starts."""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner
from conftest import tiny_overrides

from wakelab.cli.main import main
from wakelab.config import build_config
from wakelab.sweep.plan import plan_sweep


def sweep_args(tiny_model, texts, *extra: str) -> list[str]:
    args = ["--no-progress", *extra]
    for key, value in tiny_overrides(tiny_model, texts, **{"train.max_steps": 2}).items():
        args += ["--set", f"{key}={value}"]
    return args


def runs_in_store():
    client = mlflow.MlflowClient()
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_plan_over_an_active_plugins_key(tiny_model, texts):
    base = build_config(None, None, tiny_overrides(tiny_model, texts), plugins=["recorder"])
    plan = plan_sweep(base, "recorder.every=1,5")
    assert plan.canonical == "recorder.every"
    assert [c.config.recorder.every for c in plan.children] == [1, 5]
    assert [c.output_dir.name for c in plan.children] == ["recorder.every=1", "recorder.every=5"]
    assert all(c.config.recorder.fields == base.recorder.fields for c in plan.children)  # the rest is the base's


@pytest.mark.parametrize(
    "over, plugins, message",
    [
        (
            "recorder.every=1,5",
            [],
            "--over recorder.every=1: config key 'recorder.every' belongs to plugin 'recorder', "
            "which is not active, so it would be ignored; activate it with --plugin recorder",
        ),
        (
            "recorder.evry=1,5",
            ["--plugin", "recorder"],
            "plugin 'recorder': unknown config key 'recorder.evry'; did you mean recorder.every?",
        ),
        (
            "recorder.every=1,zero",
            ["--plugin", "recorder"],
            "--over recorder.every=zero: plugin 'recorder': config key 'recorder.every': got \"zero\"",
        ),
        ("recorder.every=1,1.0", ["--plugin", "recorder"], "are the same value"),
        ("nosuch.every=1,2", [], "neither wakelab nor any plugin found has a section 'nosuch'"),
    ],
)
def test_bad_plugin_key_is_one_line_exit_2_before_any_child(tiny_model, texts, over, plugins, message):
    result = CliRunner().invoke(main, ["sweep", "--over", over, *sweep_args(tiny_model, texts, *plugins)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("wakelab: error:") and message in line, line
    assert runs_in_store() == []


@pytest.mark.slow
def test_sweep_over_a_plugin_key_runs_each_child_with_its_value(tiny_model, texts, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "sweep",
            "--over",
            "recorder.every=1,2",
            "--output-dir",
            str(tmp_path / "out"),
            *sweep_args(tiny_model, texts, "--plugin", "recorder"),
        ],
    )
    assert result.exit_code == 0, result.output
    children = {r.data.tags["mlflow.runName"]: r for r in runs_in_store() if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == ["recorder.every=1", "recorder.every=2"]
    for label, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["recorder.every"] == label.split("=")[1]
    parent = next(r for r in runs_in_store() if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["sweep.key"] == "recorder.every"
