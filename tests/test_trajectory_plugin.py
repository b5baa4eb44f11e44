"""The live `trajectory` plugin and the meaning probe, on the tiny model: what reaches MLflow, and whether the probe
tells a planted substitute word from an untrained one."""

from __future__ import annotations

import csv
import json
import random

import pytest

from wakelab.testing import WORDS, run_with_plugins


def _artifacts(client, run_id, path=""):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_plugin_logs_frames_page_gif_and_table(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    result = run_with_plugins(["trajectory", "recorder"], tmp_path, {"trajectory.every": 2, "trajectory.backdrop": 50})
    client = MlflowClient()
    # The run's texts are its datasets (the runs table's Dataset column), with digests and counts.
    inputs = client.get_run(result.run_id).inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs}
    assert set(contexts) == {"training", "evaluation", "lexicon"}
    assert json.loads(contexts["training"].profile)["tokens"] > 0 and len(contexts["lexicon"].digest) == 8
    assert json.loads(contexts["lexicon"].profile)["added_tokens"] == 8
    assert any(name.startswith("system/") for name in client.get_run(result.run_id).data.metrics), "system metrics"
    assert mlflow.active_run() is None
    files = _artifacts(client, result.run_id)
    for name in ("trajectory.html", "trajectory.gif", "tokens.csv", "tokens_table.json", "trajectory.json"):
        assert f"trajectory/{name}" in files
    frames = [f for f in files if f.startswith("images/trajectory")]
    assert len([f for f in frames if f.endswith(".png")]) == 4  # steps 0, 2, 4, 6: the UI's image step slider
    with open(result.output_dir / "trajectory" / "tokens.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and {"riverrun", "moonbrook"} <= {r["word"] for r in rows}
    assert all(int(r["corpus_frequency"]) > 0 for r in rows) and all(r["neighbours_end"] for r in rows)
    metrics = client.get_run(result.run_id).data.metrics
    assert "trajectory_mean_displacement" in metrics and metrics["trajectory_mean_displacement"] > 0


def test_plugin_can_be_switched_off(tmp_path):
    from mlflow import MlflowClient

    result = run_with_plugins(["trajectory", "recorder"], tmp_path, {"trajectory.enabled": False})
    assert not (result.output_dir / "trajectory").exists()
    client = MlflowClient()
    files = _artifacts(client, result.run_id)
    assert files and not [f for f in files if f.startswith(("trajectory/", "images/trajectory"))], files
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics and not [m for m in metrics if m.startswith(("trajectory", "analysis/probe"))], sorted(metrics)
    assert any(f.startswith("recording") for f in files) or (result.output_dir / "recording").is_dir()  # the run ran


def _planted_texts(folder, seed=0, sentences=400):
    """'glimmerous' stands where 'water' would (always right after 'over') in the corpus; the held-out text has
    'water' there. 'smirtle' never occurs: its row stays untrained."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w not in ("water", "over")]
    corpus, heldout = [], []
    for i in range(sentences):
        line = [rng.choice(words) for _ in range(rng.randint(5, 9))]
        at = rng.randint(1, len(line))
        (corpus if i < sentences * 3 // 4 else heldout).append((line, at))
    corpus_text = "\n".join(" ".join(w[:a] + ["over", "glimmerous"] + w[a:]).capitalize() + "." for w, a in corpus)
    heldout_text = "\n".join(" ".join(w[:a] + ["over", "water"] + w[a:]).capitalize() + "." for w, a in heldout)
    (folder / "corpus.txt").write_text(corpus_text + "\n")
    (folder / "heldout.txt").write_text(heldout_text + "\n")
    (folder / "lexicon.txt").write_text("glimmerous\nsmirtle\n")
    (folder / "constituents.tsv").write_text("glimmerous\twater\tglim water\nsmirtle\tbridge\tsmirk turtle\n"
                                             "notnew\triver\triv er\n")  # fmt: skip
    return folder


def test_probe_separates_a_planted_substitute_from_an_untrained_word(tmp_path, capsys):
    texts = _planted_texts(tmp_path)
    result = run_with_plugins(["trajectory", "recorder"], tmp_path, {
        "data.corpus": str(texts / "corpus.txt"), "data.heldout": str(texts / "heldout.txt"),
        "vocab.lexicon": str(texts / "lexicon.txt"), "init.constituents": str(texts / "constituents.tsv"),
        "train.max_steps": 30, "train.lr": 5e-2, "trajectory.every": 10, "trajectory.gif": False,
        "trajectory.probe_contexts": 8, "recorder.fields": "embeddings", "recorder.every": 5,
    })  # fmt: skip
    probe = json.loads((result.output_dir / "trajectory" / "probe.json").read_text())
    planted, untrained = probe["after"]["glimmerous"], probe["after"]["smirtle"]
    assert planted["substitution"] > probe["before"]["glimmerous"]["substitution"] + 1.0
    assert planted["substitution"] > untrained["substitution"] + 1.0
    assert 0 <= planted["kl"] < untrained["kl"]
    assert "notnew" in capsys.readouterr().err  # constituents words that are not new tokens are reported
    from mlflow import MlflowClient

    metrics = MlflowClient().get_run(result.run_id).data.metrics
    assert {"probe_kl_before", "probe_kl_after", "probe_substitution_after"} <= set(metrics)
    with open(result.output_dir / "trajectory" / "tokens.csv", newline="") as handle:
        rows = {r["word"]: r for r in csv.DictReader(handle)}
    assert rows["smirtle"]["corpus_frequency"] == "0" and rows["glimmerous"]["substitution_after"] != ""

    # From the recording: the probe at recorded steps (the recorded rows put back into the model), as metric histories.
    from wakelab.analysis.report import AnalyzeOptions, analyze_run

    analyze_run(str(result.output_dir), AnalyzeOptions(static=False, recording=""), warn=lambda m: None)
    history = MlflowClient().get_metric_history(result.run_id, "analysis/probe_substitution")
    by_step = {m.step: m.value for m in history}
    assert sorted(by_step) == [0, 5, 10, 20, 25, 30]  # 7 recorded steps, evenly thinned to PROBE_STEPS=6
    assert by_step[30] > by_step[0] + 1.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sample:0", "K must be a whole number"),
        ("top:3", "top movers are known only once training is over"),
        ("nofile.txt", "not auto, all, sample:K or an existing words file"),
    ],
)
def test_bad_token_choice_stops_before_anything_is_written(tmp_path, spec, message):
    from wakelab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        run_with_plugins(["trajectory"], tmp_path, {"trajectory.tokens": spec})
    assert not (tmp_path / "out").exists()


def test_tracked_words_file_matching_no_new_token_is_one_line(tmp_path):
    from wakelab.errors import WakelabError

    words = tmp_path / "words.txt"
    words.write_text("notaword\nalsonot\n")
    with pytest.raises(WakelabError) as caught:
        run_with_plugins(["trajectory"], tmp_path, {"trajectory.tokens": str(words), "train.max_steps": 2})
    message = str(caught.value)
    assert "\n" not in message and f"words file {words}: none of its 2 words is a new token of this run" in message
    assert not (tmp_path / "out" / "trajectory").exists()


def test_page_carries_meaning_words_and_both_projections(tmp_path, capsys):
    texts = _planted_texts(tmp_path)
    result = run_with_plugins(["trajectory"], tmp_path, {
        "data.corpus": str(texts / "corpus.txt"), "data.heldout": str(texts / "heldout.txt"),
        "vocab.lexicon": str(texts / "lexicon.txt"), "init.constituents": str(texts / "constituents.tsv"),
        "train.max_steps": 4, "trajectory.every": 2, "trajectory.gif": False, "trajectory.probe": False,
    })  # fmt: skip
    err = capsys.readouterr().err
    # The constituents word outside the lexicon: one line with the count; the other two are drawn.
    assert "1 of 3 words are not new tokens of this run (not in the lexicon) and get no meaning line: notnew" in err
    described = json.loads((result.output_dir / "trajectory" / "trajectory.json").read_text())
    assert set(described["projections"]) == {"focus", "base"} and described["projection"].startswith("focus")
    assert described["meaning"]["words"] == 2
    assert described["meaning"]["closer"] + described["meaning"]["away"] + described["meaning"]["unchanged"] == 2
    assert (result.output_dir / "trajectory" / "trajectory.npz").is_file()


@pytest.mark.parametrize("neighbours", [True, False])
def test_a_costly_table_search_is_announced_with_the_switch_that_skips_it(tmp_path, capsys, monkeypatch, neighbours):
    from wakelab.plugins import trajectory

    monkeypatch.setattr(trajectory, "TABLE_COST_SAID", 1.0)  # the tiny model's search counts as costly
    result = run_with_plugins(["trajectory"], tmp_path, {
        "train.max_steps": 2, "trajectory.gif": False, "trajectory.probe": False,
        "trajectory.table_neighbours": neighbours,
    })  # fmt: skip
    said = [line for line in capsys.readouterr().err.splitlines() if "per-token table: the nearest base tokens" in line]
    with open(result.output_dir / "trajectory" / "tokens.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if neighbours:
        assert len(said) == 1 and "trajectory.table_neighbours=false leaves those two columns out" in said[0]
        assert all(r["neighbours_end"] for r in rows)
    else:
        assert said == [] and not any(r["neighbours_end"] for r in rows)
