"""``wakelab evaluate``: stylometry on hand-computed answers, class-split perplexity against a direct computation, the
coupled sampler, bad input, and the command end to end on a tiny run with its MLflow contents."""

from __future__ import annotations

import json
import math
import shutil

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import run_store, tiny_overrides

from wakelab.analysis.evaluate import stylometry as sty
from wakelab.analysis.evaluate.report import default_prompts, mark_coined, without_coined
from wakelab.analysis.evaluate.sampling import Sampling, choose, sample
from wakelab.analysis.evaluate.token_classes import class_split, reference_cost, score_positions
from wakelab.cli.main import main

# ----------------------------------------------------------------------------------------------------------------------
# Stylometry: known answers


def test_burrows_delta_matches_a_hand_computed_example():
    # a: .5 .25 .75 (mean .5, sample sd .25) -> z 0 -1 1; b mirrors it -> z 0 1 -1
    texts = {"A": ["a", "a", "b", "b"], "B": ["a", "b", "b", "b"], "C": ["a", "a", "a", "b"]}
    deltas, used = sty.burrows_delta(texts, mfw=2)
    assert used == ["a", "b"]
    assert deltas[("A", "B")] == pytest.approx(1.0)
    assert deltas[("A", "C")] == pytest.approx(1.0)
    assert deltas[("B", "C")] == pytest.approx(2.0)
    assert deltas[("C", "B")] == deltas[("B", "C")]


def test_delta_leaves_out_words_of_equal_frequency_everywhere_and_needs_three_texts():
    texts = {"A": ["x", "a", "b", "b"], "B": ["x", "b", "b", "b"], "C": ["x", "a", "a", "b"]}
    _, used = sty.burrows_delta(texts, mfw=3)
    assert "x" not in used and set(used) == {"a", "b"}  # x is 1/4 of every text: sd 0, no information
    with pytest.raises(ValueError, match="at least 3"):
        sty.burrows_delta({"A": ["a"], "B": ["b"]})


def test_coined_rate_context_share_distinct_and_repetition_on_known_texts():
    coined = {"riverrun"}
    words = sty.words("The riverrun flows; past riverrun!")
    assert words == ["the", "riverrun", "flows", "past", "riverrun"]
    assert sty.coined_rate(words, coined) == pytest.approx(400.0)
    corpus_next = sty.next_words(sty.words("riverrun past eve and adam's"), coined)
    assert corpus_next == {"riverrun": {"past"}}
    share, uses = sty.context_share([sty.words("riverrun past x riverrun eve")], {"riverrun": {"past"}})
    assert (share, uses) == (0.5, 2)
    assert sty.distinct([["a", "b", "a", "b"]], 1) == pytest.approx(0.5)
    assert sty.distinct([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)
    assert sty.repetition_rate([list("abcdabcd")], 4) == pytest.approx(1 - 4 / 5)
    p = sty.profile(["riverrun past the sea"], coined, corpus_next)
    assert p["coined_per_1k"] == 250.0 and p["corpus_context_share"] == 1.0 and p["mean_word_length"] == 4.5


def test_coined_words_are_marked_and_lines_holding_them_left_out_of_ordinary_text():
    marked, found = mark_coined("A Riverrun, then riverrunning.", {"riverrun"})
    assert marked == "A [[Riverrun]], then riverrunning." and found == ["riverrun"]
    assert without_coined("plain line\nthe riverrun here\nanother", {"riverrun"}) == "plain line\nanother"
    assert without_coined("One. A riverrun! Two?", {"riverrun"}) == "One. Two?"
    prompts = default_prompts("one two three four\n\nfive six seven\n\neight nine ten eleven", 2, 2)
    assert prompts == ["one two", "five six"]


# ----------------------------------------------------------------------------------------------------------------------
# A tiny model: class-split perplexity and the sampler


@pytest.fixture(scope="module")
def grown(tiny_model):
    """The tiny base and a copy grown by 3 rows (zero rows: logit 0 in every context), same base rows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    num_base = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(num_base + 3, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[num_base:] = 0.0
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            model.get_output_embeddings().weight[num_base:] = 0.0
    return base, model, num_base


def test_class_split_perplexity_agrees_with_a_direct_computation(grown):
    _, model, num_base = grown
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randint(0, num_base, (20,), generator=g) for _ in range(3)]
    blocks[0][[3, 7, 11]] = torch.tensor([num_base, num_base + 1, num_base + 2])  # new targets at 2, 6, 10
    scores = score_positions(model, blocks, num_base, chunk=7)  # chunks that do not divide the block
    nll, is_new = [], []
    with torch.no_grad():
        for block in blocks:
            logp = torch.log_softmax(model(input_ids=block[None, :-1]).logits[0].double(), dim=-1)
            nll.append(-logp.gather(1, block[1:, None]).squeeze(1))
            is_new.append(block[1:] >= num_base)
    nll, is_new = torch.cat(nll), torch.cat(is_new)
    split = class_split(scores, num_base)
    assert split["new"]["positions"] == 3 and split["base"]["positions"] == 3 * 19 - 3
    assert split["new"]["loss"] == pytest.approx(float(nll[is_new].mean()), rel=1e-5)
    assert split["base"]["loss"] == pytest.approx(float(nll[~is_new].mean()), rel=1e-5)
    assert split["all"]["perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def test_reference_cost_is_the_base_models_perplexity_against_the_grown_one(grown):
    base, model, num_base = grown
    g = torch.Generator().manual_seed(2)
    blocks = [torch.randint(0, num_base, (16,), generator=g) for _ in range(2)]
    cost = reference_cost(score_positions(model, blocks, num_base), num_base)
    direct, mass = [], []
    with torch.no_grad():
        for block in blocks:
            logp = torch.log_softmax(base(input_ids=block[None, :-1]).logits[0].double(), dim=-1)
            direct.append(-logp.gather(1, block[1:, None]).squeeze(1))
            grown_p = torch.softmax(model(input_ids=block[None, :-1]).logits[0].double(), dim=-1)
            mass.append(grown_p[:, num_base:].sum(dim=1))
    assert cost["base_perplexity"] == pytest.approx(math.exp(float(torch.cat(direct).mean())), rel=1e-5)
    assert cost["new_mass_mean"] == pytest.approx(float(torch.cat(mass).mean()), rel=1e-4)
    assert cost["new_mass_mean"] > 0 and cost["trained_perplexity"] > cost["base_perplexity"]  # 3 more rows to share


def test_choose_is_inverse_cdf_in_id_order_with_a_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 3))
    u = torch.tensor([0.1, 0.6, 0.85], dtype=torch.float64)
    assert choose(logits, u, 1.0, 1.0).tolist() == [0, 1, 2]
    assert choose(logits, u, 1.0, 0.7).tolist() == [0, 0, 1]  # nucleus {0, 1}: cdf .625, 1
    assert choose(logits, u, 0.0, 1.0).tolist() == [0, 0, 0]


def test_base_and_grown_sampled_with_one_seed_write_the_same_when_new_rows_are_never_chosen(grown):
    base, model, num_base = grown
    settings = Sampling(temperature=1e-3, top_p=0.95, max_new_tokens=12, seed=5)
    prompt = [5, 17, 42, 9]
    [(a, _)] = sample(base, [prompt], 3, settings)
    [(b, _)] = sample(model, [prompt], 3, settings)
    assert a == b and all(t < num_base for row in b for t in row)
    [(c, _)] = sample(base, [prompt], 3, Sampling(1.0, 1.0, 12, 5))
    [(d, _)] = sample(base, [prompt], 3, Sampling(1.0, 1.0, 12, 5))
    assert c == d and len({tuple(r) for r in c}) > 1  # seeded, and the samples of a prompt differ


# ----------------------------------------------------------------------------------------------------------------------
# The command on a tiny run


@pytest.fixture(scope="module")
def runs(tiny_model, texts, tmp_path_factory, empty_mlflow_db):
    common = {"tracking.log_tokenizer": False, "train.max_steps": 4}
    specs = {name: tiny_overrides(tiny_model, texts, **common, **{"tracking.run_name": f"run-{name}"})
             for name in ("A", "B")}  # fmt: skip
    return run_store(tmp_path_factory.mktemp("evaluate-runs"), empty_mlflow_db, specs)


@pytest.fixture
def store(runs, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs["uri"])
    mlflow.set_tracking_uri(runs["uri"])
    return runs


def invoke(*args):
    result = CliRunner().invoke(main, ["evaluate", *map(str, args)])
    if result.exit_code not in (0, 2):
        import traceback

        traceback.print_exception(*result.exc_info)
    return result


def test_evaluate_logs_samples_stylometry_perplexity_and_cost_to_a_nested_run(store, tmp_path):
    run_dir = store["root"] / "A"
    other = store["root"] / "B"
    out = tmp_path / "eval"
    reference = tmp_path / "ordinary.txt"
    reference.write_text("The old men told stories of the sea.\nChildren laughed near the bridge at night.\n" * 20)
    result = invoke(run_dir, "--against", "base", "--against", other, "--samples", 2, "--max-new-tokens", 8,
                    "--num-prompts", 3, "--mfw", 30, "--reference", reference, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.output
    assert "verdict: closest to the corpus:" in text and "perplexity by target class" in text
    assert "cost on ordinary text" in text and "trained" in text and "base" in text
    parent = store["A"].run_id
    client = mlflow.MlflowClient()
    children = client.search_runs([store["A"].experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.runName"] == "evaluate-A"
    assert client.get_run(parent).data.tags["wakelab.evaluate.last_run"] == child.info.run_id
    params = child.data.params
    assert params["sampling.seed"] == "0" and params["sampling.temperature"] == "0.8" and params["samples"] == "2"
    assert params["against"] == f"base,{other}" and int(params["mfw_words_used"]) > 2
    m = child.data.metrics
    for key in ("trained/coined_per_1k", "base/coined_per_1k", "B/coined_per_1k", "corpus/coined_per_1k",
                "trained/delta_corpus", "base/delta_reference", "perplexity/new_before", "perplexity/new_after",
                "perplexity/base_after", "perplexity/all_after", "reference/base_perplexity",
                "reference/trained_perplexity", "reference/new_mass_mean", "mfw_words"):  # fmt: skip
        assert f"evaluate/{key}" in m, key
    assert m["evaluate/base/coined_per_1k"] == 0.0
    assert m["evaluate/perplexity/new_after"] != m["evaluate/perplexity/new_before"]  # the new rows moved
    assert m["evaluate/perplexity/base_after"] > 1 and m["evaluate/reference/new_mass_mean"] > 0
    assert "closest to the corpus" in child.data.tags["wakelab.evaluate.verdict"]
    logged = {f.path for f in client.list_artifacts(child.info.run_id, "evaluate")}
    for name in ("samples.json", "samples_table.json", "stylometry.json", "perplexity_by_class.csv",
                 "reference_cost.json", "coined_rate_and_delta.png", "summary.txt"):  # fmt: skip
        assert f"evaluate/{name}" in logged, name
    samples = json.loads((out / "samples.json").read_text())
    assert samples["sampling"]["seed"] == 0 and len(samples["samples"]) == 3 * 2 * 3
    assert {s["model"] for s in samples["samples"]} == {"trained", "base", "B"}
    assert all(s["marked"].count("[[") == s["coined_count"] for s in samples["samples"])


def test_evaluate_is_reproducible_for_a_seed(store, tmp_path):
    run_dir = store["root"] / "A"
    texts = []
    for name in ("one", "two"):
        result = invoke(run_dir, "--samples", 2, "--max-new-tokens", 6, "--num-prompts", 2, "--no-mlflow",
                        "--no-probe", "--out", tmp_path / name)  # fmt: skip
        assert result.exit_code == 0, result.output
        texts.append([s["text"] for s in json.loads((tmp_path / name / "samples.json").read_text())["samples"]])
    assert texts[0] == texts[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--samples", "0"], "--samples 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens -1"),
        (["--prompts", "EMPTY"], "holds no prompt"),
        (["--prompts", "LATIN1"], "is not UTF-8"),
        (["--reference", "MISSING"], "no such file"),
        (["--against", "OTHERBASE"], "differs from the run's"),
        (["--against", "SELF"], "the evaluated run itself"),
        (["--top-p", "0"], "--top-p 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(store, tmp_path, args, message):
    run_dir = store["root"] / "A"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    other = tmp_path / "otherbase"
    shutil.copytree(store["root"] / "B", other, ignore=shutil.ignore_patterns("checkpoint-*", "evaluate"))
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["model"]["name_or_path"] = str(tmp_path / "another-model")
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    swap = {"EMPTY": empty, "LATIN1": latin, "MISSING": tmp_path / "nope.txt", "OTHERBASE": other, "SELF": run_dir}
    before = {p for p in run_dir.rglob("*")}
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    result = invoke(run_dir, *[str(swap.get(a, a)) for a in args], "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and {p for p in run_dir.rglob("*")} == before
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before


def test_a_run_without_held_out_text_and_no_prompts_names_both(store, tmp_path):
    run_dir = tmp_path / "noheld"
    shutil.copytree(store["root"] / "A", run_dir, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"]["heldout"] = None
    config["data"]["heldout_fraction"] = 0.0
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "wakelab_run.json").unlink(missing_ok=True)
    result = invoke(run_dir, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "no held-out text" in result.output and "--prompts" in result.output
    assert not (tmp_path / "out").exists()


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["evaluate", "--help"])
    assert result.exit_code == 0 and "wakelab evaluate runs/demo" in result.output
