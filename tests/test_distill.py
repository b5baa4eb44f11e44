"""The ``distill`` init (token distillation) on a tiny model: the loss falls, rows are bit-identical across runs, base
rows stay untouched, fallback words get exactly the subword rows, and a planted alias ends up read as spelled out.

The unit tests call the hook through the public mechanism (a PluginManager and an ``InitContext`` like the engine's)
on a 2-layer, 64-wide Llama; one run goes through ``engine.run`` for the report, the metrics and the bad input.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from conftest import COINED, make_text, tiny_overrides

import wakelab
from wakelab.config import build_config
from wakelab.errors import ConfigError, DataError
from wakelab.hooks import registry
from wakelab.hooks.context import InitContext
from wakelab.run import engine
from wakelab.vocab import expand_vocabulary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model grown by the coined words, its tokenizer, base size, and a corpus of them as token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wakelab.testing import build_tiny_llama

    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-distill"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    num_base = len(tokenizer)
    _, words = expand_vocabulary(tokenizer, COINED, "word", "test")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = np.asarray(tokenizer(make_text(5, 120))["input_ids"], dtype=np.int64)
    return model, tokenizer, num_base, words, ids


@pytest.fixture(scope="module")
def untied(tiny, tmp_path_factory):
    """The tiny model with a head of its own (not tied to the input embedding), grown like ``tiny``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from wakelab.testing import build_tiny_llama

    model, tokenizer, num_base, words, ids = tiny
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-untied"))
    torch.manual_seed(0)  # the head's rows are drawn (the checkpoint has none)
    config = AutoConfig.from_pretrained(folder, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    return model, tokenizer, num_base, words, ids


def distill(tiny, seed=0, ids=None, method="distill", models=None, logs=None, **section):
    """Run the init on a copy of the tiny model; returns (embedding matrix after, summary, report, metrics). The
    copy is appended to ``models`` and the log lines to ``logs`` when given."""
    import copy

    from wakelab.plugins.distill import DistillConfig

    model, tokenizer, num_base, words, corpus = tiny
    model = copy.deepcopy(model)
    if models is not None:
        models.append(model)
    weight = model.get_input_embeddings().weight
    metrics: list[tuple[dict, int]] = []

    class Config:
        distill = DistillConfig(
            **{"lr": 1e-2, "epochs": 3, "snippet_length": 16, "batch_size": 8, "snippets_per_word": 4, **section}
        )

    ctx = InitContext(
        method=method,
        weight=weight.data,
        num_base=num_base,
        new_ids=torch.arange(num_base, weight.shape[0]),
        new_words=list(words),
        tokenizer=tokenizer,
        options={"scale": 1.0, "seed": seed},
        generator=torch.Generator().manual_seed(seed),
        log=lambda line: None if logs is None else logs.append(line),
        model=model,
        corpus_ids=lambda: corpus if ids is None else ids,
        config=Config(),
        log_metrics=lambda m, step: metrics.append((m, step)),
    )
    with torch.no_grad():
        summary = registry.build_manager([method]).hook.init_embeddings(ctx=ctx)
    return weight.detach().clone(), summary, ctx.report, metrics


def test_loss_falls_and_rows_are_bit_identical_across_runs(tiny):
    first, summary, _, metrics = distill(tiny)
    second, _, _, _ = distill(tiny)
    assert summary["distilled"] == len(COINED) and summary["fell_back"] == 0
    assert summary["loss_last"] < 0.8 * summary["loss_first"]
    curve = [m["init/loss"] for m, _ in metrics if "init/loss" in m]
    assert len(curve) > 3 and curve[-1] < curve[0]
    assert torch.equal(first, second)
    other, _, _, _ = distill(tiny, seed=1)
    assert not torch.equal(first, other)  # the seed chooses the snippets' order


def test_base_rows_untouched_and_rows_moved_from_subword(tiny):
    model, _, num_base, _, _ = tiny
    before = model.get_input_embeddings().weight.detach().clone()
    after, _, _, _ = distill(tiny)
    subword, _, _, _ = distill(tiny, method="subword")
    assert torch.equal(after[:num_base], before[:num_base])
    assert torch.equal(subword[:num_base], before[:num_base])
    assert not torch.equal(after[num_base:], subword[num_base:])


def test_fallback_words_get_exactly_the_subword_rows(tiny):
    model, tokenizer, num_base, words, corpus = tiny
    rare = words[:3]
    rare_ids = {num_base + i for i in range(3)}
    kept = np.array([t for t in corpus if t not in rare_ids][: len(corpus) // 2] + [num_base] * 1, dtype=np.int64)
    after, summary, report, _ = distill(tiny, ids=kept, min_occurrences=2)
    subword, _, _, _ = distill(tiny, method="subword")
    assert summary["fell_back"] == 3
    assert [w["word"] for w in report["fallback_words"]] == rare
    assert "1 occurrence(s)" in report["fallback_words"][0]["reason"]
    assert torch.equal(after[num_base : num_base + 3], subword[num_base : num_base + 3])
    assert not torch.equal(after[num_base + 3 :], subword[num_base + 3 :])


def word_log_prob(model, tiny) -> float:
    """Mean log-probability the model gives a new word where it is the next token of the corpus (16-token
    windows, every new word read as itself)."""
    _, _, num_base, _, ids = tiny
    blocks = torch.tensor(ids[: len(ids) // 16 * 16]).reshape(-1, 16)
    with torch.no_grad():
        logp = model(blocks).logits[:, :-1].float().log_softmax(-1)
    targets = blocks[:, 1:]
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(picked[targets >= num_base].mean())


def test_next_token_learns_an_untied_heads_new_rows_only(untied):
    """``output_rows=next_token``: the new head rows learn (their loss falls) from the subword mean, the head's base
    rows and the input rows are exactly those of ``output_rows=subword``, and two runs agree bit for bit."""
    _, _, num_base, _, _ = untied
    head_before = untied[0].lm_head.weight.detach().clone()
    learnt_models, subword_models, again_models = [], [], []
    rows, summary, _, metrics = distill(untied, output_rows="next_token", models=learnt_models)
    subword_rows, subword_summary, _, _ = distill(untied, output_rows="subword", models=subword_models)
    again, _, _, _ = distill(untied, output_rows="next_token", models=again_models)
    head = learnt_models[0].lm_head.weight.detach()
    subword_head = subword_models[0].lm_head.weight.detach()
    assert summary["head"] == "next_token" and subword_summary["head"] == "subword"
    assert summary["head_loss_last"] < summary["head_loss_first"]
    curve = [m["init/head_loss"] for m, _ in metrics if "init/head_loss" in m]
    assert len(curve) > 3 and curve[-1] < curve[0]
    # Most of that loss is the base tokens' (the new rows cannot change it); where a new word is the next token,
    # the learnt rows give it far more of the probability than the subword mean does.
    gain = word_log_prob(learnt_models[0], untied) - word_log_prob(subword_models[0], untied)
    assert gain > 0.2
    assert torch.equal(head[:num_base], head_before[:num_base])  # base head rows untouched
    assert torch.equal(rows, subword_rows)  # the input rows do not depend on the head's rule
    assert not torch.equal(head[num_base:], subword_head[num_base:])
    assert torch.equal(subword_head[:num_base], head_before[:num_base])
    assert torch.equal(head, again_models[0].lm_head.weight.detach()) and torch.equal(rows, again)


def test_next_token_on_a_tied_head_says_the_output_rows_are_the_input_rows(tiny):
    logs: list[str] = []
    rows, summary, _, metrics = distill(tiny, output_rows="next_token", logs=logs)
    subword_rule, _, _, _ = distill(tiny, output_rows="subword")
    assert summary["head"] == "tied" and torch.equal(rows, subword_rule)
    said = [line for line in logs if "tied to the input" in line]
    assert len(said) == 1 and "its new rows are the learnt input rows" in said[0]
    assert not [m for m, _ in metrics if "init/head_loss" in m]


@pytest.mark.parametrize("bias", [False, True])
def test_next_token_loss_is_the_cross_entropy_over_base_and_chunk_rows(bias):
    """The chunked loss equals plain cross-entropy over [base rows; the chunk's rows], and only the chunk's rows
    get gradients."""
    from wakelab.plugins.distill import chunk_lookup, next_token_loss

    torch.manual_seed(0)
    num_base, d, n = 50, 8, 12
    head = torch.nn.Linear(d, num_base + 3, bias=bias)
    chunk_ids = torch.tensor([num_base + 1, num_base + 2])  # num_base + 0 belongs to another chunk
    learnt = torch.nn.Parameter(torch.randn(2, d))
    hidden = torch.randn(n, d)
    targets = torch.tensor([3, num_base + 1, 7, num_base + 2, 0, 49, num_base + 1, 5, 6, 8, 9, 10])
    loss = next_token_loss(hidden, targets, head, num_base, chunk_ids, learnt, chunk_lookup(chunk_ids.tolist(), "cpu"),
                           rows_at_once=16)  # fmt: skip
    weight = torch.cat([head.weight[:num_base].detach(), learnt])
    logits = hidden @ weight.T
    if bias:
        logits = logits + torch.cat([head.bias[:num_base], head.bias[chunk_ids]]).detach()
    index = torch.where(targets < num_base, targets, targets - num_base - 1 + num_base)
    expected = torch.nn.functional.cross_entropy(logits, index)
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert learnt.grad is not None and learnt.grad.abs().sum() > 0
    assert head.weight.grad is None


def test_token_budget_caps_the_snippets(tiny):
    _, summary, report, _ = distill(tiny, token_budget=16 * 12)
    assert summary["snippets"] == 8 and summary["distilled"] == 8  # spread evenly: 1 snippet a word
    _, summary, report, _ = distill(tiny, token_budget=16 * 5)
    assert summary["distilled"] == 5 and summary["fell_back"] == 3
    assert all("token_budget" in w["reason"] for w in report["fallback_words"])


def test_planted_alias_is_read_as_spelled_out(tmp_path):
    """A coined word planted in the corpus exactly where its spelling would be (an alias of its spelled-out form):
    on held-out text, distillation brings the model's last hidden states within 0.1 (mean squared; the final
    RMSNorm puts them near unit size) of the spelled-out reading, and to less than half the subword rows' distance.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wakelab.inits.aliasing import heldout_alias_distance
    from wakelab.testing import build_tiny_llama

    folder = build_tiny_llama(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    num_base = len(tokenizer)
    _, words = expand_vocabulary(tokenizer, ["glimmerous"], "word", "test")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = np.asarray(tokenizer(make_text(5, 60, coined=words))["input_ids"], dtype=np.int64)
    planted = (model, tokenizer, num_base, words, ids)
    held = torch.tensor(tokenizer(make_text(9, 40, coined=words))["input_ids"][: 24 * 12]).reshape(12, 24)
    pieces = {num_base: wakelab.word_pieces(tokenizer, num_base, [num_base], words)[0]}
    assert len(pieces[num_base]) > 2 and max(pieces[num_base]) < num_base  # spelled out in base pieces

    def distance(weight):
        model.get_input_embeddings().weight.data.copy_(weight)
        return heldout_alias_distance(model, held, pieces, 4, 12)

    settings = {"epochs": 4, "snippet_length": 16, "snippets_per_word": 40}
    distilled, _, _, _ = distill(planted, **settings)
    subword, _, _, _ = distill(planted, method="subword")
    d_distill, d_subword = distance(distilled), distance(subword)
    assert d_distill < 0.1
    assert d_distill < 0.5 * d_subword


def test_alias_pair_aligns_the_word_with_its_last_piece():
    pieces = {100: [7, 8, 9], 101: [5, 6]}
    pair = wakelab.alias_pair([1, 2, 100, 3, 101, 4], pieces, (100,), 64)
    assert pair.student == [1, 2, 100, 3, 5, 6, 4]
    assert pair.teacher == [1, 2, 7, 8, 9, 3, 5, 6, 4]
    assert list(zip(pair.student_at, pair.teacher_at, strict=True)) == [(2, 4), (3, 5), (4, 6), (5, 7), (6, 8)]
    assert wakelab.alias_pair([1, 2, 101], pieces, (100,), 64) is None
    short = wakelab.alias_pair([1, 100, 3, 4], pieces, (100,), 5)  # the teacher stops before passing 5 tokens
    assert short.teacher == [1, 7, 8, 9, 3] and short.student == [1, 100, 3]


def test_bad_target_layer_and_snippet_length_name_the_range(tiny):
    with pytest.raises(ConfigError, match=r"target_layer=5 is outside the model: it has 2 layers; give 1\.\.2"):
        distill(tiny, target_layer=5)
    with pytest.raises(ConfigError, match="snippet_length=200 is longer than the model's context of 128"):
        distill(tiny, snippet_length=200)
    with pytest.raises(DataError, match="none of the 8 new words occurs in the corpus"):
        distill(tiny, ids=np.arange(50, dtype=np.int64))


def test_nothing_to_distil_names_why():
    from wakelab.plugins.distill import nothing_to_distil

    assert nothing_to_distil([0, 3], [True, True], 1) is None
    assert "none of the 2 new words occurs" in nothing_to_distil([0, 0], [True, True], 1)
    assert "(the most: 3)" in nothing_to_distil([0, 3], [True, True], 4)
    assert "none of the 1 new words the corpus uses enough has base sub-tokens" in nothing_to_distil(
        [0, 3], [True, False], 1
    )


def test_a_run_with_distill_reports_fallbacks_and_logs_its_stage(tiny_model, texts, tmp_path):
    config = build_config(
        overrides=tiny_overrides(
            tiny_model,
            texts,
            **{"init.method": "distill", "distill.snippets_per_word": 4, "distill.min_occurrences": 1000},
        )
    )
    with pytest.raises(DataError, match="min_occurrences=1000"):
        engine.run(config, progress=False)
    config = build_config(
        overrides=tiny_overrides(
            tiny_model,
            texts,
            **{"init.method": "distill", "distill.snippets_per_word": 4, "train.trainable": "mask", "output_dir": "ok"},
        )
    )
    result = engine.run(config, progress=False)
    report = json.loads((result.output_dir / "vocab_report.json").read_text())
    assert report["init"]["method"] == "distill" and report["init"]["distilled"] == len(COINED)
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(result.run_id, "init/loss")
    assert curve and client.get_metric_history(result.run_id, "init/seconds")
    assert "heldout_alias_mse_before" in result.metrics
    # Analysis reads the rows init left (initial_rows.safetensors) instead of distilling again.
    from safetensors.torch import load_file

    from wakelab.run.state import load_trained

    saved = load_file(str(result.output_dir / "initial_rows.safetensors"))
    state = load_trained(result.output_dir, initial=True)
    assert torch.equal(state.rows.values(state.rows.new_ids).float(), saved["rows"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("distill.token_budget", 0, "distill.token_budget"),
        ("distill.token_budget", 10, "less than one snippet"),
        ("distill.target_layer", 0, "layer 0 is the input embeddings"),
    ],
)
def test_bad_config_is_one_line_before_anything_runs(tiny_model, texts, key, value, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_config(overrides=tiny_overrides(tiny_model, texts, **{"init.method": "distill", key: value}))
    assert "\n" not in str(caught.value)


def test_distill_on_the_4bit_base_under_tokens(tiny_model, texts):
    """Gradients reach the new rows through every quantized layer: the distillation loss falls on a 4-bit base."""
    from optional import require

    require("bitsandbytes")
    overrides = {
        "model.load_in_4bit": True,
        "init.method": "distill",
        "train.trainable": "tokens",
        "train.max_steps": 2,
        "distill.snippets_per_word": 4,
        "distill.snippet_length": 16,
        "distill.lr": 1e-2,
        "distill.epochs": 2,
    }
    result = engine.run(build_config(overrides=tiny_overrides(tiny_model, texts, **overrides)), progress=False)
    assert result.status == "FINISHED"
    params = mlflow.MlflowClient().get_run(result.run_id).data.params
    assert params["init.result.distilled"] == str(len(COINED))
    assert float(params["init.result.loss_last"]) < float(params["init.result.loss_first"])
