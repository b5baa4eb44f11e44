"""The Wordybird question as one sweep: precision x schedule from one checkpoint, compared on the parent, a verdict."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from click.testing import CliRunner

from wakelab.analysis.dynamics.groups import freeze_onset_step, split_displacement
from wakelab.analysis.precision import verdict
from wakelab.cli.main import main
from wakelab.config import build_config
from wakelab.errors import ConfigError
from wakelab.run import engine
from wakelab.sweep.plan import plan_sweep

TINY_GPT2 = "{model_type: gpt2, vocab_size: 400, n_embd: 16, n_layer: 1, n_head: 2, n_positions: 32}"


def _tiny(tiny_model, texts) -> dict[str, str]:
    return {
        "model.architecture": TINY_GPT2,
        "model.tokenizer": str(tiny_model),
        "data.corpus": str(texts["corpus"]),
        "data.seq_len": 16,
        "train.batch_size": 4,
        "train.save_steps": 10,
        "recorder.rows": "all",
    }


def test_precision_by_schedule_sweep_logs_the_comparison_and_a_verdict(tiny_model, texts):
    values = {**_tiny(tiny_model, texts), "train.max_steps": 10, "output_dir": "wb1"}
    engine.run(build_config("wordybird", None, [f"{k}={v}" for k, v in values.items()]), progress=False)
    args = [
        "sweep",
        "--preset",
        "wordybird_precision",
        "--no-progress",
        "--output-dir",
        "wbp",
        "--over",
        "train.precision=bf16,fp32-master,stochastic,kahan",
        "--over",
        "train.scheduler=linear,constant",
    ]
    for key, value in {**_tiny(tiny_model, texts), "train.max_steps": 16}.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "The Wordybird question" in result.output and "Verdict:" in result.output

    client = mlflow.MlflowClient()
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parent = next(r for r in runs if r.data.tags.get("wakelab.sweep") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(
        f"train.precision={p},train.scheduler={s}"
        for p in ("bf16", "fp32-master", "stochastic", "kahan")
        for s in ("linear", "constant")
    )
    sentence = parent.data.tags["wakelab.precision.verdict"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/precision.md", "comparison/precision.json", "comparison/untrained_motion.png"} <= artifacts

    report = json.loads(open("wbp/comparison/precision.json").read())
    assert report["verdict"] == sentence
    rows = {(r["precision"], r["scheduler"]): r for r in report["children"]}
    assert len(rows) == 8 and all(r["steps"] == "10..16" for r in rows.values())
    for row in rows.values():
        assert row["raw"] >= row["relative"] >= 0 and row["raw_per_lr"] > row["raw"]  # 6 steps: Σlr < 6e-3
        assert 0 <= row["rounded_away_share"] <= 1 and row["final_loss"] > 0
    # A constant rate spends more learning rate than the decay from the same start: per-lr figures say so.
    assert (
        rows[("bf16", "constant")]["raw"] / rows[("bf16", "constant")]["raw_per_lr"]
        > rows[("bf16", "linear")]["raw"] / rows[("bf16", "linear")]["raw_per_lr"]
    )
    assert sentence == verdict(report["children"])


def _row(precision, scheduler, changed):
    return {"precision": precision, "scheduler": scheduler, "late_changed_share": changed, "moving": changed >= 0.01}


def test_verdict_separates_schedule_from_rounding():
    frozen_all = [
        _row(p, s, 0.0) for p in ("bf16", "fp32-master", "stochastic", "kahan") for s in ("linear", "constant")
    ]
    assert "property of learning" in verdict(frozen_all)
    schedule = [_row("bf16", "linear", 0.0), _row("bf16", "constant", 0.4), _row("kahan", "linear", 0.0)]
    assert verdict(schedule).endswith("the freeze follows the schedule")
    rounding = [
        _row("bf16", "linear", 0.0),
        _row("bf16", "constant", 0.0),
        _row("fp32-master", "linear", 0.3),
        _row("stochastic", "linear", 0.0),
    ]
    assert verdict(rounding).startswith("only fp32-master keep them moving") and "rounding" in verdict(rounding)
    assert verdict([_row("bf16", "linear", 0.2)]).startswith("no freeze to explain")
    assert verdict([_row("bf16", "linear", 0.2), _row("kahan", "linear", 0.25)]).endswith("in bf16 at the end")
    partial = [_row("bf16", "linear", 0.408), _row("fp32-master", "linear", 0.95), _row("kahan", "linear", 0.947)]
    assert verdict(partial) == (
        "no freeze to explain: under the linear decay 40.8% of the untrained rows still change per step in bf16 at "
        "the end; but rounding holds part of them still: under the same schedule fp32-master, kahan keep 94.7%-95.0% "
        "changing"
    )
    assert verdict([_row("kahan", "linear", 0.2)]).startswith("no verdict")
    only_constant = [_row("bf16", "constant", 0.0), _row("kahan", "constant", 0.3)]
    assert verdict(only_constant) == (
        "only kahan keep them moving (under the constant schedule bf16 freezes them "
        "(0.0% change per step at the end)): the freeze is rounding"
    )


def test_displacement_splits_into_common_drift_and_relative_motion():
    start = torch.zeros(4, 2)
    slid = start + torch.tensor([3.0, 4.0])  # the whole group slides together: all drift, no relative motion
    assert split_displacement(start, slid) == {"raw": 5.0, "drift": 5.0, "relative": 0.0}
    spread = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert split_displacement(start, spread) == {"raw": 1.0, "drift": 0.0, "relative": 1.0}
    motion = {"steps": [0, 1, 2, 3, 4], "unchanged_share": [None, 0.5, 1.0, 0.4, 1.0]}
    assert freeze_onset_step(motion) == 4 and freeze_onset_step({**motion, "unchanged_share": [None] * 5}) is None


def test_a_key_swept_twice_is_a_one_line_error():
    base = build_config("wordybird_precision")
    with pytest.raises(ConfigError, match=r"--over train.precision: the key is swept twice; give its values in one"):
        plan_sweep(base, ["train.precision=bf16,kahan", "train.precision=stochastic"])


def test_the_recorder_keeps_fp32_masters_and_the_analysis_reads_them(tiny_model, texts):
    from wakelab.analysis.dynamics.groups import group_motion
    from wakelab.storage.recording import open as open_recording

    values = {
        **_tiny(tiny_model, texts),
        "train.max_steps": 8,
        "train.precision": "fp32-master",
        "train.lr": 1e-4,
        "recorder.fields": "[embeddings, master, lr]",
        "output_dir": "wb",
    }
    result = engine.run(build_config("wordybird", None, [f"{k}={v}" for k, v in values.items()]), progress=False)
    rec = open_recording(result.output_dir / "recording")
    assert rec.fields["master"].dtype == torch.float32 and rec.fields["embeddings"].dtype == torch.bfloat16
    assert torch.equal(rec["master"].at_step(0), rec["embeddings"].at_step(0).float())  # before the first step
    # The model's bf16 rows are the masters rounded to nearest.
    assert torch.equal(rec["master"].at_step(8).to(torch.bfloat16), rec["embeddings"].at_step(8))
    motion = group_motion(rec)
    assert motion["master_raw"][-1] > 0 and len(motion["master_relative_per_lr"]) == 9
    rec.close()


def test_the_same_question_for_new_bf16_rows(tiny_model, texts):
    """P1-style rows (`tokens`, bf16 rows on an fp32 base): a sweep over the setting compares how they learn."""
    from conftest import tiny_overrides

    args = [
        "sweep",
        "--no-progress",
        "--output-dir",
        "rows",
        "--plugin",
        "recorder",
        "--over",
        "train.precision=bf16,fp32-master,stochastic,kahan",
    ]
    for key, value in tiny_overrides(
        tiny_model, texts, **{"train.rows_dtype": "bfloat16", "train.max_steps": 4, "train.lr": 1e-4}
    ).items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(open("rows/comparison/precision.json").read())
    rows = {r["precision"]: r for r in report["children"]}
    assert set(rows) == {"bf16", "fp32-master", "stochastic", "kahan"}
    assert all(r["group"] == "all tracked rows" and r["group_rows"] == 8 for r in rows.values())
    # lr 1e-4 on rows of norm ~0.17: round-to-nearest drops some updates that every remedy keeps.
    assert rows["bf16"]["rounded_away_share"] > 0
    assert all(rows[p]["raw"] > 0 for p in rows)
    assert "cosine schedule" in report["verdict"]  # no schedule axis: the verdict reads the one schedule swept
