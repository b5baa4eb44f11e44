"""``wakelab sweep``: children nested under one parent run, the comparison artifacts, failures, and bad input."""

from __future__ import annotations

import json
import re
import textwrap

import mlflow
import pytest
from click.testing import CliRunner
from conftest import tiny_overrides

from wakelab.cli.main import main
from wakelab.config import build_config
from wakelab.errors import ConfigError
from wakelab.sweep.plan import parse_over, plan_sweep, split_values

ARTIFACTS = {
    "comparison.csv",
    "comparison.json",
    "comparison.md",
    "comparison.html",
    "neighbours.json",
    "loss_curves.png",
    "perplexity.png",
    "new_row_norm.png",
    "hit_rates.png",
}


def set_args(tiny_model, texts, **extra) -> list[str]:
    overrides = tiny_overrides(tiny_model, texts, **{"train.max_steps": 3, **extra})
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def constituents_file(tmp_path, extra_line: str = "") -> str:
    path = tmp_path / "constituents.tsv"
    path.write_text(
        "# word\tmeaning\tparts\n"
        "riverrun\triver\triver run\n"
        "moonbrook\twater\tmoon brook\n"
        "smirtle\tlaughed\tsmile chortle\n" + extra_line
    )
    return str(path)


def sweep(args: list[str]):
    return CliRunner().invoke(main, ["sweep", *args])


def runs_in_store():
    client = mlflow.MlflowClient()
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_two_value_sweep_logs_children_under_a_parent_with_a_comparison(tiny_model, texts, tmp_path):
    constituents = constituents_file(tmp_path, "notaword\tbird\tbird song\n")
    result = sweep(
        [
            "--over",
            "init=spherical,subword",
            "--constituents",
            constituents,
            "--top-k",
            "5",
            "--evaluate",
            "--no-progress",
            "--plugin",
            "trajectory",
            *set_args(tiny_model, texts, **{"trajectory.gif": False, "trajectory.log_frames": False}),
        ]  # no init.constituents: --constituents alone reaches the children's pages
    )
    assert result.exit_code == 0, result.output
    assert "not in the lexicon" in result.output and "notaword" in result.output

    client = mlflow.MlflowClient()
    every = runs_in_store()
    evaluations = [r for r in every if r.data.tags.get("wakelab.analysis.kind") == "evaluate"]
    runs = [r for r in every if r.data.tags.get("wakelab.analysis.kind") != "evaluate"]
    parents = [r for r in runs if r.data.tags.get("wakelab.sweep") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.key"] == "init.method"
    children = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: r.data.tags["mlflow.runName"],
    )
    assert [c.data.tags["mlflow.runName"] for c in children] == ["init=spherical", "init=subword"]
    assert len(runs) == 3, "each child is exactly one run"
    for child, method in zip(children, ["spherical", "subword"], strict=True):
        assert child.info.status == "FINISHED"
        assert child.info.experiment_id == parent.info.experiment_id
        assert child.data.params["init.method"] == method
        assert child.data.params["init.result.method"] == method
        assert "heldout_perplexity_after" in child.data.metrics
        hits = client.get_metric_history(child.info.run_id, "neighbour_hit_any")
        assert sorted(m.step for m in hits) == [0, 3]
        assert child.data.tags["wakelab.output_dir"].endswith(f"out/init={method}")
        (evaluation,) = [e for e in evaluations if e.data.tags["mlflow.parentRunId"] == child.info.run_id]
        assert evaluation.info.status == "FINISHED" and "evaluate/trained/delta_corpus" in evaluation.data.metrics

    logged = {a.path.split("/", 1)[1] for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert ARTIFACTS <= logged
    table = json.loads((tmp_path / "out" / "comparison" / "comparison.json").read_text())
    assert table["missing"] == [] and table["constituents_not_in_lexicon"] == ["notaword"]
    by_child = {row["child"]: row for row in table["children"]}
    assert set(by_child) == {"init=spherical", "init=subword"}
    for row in by_child.values():
        assert row["status"] == "FINISHED"
        assert row["heldout_perplexity_before"] > 0 and row["heldout_perplexity_after"] > 0
        assert row["new_row_norm_init"] > 0 and row["final_loss"] > 0
        assert row["hit_words"] == 3  # the three lexicon words of the file; notaword left out
        assert row["eval_corpus_coined_per_1k"] > 0 and row["eval_delta_corpus"] > 0  # --evaluate's figures
        assert row["eval_new_ppl_after"] > 1
        for key in ("hit_meaning_step0", "hit_meaning_final", "hit_any_step0", "hit_any_final"):
            assert 0.0 <= row[key] <= 1.0
    # Step-0 norms are the init's: spherical at 1.5x the base norm, subword at sub-token means (shorter).
    assert by_child["init=spherical"]["new_row_norm_init"] == pytest.approx(
        1.5 * by_child["init=spherical"]["base_mean_norm"], rel=1e-3
    )
    neighbours = json.loads((tmp_path / "out" / "comparison" / "neighbours.json").read_text())
    assert len(neighbours["init=subword"]["step0"][0]["neighbours"]) == 5
    markdown = (tmp_path / "out" / "comparison" / "comparison.md").read_text()
    assert "| init=spherical | FINISHED |" in markdown and "meaning@5 end" in markdown
    assert "Delta to corpus" in markdown
    assert "init=spherical" in result.output  # the table is printed too
    # One page: the table, the plots embedded, and both children's trajectories under one slider.
    page = (tmp_path / "out" / "comparison" / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "position:sticky" in page
    runs = json.loads(re.search(r'<script id="runs" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert [r["label"] for r in runs] == ["init=spherical", "init=subword"]
    assert len({r["data"]["views"][0]["fingerprint"] for r in runs}) == 1, "one shared projection"
    for run in runs:
        assert run["data"]["meaning"] and run["data"]["dist"], f"{run['label']}: the meaning words are drawn"
    for method in ("spherical", "subword"):  # each child's own page too, and its config names the file
        child_page = (tmp_path / "out" / f"init={method}" / "trajectory" / "trajectory.html").read_text()
        assert "closer" in child_page
    assert {c.data.params["init.constituents"] for c in children} == {str((tmp_path / "constituents.tsv").resolve())}


def test_a_failing_child_is_recorded_and_the_others_go_on(tiny_model, texts, tmp_path):
    plugin = tmp_path / "boom.py"
    plugin.write_text(
        textwrap.dedent("""
        import wakelab
        @wakelab.hookimpl
        def init_embeddings(ctx):
            if ctx.method == "boom":
                raise RuntimeError("boom in init")
    """)
    )
    result = sweep(
        ["--over", "init=boom,spherical", "--plugin", str(plugin), "--no-progress", *set_args(tiny_model, texts)]
    )
    assert result.exit_code == 1, result.output
    assert "init=boom FAILED: RuntimeError: boom in init" in result.output

    runs = runs_in_store()
    parent = next(r for r in runs if r.data.tags.get("wakelab.sweep") == "parent")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["wakelab.sweep.failed_children"] == "init=boom"
    children = {
        r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert children["init=boom"].info.status == "FAILED"
    assert children["init=boom"].data.tags["wakelab.sweep.status"] == "failed"
    assert children["init=spherical"].info.status == "FINISHED"
    table = json.loads((tmp_path / "out" / "comparison" / "comparison.json").read_text())
    assert table["missing"] == ["init=boom"]
    boom = next(row for row in table["children"] if row["child"] == "init=boom")
    assert boom["status"] == "FAILED" and "boom in init" in boom["error"]
    assert boom["heldout_perplexity_after"] is None
    assert "missing (no results): init=boom" in (tmp_path / "out" / "comparison" / "comparison.md").read_text()


@pytest.mark.parametrize(
    "over, message",
    [
        ("nosuchkey=1,2", "unknown config key 'nosuchkey'"),
        ("lr=1e-3,abc", "--over lr=abc: config key 'train.lr': got \"abc\""),
        ("max_steps=2,-1", "--over max_steps=-1: config key 'train.max_steps'"),
        ("init=spherical,nosuch", "--over init=nosuch: init.method=nosuch: no plugin named 'nosuch'"),
        ("init=spherical,mask", "plugin 'mask' has no init_embeddings hook"),
        ("lr=1e-3,0.001", "are the same value"),
        ("lr", "must be key=value1,value2"),
        ("lr=1e-3,,2e-3", "comma-separated values"),
        ("output_dir=a,b", "--output-dir"),
    ],
)
def test_bad_over_is_one_line_exit_2_before_any_child(tiny_model, texts, over, message):
    result = sweep(["--over", over, "--no-progress", *set_args(tiny_model, texts)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("wakelab: error:") and message in line, line
    assert runs_in_store() == []


def test_bad_constituents_stop_the_sweep_before_any_child(tiny_model, texts, tmp_path):
    missing = sweep(
        ["--over", "lr=1e-3,2e-3", "--constituents", str(tmp_path / "none.tsv"), *set_args(tiny_model, texts)]
    )
    assert missing.exit_code == 2 and "constituents file not found" in missing.output
    other = tmp_path / "other.tsv"
    other.write_text("zzz\tbird\tbird song\n")
    unrelated = sweep(["--over", "lr=1e-3,2e-3", "--constituents", str(other), *set_args(tiny_model, texts)])
    assert unrelated.exit_code == 2 and "none of its 1 words is in the lexicon" in unrelated.output
    assert runs_in_store() == []


def test_taken_output_folders_need_overwrite(tiny_model, texts, tmp_path):
    (tmp_path / "out" / "lr=0.001").mkdir(parents=True)
    (tmp_path / "out" / "lr=0.001" / "wakelab_run.json").write_text("{}")
    base = build_config(None, None, tiny_overrides(tiny_model, texts))
    with pytest.raises(ConfigError, match="already holds a run.*--overwrite"):
        plan_sweep(base, "lr=0.001,0.002")
    plan = plan_sweep(base, "lr=0.001,0.002", overwrite=True)
    assert [c.config.train.lr for c in plan.children] == [0.001, 0.002]
    assert [c.output_dir.name for c in plan.children] == ["lr=0.001", "lr=0.002"]


def test_plan_validates_every_child_and_keeps_the_rest_of_the_config(tiny_model, texts):
    base = build_config(None, None, tiny_overrides(tiny_model, texts, **{"train.lr": 0.02}))
    plan = plan_sweep(base, "init=mean,subword")
    assert [c.config.init.method for c in plan.children] == ["mean", "subword"]
    assert all(c.config.train.lr == 0.02 for c in plan.children)
    assert [c.config.tracking.run_name for c in plan.children] == ["init=mean", "init=subword"]
    assert plan.constituents == {}  # not the demo lexicon, no file given


def test_constituents_reach_every_child_unless_its_config_names_its_own(tiny_model, texts, tmp_path):
    given = constituents_file(tmp_path)
    own = tmp_path / "own.tsv"
    own.write_text("riverrun\triver\triver run\n")
    base = build_config(None, None, tiny_overrides(tiny_model, texts))
    plan = plan_sweep(base, "init=mean,subword", constituents=given)
    assert {c.config.init.constituents for c in plan.children} == {str((tmp_path / "constituents.tsv").resolve())}
    assert plan.base.init.constituents == plan.children[0].config.init.constituents  # sweep.json records it

    lines: list[str] = []
    kept = build_config(None, None, tiny_overrides(tiny_model, texts, **{"init.constituents": str(own)}))
    plan = plan_sweep(kept, "init=mean,subword", constituents=given, log=lines.append)
    assert {c.config.init.constituents for c in plan.children} == {str(own)}
    assert plan.constituents_path.name == "constituents.tsv" and len(plan.constituents) == 3  # the hit rates' file
    (note,) = [line for line in lines if line.startswith("note:")]
    assert "2 of 2 children keep their own init.constituents" in note and "own.tsv" in note

    lines.clear()
    swept = plan_sweep(base, [f"init.constituents={own},{given}"], constituents=given, log=lines.append)
    assert [c.config.init.constituents for c in swept.children] == [str(own), given]  # the swept key wins
    assert any("1 of 2 children keep their own" in line for line in lines)


def test_resume_plans_the_children_with_the_sweep_flag_constituents(tiny_model, texts, tmp_path):
    from wakelab.cli.options import ConfigOptions
    from wakelab.cli.sweep import _resumed_plan
    from wakelab.sweep.resume import save_sweep_file

    given = constituents_file(tmp_path)
    base = build_config(None, None, tiny_overrides(tiny_model, texts, output_dir=str(tmp_path / "sw")))
    plan = plan_sweep(base, "init=mean,subword", constituents=given)
    save_sweep_file(plan, "parent123", "1")
    again, saved = _resumed_plan(str(tmp_path / "sw"), (), ConfigOptions(), None, False)  # sweep --resume sw
    assert saved.parent_run_id == "parent123" and len(again.constituents) == 3
    assert [c.config.init.constituents for c in again.children] == [c.config.init.constituents for c in plan.children]
    assert again.children[0].config.init.constituents == str((tmp_path / "constituents.tsv").resolve())

    # The demo's file, found through the demo lexicon (no --constituents): resumed, the children's config is unchanged.
    demo = build_config("demo", None, {"output_dir": str(tmp_path / "sw2")})
    plan = plan_sweep(demo, "init=mean,subword")
    assert plan.constituents_path is not None and [c.config.init.constituents for c in plan.children] == [None, None]
    save_sweep_file(plan, "parent456", "1")
    again, _ = _resumed_plan(str(tmp_path / "sw2"), (), ConfigOptions(), None, False)
    assert again.constituents == plan.constituents
    assert [c.config.init.constituents for c in again.children] == [None, None]


def test_parse_over():
    assert parse_over("init=spherical,mean") == ("init", ["spherical", "mean"])
    assert parse_over(" lr = 1e-3, 5e-3 ") == ("lr", ["1e-3", "5e-3"])
    assert split_values("[a,b],[c],d") == ["[a,b]", "[c]", "d"]
    assert split_values("'x,y',z") == ["'x,y'", "z"]
    with pytest.raises(ConfigError, match="more than once"):
        parse_over("init=mean,mean")


def test_sweep_help_has_an_example():
    result = CliRunner().invoke(main, ["sweep", "--help"])
    assert result.exit_code == 0
    assert "wakelab sweep --over" in result.output.split("Example", 1)[1]


def test_under_mlflow_run_the_parent_is_the_run_it_made(tiny_model, texts, monkeypatch):
    """`mlflow run -e sweep` sets MLFLOW_RUN_ID: that run is the parent, and `mlflow run` closes it, not wakelab."""
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("mlproject")
    outer = client.create_run(experiment).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    result = sweep(["--over", "lr=0.01", "--no-progress", *set_args(tiny_model, texts, **{"train.max_steps": 2})])
    assert result.exit_code == 0, result.output
    import os

    assert os.environ["MLFLOW_RUN_ID"] == outer  # restored after the child
    parent = client.get_run(outer)
    assert parent.info.status == "RUNNING" and parent.data.tags["wakelab.sweep"] == "parent"
    children = [r for r in client.search_runs([experiment]) if r.data.tags.get("mlflow.parentRunId") == outer]
    assert [c.info.status for c in children] == ["FINISHED"]
    assert "comparison/comparison.json" in [a.path for a in client.list_artifacts(outer, "comparison")]


def test_a_child_its_plugins_refuse_stops_the_sweep_before_any_child_runs(tiny_model, texts, tmp_path):
    """The plugins' check_inputs runs for every child up front: the second child's layer is outside the model."""
    args = ["--over", "distill.target_layer=-1,9", "--plugin", "distill", "--output-dir", str(tmp_path / "out")]
    result = sweep([*args, "--no-progress", *set_args(tiny_model, texts, **{"init.method": "distill"})])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line, line
    assert line.startswith("wakelab: error: --over distill.target_layer=9: distill.target_layer=9 is outside"), line
    assert "it has 2 layers" in line
    assert runs_in_store() == [] and not (tmp_path / "out").exists()
