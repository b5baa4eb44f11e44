"""`wakelab analyze`: static analyses, loss, perplexity, recording dynamics and comparisons, logged to MLflow.

Three tiny runs are trained once for the module, in their own MLflow store: a plain one with checkpoints (P) and two
recorded in bf16 (R1, R2). Each test points MLflow at that store and analyses copies or the runs themselves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from conftest import run_store, tiny_overrides
from safetensors.torch import save_file

from wakelab.analysis.dynamics.from_recording import analyse_recording
from wakelab.analysis.report import AnalyzeOptions, compare_runs
from wakelab.cli.main import main
from wakelab.storage import recording

STEPS = 4
STATIC_FILES = {"norms.json", "norms.csv", "norm_histogram.png", "isotropy.json", "isotropy.csv", "isotropy.png",
                "neighbours.json", "neighbours.csv"}  # fmt: skip
DYNAMICS_FILES = {
    f"{name}.{ext}"
    for name in ("displacement", "freeze_verdict", "displacement_per_token", "freeze_onset", "lattice_hops", "centroid")
    for ext in ("json", "csv")
}
DYNAMICS_FILES |= {"recording.json", "displacement_histogram.png", "freeze_onset.png", "lattice_hops.png",
                   "centroid.png"}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_model, texts, tmp_path_factory, empty_mlflow_db):
    common = {"train.max_steps": STEPS, "train.logging_steps": 1, "tracking.log_tokenizer": False}
    specs = {
        "P": {"train.save_steps": 2},
        "R1": {"train.eval_perplexity": False, "recorder.dtype": "bfloat16", "recorder.steps_per_shard": 2},
        "R2": {
            "train.eval_perplexity": False,
            "recorder.dtype": "bfloat16",
            "recorder.steps_per_shard": 2,
            "train.lr": 3e-3,
        },
    }
    for name, extra in specs.items():
        extra.update(common, **{"tracking.run_name": f"run-{name}"})
        if name.startswith("R"):
            extra["plugins"] = ["recorder"]
    specs = {name: tiny_overrides(tiny_model, texts, **extra) for name, extra in specs.items()}
    return run_store(tmp_path_factory.mktemp("analyze-runs"), empty_mlflow_db, specs)


@pytest.fixture
def store(runs, monkeypatch):
    """Point MLflow at the module's store (the autouse fixture gave each test an empty one)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs["uri"])
    mlflow.set_tracking_uri(runs["uri"])
    return runs


def invoke(*args):
    result = CliRunner().invoke(main, ["analyze", *map(str, args)])
    if result.exit_code not in (0, 2):
        import traceback

        traceback.print_exception(*result.exc_info)
    return result


def artifacts(run_id: str, path: str = "analysis") -> set[str]:
    client, found, todo = mlflow.MlflowClient(), set(), [path]
    while todo:
        for item in client.list_artifacts(run_id, todo.pop()):
            (todo.append(item.path) if item.is_dir else found.add(item.path))
    return found


def names_in(found: set[str], folder: str) -> set[str]:
    return {Path(p).name for p in found if str(Path(p).parent) == folder}


# ----------------------------------------------------------------------------------------------------------------------
# Static analyses, loss and perplexity


def test_analyze_logs_plots_tables_and_metrics(store):
    run = store["P"]
    result = invoke(run.output_dir, "--probe", "riverrun", "--probe", "moonbrook", "--top-k", "3",
                    "--sample-size", "100")  # fmt: skip
    assert result.exit_code == 0, result.output
    logged = artifacts(run.run_id)
    assert STATIC_FILES | {"perplexity.json", "perplexity.csv"} <= names_in(logged, "analysis/final")
    assert {"loss_curve.png", "loss_curve.json", "loss_curve.csv"} <= names_in(logged, "analysis/loss")
    assert "analysis/summary.txt" in logged

    local = run.output_dir / "analysis"
    neighbours = json.loads((local / "final" / "neighbours.json").read_text())
    for probe in ("riverrun", "moonbrook"):
        for pool in ("base", "new"):
            hits = [r for r in neighbours if r["probe"] == probe and r["pool"] == pool]
            assert [r["rank"] for r in hits] == [1, 2, 3]
            assert all(isinstance(r["neighbour"], str) for r in hits)
            assert hits == sorted(hits, key=lambda r: -r["cosine"])
    assert (local / "final" / "neighbours.csv").read_text().startswith("probe,probe_id,pool,rank,neighbour")
    norms = {r["group"]: r for r in json.loads((local / "final" / "norms.json").read_text())}
    assert norms["new"]["count"] == 8 and norms["base"]["count"] == norms["all"]["count"] - 8
    iso = {r["group"]: r for r in json.loads((local / "final" / "isotropy.json").read_text())}
    assert iso["base"]["sample_size"] == 100 and iso["new"]["sample_size"] == 8
    assert iso["base"]["ci_low"] <= iso["base"]["mean_cosine"] <= iso["base"]["ci_high"]

    data = mlflow.MlflowClient().get_run(run.run_id).data
    metrics = data.metrics
    for name in (
        "norms/new/mean",
        "norms/base/q50",
        "isotropy/new/mean_cosine",
        "isotropy/base/ci_low",
        "neighbours/base_top1_cosine_mean",
        "perplexity/before",
        "perplexity/after",
    ):
        assert f"analysis/{name}" in metrics, name
    # Recomputed from the initial and the final state: the same numbers the run logged while training.
    assert metrics["analysis/perplexity/before"] == pytest.approx(metrics["heldout_perplexity_before"], rel=1e-4)
    assert metrics["analysis/perplexity/after"] == pytest.approx(metrics["heldout_perplexity_after"], rel=1e-4)
    history = mlflow.MlflowClient().get_metric_history(run.run_id, "analysis/norms/new/mean")
    assert [m.step for m in history] == [STEPS], "metrics of the final state are logged at the final step"
    loss = json.loads((local / "loss" / "loss_curve.json").read_text())
    assert [r["step"] for r in loss] == list(range(1, STEPS + 1))
    assert mlflow.get_run(run.run_id).info.status == "FINISHED"
    assert "perplexity held-out" in result.stdout and "isotropy" in result.stdout


def test_unknown_probe_is_reported_and_the_others_analysed(store):
    run = store["P"]
    result = invoke(run.output_dir, "--probe", "zzxqwv", "--probe", "smirtle", "--no-eval", "--no-mlflow",
                    "--out", store["root"] / "probe-out")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "probe 'zzxqwv' is not in the vocabulary" in result.stderr
    neighbours = json.loads((store["root"] / "probe-out" / "final" / "neighbours.json").read_text())
    assert {r["probe"] for r in neighbours} == {"smirtle"}
    assert {r["pool"] for r in neighbours} == {"base", "new"}
    # --no-eval reports what the run logged.
    rows = json.loads((store["root"] / "probe-out" / "final" / "perplexity.json").read_text())
    assert {r["when"] for r in rows} == {"before", "after"} and all(r["logged"] for r in rows)


def test_checkpoint_and_initial_states_go_to_their_own_folders(store):
    run = store["P"]
    client = mlflow.MlflowClient()
    result = invoke(run.output_dir, "--checkpoint", "2", "--no-eval", "--nested")
    assert result.exit_code == 0, result.output
    (child,) = client.search_runs([run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'")
    assert child.info.status == "FINISHED"
    assert STATIC_FILES <= names_in(artifacts(child.info.run_id), "analysis/checkpoint-2")
    assert [m.step for m in client.get_metric_history(child.info.run_id, "analysis/norms/new/mean")] == [2]

    initial = invoke(run.output_dir, "--initial", "--no-eval", "--no-mlflow")
    assert initial.exit_code == 0, initial.output
    assert "state initial (step 0)" in initial.stdout
    first = json.loads((run.output_dir / "analysis" / "initial" / "norms.json").read_text())
    final = json.loads((run.output_dir / "analysis" / "checkpoint-2" / "norms.json").read_text())
    assert first[2]["mean"] != final[2]["mean"], "the new rows moved between init and step 2"

    bad = invoke(run.output_dir, "--checkpoint", "3")
    assert bad.exit_code == 2 and "no complete checkpoint" in bad.stderr and "checkpoint-2" in bad.stderr


def test_run_unknown_to_mlflow_gets_a_new_run_and_the_loss_from_trainer_state(runs, tmp_path):
    """No `store` fixture: this test's MLflow store is empty, and the copy's run id is in no store at all."""
    copy = tmp_path / "copied-run"
    shutil.copytree(runs["P"].output_dir, copy, ignore=shutil.ignore_patterns("analysis"))
    (copy / "wakelab_run.json").write_text(json.dumps({"run_id": "0" * 32}))
    result = invoke(copy, "--no-static")
    assert result.exit_code == 0, result.output
    assert "not in the MLflow tracking store" in result.stderr
    assert "trainer_state.json" in result.stdout
    loss = json.loads((copy / "analysis" / "loss" / "loss_curve.json").read_text())
    assert [r["step"] for r in loss] == list(range(1, STEPS + 1))
    (new,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert new.data.tags["wakelab.analysis.kind"] == "analysis" and new.info.status == "FINISHED"
    assert {"loss_curve.png", "loss_curve.csv"} <= names_in(artifacts(new.info.run_id), "analysis/loss")


# ----------------------------------------------------------------------------------------------------------------------
# Dynamics of a recording


def test_recording_dynamics_are_logged(store):
    run = store["R1"]
    result = invoke(run.run_id, "--no-static", "--recording")  # by MLflow run id: the recording from its tag
    assert result.exit_code == 0, result.output
    logged = artifacts(run.run_id)
    assert DYNAMICS_FILES <= names_in(logged, "analysis/dynamics")
    local = run.output_dir / "analysis" / "dynamics"
    onset = json.loads((local / "freeze_onset.json").read_text())
    assert [r["step"] for r in onset] == list(range(1, STEPS + 1))
    hops = json.loads((local / "lattice_hops.json").read_text())
    assert [r["step"] for r in hops] == list(range(1, STEPS + 1))
    assert sum(r["coords_moved"] for r in hops) > 0
    (verdict,) = json.loads((local / "freeze_verdict.json").read_text())
    assert verdict["group"] == "all tracked rows" and verdict["frozen"] is False
    per_token = (local / "displacement_per_token.csv").read_text().splitlines()
    assert per_token[0].startswith("row,token_id") and len(per_token) == 1 + 8

    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(run.run_id, "analysis/dynamics/unchanged_share")]
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert client.get_run(run.run_id).data.tags["wakelab.analysis.recording_cut_short"] == "false"
    assert "freeze verdict (all tracked rows, n=8): not frozen" in result.stdout
    # The recorder's masks (tokens seen in the corpus) say every new token trained: the verdict falls back to all rows.
    assert "none of the tracked rows is untrained" in result.stdout
    assert "per unit of summed lr) = common drift" in result.stdout
    motion = json.loads((local / "group_motion.json").read_text())
    assert [r["step"] for r in motion] == list(range(0, STEPS + 1)) and motion[-1]["raw_per_lr"] > 0

    again = invoke(run.output_dir, "--no-static", "--no-mlflow", "--recording", "--from-step", "2", "--to-step", "9")
    assert again.exit_code == 2 and "--to-step 9 is not a recorded step" in again.stderr


def test_recording_trajectory_page_table_and_image_frames(store):
    run = store["R2"]
    result = invoke(run.output_dir, "--no-static", "--recording", "--tokens", "top:3")
    assert result.exit_code == 0, result.output
    logged = artifacts(run.run_id)
    assert {"trajectory.html", "trajectory.gif", "tokens.csv", "tokens_table.json"} <= names_in(
        logged, "analysis/trajectory"
    )
    frames = {p for p in artifacts(run.run_id, "images") if p.endswith(".png")}
    assert len(frames) == STEPS + 1  # the starting state and every recorded step: the UI's image slider
    drawn = json.loads((run.output_dir / "analysis" / "trajectory" / "trajectory.json").read_text())
    assert drawn["tracked"] == 3 and drawn["untracked_as_density"] == 5 and drawn["frames"] == STEPS + 1
    table = (run.output_dir / "analysis" / "trajectory" / "tokens.csv").read_text().splitlines()
    assert table[0].startswith("word,token_id,corpus_frequency") and len(table) == 1 + 8
    assert "trajectory 3 of 8 new rows over 5 frames" in result.stdout


def test_recording_without_embeddings_names_the_recorder_setting(store, tmp_path):
    with recording.RecordingWriter(tmp_path / "rec", {"loss": recording.FieldSpec((), torch.float32)},
                                   token_ids=[0]) as writer:  # fmt: skip
        writer.append(0, {"loss": torch.tensor(1.0)})
    result = invoke(store["R1"].output_dir, "--no-static", "--no-mlflow", "--recording", tmp_path / "rec")
    assert result.exit_code == 2 and "no embeddings" in result.stderr and "recorder.fields" in result.stderr


def test_missing_recording_is_a_clear_error(store):
    result = invoke(store["P"].output_dir, "--recording")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("wakelab: error:") and "has no recording" in line
    assert "wakelab run --plugin recorder" in line
    assert "Traceback" not in result.output
    assert not (store["P"].output_dir / "analysis" / "dynamics").exists()


def test_truncated_recording_is_analysed_with_a_note(store, tmp_path):
    run = store["R1"]
    cut = tmp_path / "cut-short"
    shutil.copytree(run.output_dir / "recording", cut)
    index = json.loads((cut / "index.json").read_text())
    dropped = index["shards"].pop()  # the shard the writer never finished
    (cut / dropped["file"]).unlink()
    index["complete"] = False
    (cut / "index.json").write_text(json.dumps(index))

    result = invoke(run.output_dir, "--no-static", "--recording", cut)
    assert result.exit_code == 0, result.output
    assert "CUT SHORT" in result.stdout and "recording cut short" in result.stdout
    assert "was cut short" in result.stderr
    last = index["shards"][-1]["last_step"]
    onset = json.loads((run.output_dir / "analysis" / "dynamics-cut-short" / "freeze_onset.json").read_text())
    assert onset[-1]["step"] == last < STEPS
    assert mlflow.MlflowClient().get_run(run.run_id).data.tags["wakelab.analysis.recording_cut_short"] == "true"
    assert DYNAMICS_FILES <= names_in(artifacts(run.run_id), "analysis/dynamics-cut-short")


def test_masks_split_trained_from_untrained_rows(store, tmp_path):
    copy = tmp_path / "recording"
    shutil.copytree(store["R1"].output_dir / "recording", copy)
    with recording.open(copy) as rec:
        ids = rec.token_ids
    # Rows 0-2 "trained" (given as vocabulary token ids); the rest untrained.
    save_file({"trained_indices": torch.tensor(ids[:3])}, str(copy / "masks.safetensors"))
    result = analyse_recording(copy)
    assert result.displacement_summary["trained"]["count"] == 3
    assert result.displacement_summary["untrained"]["count"] == 5
    assert result.freeze["group"] == "untrained" and result.freeze["count"] == 5
    assert all(r["count"] == 5 for r in result.centroid)
    assert "untrained_unchanged_share" in result.freeze_onset[0]
    motion = result.motion  # the untrained rows' displacement: common drift + motion relative to it, per unit lr
    assert len(motion["raw"]) == len(result.steps) and motion["raw"][0] == 0.0
    assert motion["raw"][-1] == pytest.approx(float(result.displacement[result.masks.untrained].mean()), rel=1e-5)
    assert motion["drift"][-1] <= motion["raw"][-1] and motion["relative"][-1] <= motion["raw"][-1]
    assert motion["raw_per_lr"][-1] == pytest.approx(motion["raw"][-1] / motion["lr_sum"][-1])
    # Over a large threshold, the untrained rows count as frozen.
    assert analyse_recording(copy, freeze_threshold=1e3).freeze["frozen"] is True


def test_dynamics_functions_accept_zero_rows():
    """A mask that selects no rows (e.g. no untrained token among the tracked ones) is not an error."""
    from wakelab.analysis.dynamics.steps import displacement, freeze_onset, lattice_hops

    empty = torch.zeros(0, 4, dtype=torch.bfloat16)
    assert displacement(empty, empty).shape == (0,)
    assert freeze_onset([empty, empty])[0]["rows"] == 0
    assert lattice_hops([empty, empty], [empty] * 2, [empty] * 2, 1e-3, [1, 2])[0]["rows_moved"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# Comparison and help


def test_comparison_draws_two_runs_on_one_plot(store):
    r1, r2 = store["R1"], store["R2"]
    report = compare_runs([str(r1.output_dir), str(r2.output_dir)], AnalyzeOptions(recording=""))
    for name in ("loss_curves", "displacement_per_step", "freeze_onset"):
        (ax,) = report.figures[name].axes
        assert len(ax.get_lines()) == 2, name
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["run-R1", "run-R2"]
    client = mlflow.MlflowClient()
    comparison = client.get_run(report.run_id)
    assert comparison.data.tags["wakelab.analysis.kind"] == "comparison"
    assert comparison.data.tags["wakelab.analysis.compared_runs"] == f"{r1.run_id},{r2.run_id}"
    assert comparison.info.status == "FINISHED"
    logged = names_in(artifacts(report.run_id), "analysis/comparison")
    assert {
        "loss_curves.png",
        "loss_curves.json",
        "loss_curves.csv",
        "displacement_per_step.png",
        "freeze_onset.png",
        "runs.json",
        "runs.csv",
        "dynamics_per_step.csv",
    } <= logged
    assert client.get_run(r1.run_id).data.tags["wakelab.analysis.comparison_run"] == report.run_id

    cli = invoke(r1.output_dir, r2.output_dir)
    assert cli.exit_code == 0, cli.output
    assert "comparison of 2 runs: run-R1, run-R2" in cli.stdout


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["analyze", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "wakelab analyze" in result.output.split("Example", 1)[1]


def test_every_analyze_option_is_a_field_of_analyze_options_and_back():
    """The command hands its options on by name: a new option without a field (or a field without an option)
    fails here instead of being dropped on the way."""
    import dataclasses

    from wakelab.cli.analyze import NEGATED, analyze

    options = {NEGATED.get(p.name, p.name) for p in analyze.params} - {"runs"}
    assert options == {f.name for f in dataclasses.fields(AnalyzeOptions)}


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give a run to analyse"),
        (["runs/x", "--initial", "--checkpoint", "3"], "--initial and --checkpoint choose different states"),
        (["runs/x", "--from-step", "3"], "--from-step/--to-step choose steps of a recording; add --recording"),
    ],
)
def test_analyze_refuses_contradictory_options_in_one_line(args, message):
    result = CliRunner().invoke(main, ["analyze", *args])
    assert result.exit_code == 2 and message in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
