"""The built-in init plugins: spherical (radius), mean (statistics), subword (exact sub-token means), and seeds.

Each is called through the public mechanism: a PluginManager with the plugin registered, and an ``InitContext``
like the one the engine builds; one test per method goes through ``engine.run`` to see the params it logs.
"""

from __future__ import annotations

import mlflow
import pytest
import torch
from conftest import COINED, tiny_overrides

from wakelab.config import build_config
from wakelab.hooks import registry
from wakelab.hooks.context import InitContext
from wakelab.plugins.mean import base_moments, gaussian_rows, sampling_factor
from wakelab.run import engine
from wakelab.vocab import expand_vocabulary

NUM_BASE, NUM_NEW, DIM = 400, 12, 8


def init_with(method, weight, num_base, words, tokenizer=None, seed=0, base_tokenizer=None, **options):
    """Run ``init_embeddings`` for ``method`` on ``weight`` (in place); returns (summary, log lines)."""
    pm = registry.build_manager([method])
    lines: list[str] = []
    ctx = InitContext(
        method=method,
        weight=weight,
        num_base=num_base,
        new_ids=torch.arange(num_base, weight.shape[0]),
        new_words=list(words),
        tokenizer=tokenizer,
        options={"radius_scale": 1.5, "scale": 1.0, "seed": seed, **options},
        generator=torch.Generator().manual_seed(seed),
        base_tokenizer=base_tokenizer,
        log=lines.append,
    )
    with torch.no_grad():
        summary = pm.hook.init_embeddings(ctx=ctx)
    return summary, lines


def correlated_base(rows: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base rows from a known Gaussian (non-zero mean, correlated coordinates): (rows, mean, cov)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5
    mean = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.5
    cov = mixing @ mixing.T
    rows = mean + torch.randn(rows, dim, generator=gen, dtype=torch.float64) @ mixing.T
    return rows.float(), mean, cov


def base_matrix(num_new: int = NUM_NEW) -> torch.Tensor:
    rows, _, _ = correlated_base(NUM_BASE, DIM)
    return torch.cat([rows, torch.zeros(num_new, DIM)])


# -- spherical ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("radius_scale", [1.5, 0.5])
def test_spherical_rows_sit_at_radius_scale_times_the_mean_base_norm(radius_scale):
    weight = base_matrix()
    base = weight[:NUM_BASE].clone()
    summary, lines = init_with(
        "spherical", weight, NUM_BASE, [f"w{i}" for i in range(NUM_NEW)], radius_scale=radius_scale
    )
    expected = radius_scale * base.norm(dim=1).mean().item()
    assert summary["radius"] == pytest.approx(expected)
    assert torch.allclose(weight[NUM_BASE:].norm(dim=1), torch.full((NUM_NEW,), expected), rtol=1e-5)
    assert torch.equal(weight[:NUM_BASE], base)
    assert "spherical init" in lines[0]


# -- mean --------------------------------------------------------------------------------------------------------------


def test_mean_rows_have_the_base_mean_and_covariance():
    """Many draws: the sample mean and covariance match the base rows' (scale 1), and no two rows coincide."""
    base, _, _ = correlated_base(3000, DIM)
    draws = 20000
    weight = torch.cat([base, torch.zeros(draws, DIM)])
    summary, lines = init_with("mean", weight, base.shape[0], [f"w{i}" for i in range(draws)])
    new = weight[base.shape[0] :].double()
    base_mean, base_cov = base.double().mean(0), torch.cov(base.double().T, correction=0)
    spread = base_cov.diagonal().sqrt()
    assert torch.all((new.mean(0) - base_mean).abs() < 0.05 * spread)
    relative = torch.linalg.matrix_norm(torch.cov(new.T) - base_cov) / torch.linalg.matrix_norm(base_cov)
    assert relative < 0.05
    assert torch.unique(new, dim=0).shape[0] == draws
    assert torch.cdist(new[:500], new[:500]).add(torch.eye(500) * 1e9).min() > 1e-3 * spread.mean()
    assert torch.equal(weight[: base.shape[0]], base)
    assert summary["method"] == "mean" and summary["scale"] == 1.0 and summary["factorization"] == "cholesky"
    assert "mean init" in lines[0] and "N(mean, 1 x cov)" in lines[0]


def test_mean_scale_multiplies_the_covariance():
    base, _, _ = correlated_base(3000, DIM)
    draws = 20000
    weight = torch.cat([base, torch.zeros(draws, DIM)])
    init_with("mean", weight, base.shape[0], [f"w{i}" for i in range(draws)], scale=0.01)
    new = weight[base.shape[0] :].double()
    base_cov = torch.cov(base.double().T, correction=0)
    relative = torch.linalg.matrix_norm(torch.cov(new.T) - 0.01 * base_cov) / torch.linalg.matrix_norm(0.01 * base_cov)
    assert relative < 0.05
    assert torch.allclose(new.mean(0), base.double().mean(0), atol=0.01)


def test_mean_warns_when_the_scale_makes_rows_nearly_identical(capsys):
    weight = base_matrix()
    init_with("mean", weight, NUM_BASE, [f"w{i}" for i in range(NUM_NEW)], scale=1e-9)
    out, err = capsys.readouterr()
    assert out == "" and "wakelab: warning: mean init: init.scale=1e-09" in err and "nearly identical" in err


def test_chunked_moments_match_torch_cov():
    rows, _, _ = correlated_base(1000, 16)
    weight = torch.cat([rows, torch.randn(7, 16)])  # rows past num_base are not base rows
    mean, cov = base_moments(weight, 1000, chunk_rows=96)
    assert torch.allclose(mean, rows.double().mean(0), atol=1e-6)
    assert torch.allclose(cov, torch.cov(rows.double().T, correction=0), atol=1e-5)


@pytest.mark.parametrize(("count", "dim", "chunk"), [(1000, 64, 96), (33, 3, 16), (17, 5, 4), (5, 7, 16)])
def test_rows_drawn_in_chunks_are_the_rows_drawn_whole(count, dim, chunk):
    """Chunked sampling reads the generator as one randn(count, dim) does: the same rows for the same seed."""
    mean = torch.randn(dim, dtype=torch.float64)
    factor = torch.linalg.cholesky(torch.eye(dim, dtype=torch.float64) * 0.5 + 0.1)
    chunked = gaussian_rows(count, mean, factor, torch.Generator().manual_seed(1), chunk_rows=chunk)
    z = torch.randn(count, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(chunked, (mean + z @ factor.T).to(torch.float32))


def test_rank_deficient_covariance_still_samples():
    """Fewer base rows than dimensions: the covariance is singular; sampling still gives finite, distinct rows."""
    weight = torch.cat([torch.randn(5, 32), torch.zeros(10, 32)])
    summary, _ = init_with("mean", weight, 5, [f"w{i}" for i in range(10)])
    new = weight[5:]
    assert torch.isfinite(new).all() and torch.unique(new, dim=0).shape[0] == 10
    _, cov = base_moments(weight, 5)
    factor, _ = sampling_factor(cov, 1.0)
    assert torch.allclose(factor @ factor.T, cov, atol=1e-4)


def test_mean_works_in_bfloat16():
    weight = base_matrix().to(torch.bfloat16)
    base = weight[:NUM_BASE].clone()
    init_with("mean", weight, NUM_BASE, [f"w{i}" for i in range(NUM_NEW)])
    assert weight.dtype == torch.bfloat16 and torch.equal(weight[:NUM_BASE], base)
    assert torch.unique(weight[NUM_BASE:].float(), dim=0).shape[0] == NUM_NEW


# -- subword -----------------------------------------------------------------------------------------------------------


def expanded(tiny_model, add_as="word"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    num_base = len(tokenizer)
    _, words = expand_vocabulary(tokenizer, COINED, add_as, "test")
    weight = torch.randn(len(tokenizer), 32, generator=torch.Generator().manual_seed(3))
    return tokenizer, num_base, words, weight


@pytest.mark.parametrize("add_as, form", [("word", " {}"), ("plain", "{}")])
def test_subword_rows_are_exact_means_of_the_base_sub_tokens(tiny_model, add_as, form):
    from transformers import AutoTokenizer

    tokenizer, num_base, words, weight = expanded(tiny_model, add_as)
    base_weight = weight[:num_base].clone()
    summary, lines = init_with("subword", weight, num_base, words, tokenizer)
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_model)  # the base vocabulary, loaded fresh
    for offset, word in enumerate(words):
        ids = base_tokenizer.encode(form.format(word), add_special_tokens=False)
        assert len(ids) > 1 and max(ids) < num_base, f"{word} should split into base sub-tokens"
        # The expanded tokenizer reads the word as the new token itself: the plugin must not use it.
        assert tokenizer.encode(form.format(word), add_special_tokens=False)[-1] >= num_base
        expected = base_weight[ids].mean(dim=0)
        assert torch.allclose(weight[num_base + offset], expected, atol=1e-6), word
    assert torch.equal(weight[:num_base], base_weight)
    assert summary["from_subwords"] == len(words) and summary["fell_back"] == 0
    assert any("0 word(s) had no usable sub-tokens" in line for line in lines)


def test_subword_uses_the_base_tokenizer_when_the_engine_gives_one(tiny_model):
    from transformers import AutoTokenizer

    tokenizer, num_base, words, weight = expanded(tiny_model)
    derived = weight.clone()
    init_with("subword", derived, num_base, words, tokenizer)
    given = weight.clone()
    init_with("subword", given, num_base, words, tokenizer, base_tokenizer=AutoTokenizer.from_pretrained(tiny_model))
    assert torch.equal(derived, given)


class UnknownFor:
    """A base tokenizer that knows nothing of some words (all unknown) or gives no tokens at all."""

    unk_token_id = 0

    def __init__(self, real, unknown: set[str], empty: set[str]):
        self.real, self.unknown, self.empty = real, unknown, empty

    def encode(self, text, add_special_tokens=False):
        word = text.strip()
        if word in self.unknown:
            return [0, 0]
        if word in self.empty:
            return []
        return self.real.encode(text, add_special_tokens=add_special_tokens)

    def convert_ids_to_tokens(self, token_id):
        return self.real.convert_ids_to_tokens(token_id)


def test_subword_falls_back_to_the_mean_init_for_unusable_words(tiny_model):
    from transformers import AutoTokenizer

    tokenizer, num_base, words, weight = expanded(tiny_model)
    base = UnknownFor(AutoTokenizer.from_pretrained(tiny_model), unknown={words[0]}, empty={words[1]})
    summary, lines = init_with("subword", weight, num_base, words, tokenizer, base_tokenizer=base)
    assert summary["fell_back"] == 2 and summary["fallback"] == "mean"
    assert summary["fallback_words"] == f"{words[0]},{words[1]}"
    assert summary["from_subwords"] == len(words) - 2
    assert any("2 word(s) had no usable sub-tokens and fell back to the mean init" in line for line in lines)
    fell = weight[num_base : num_base + 2]
    assert torch.isfinite(fell).all() and not torch.equal(fell[0], fell[1])
    ids = base.encode(" " + words[2])
    assert torch.allclose(weight[num_base + 2], weight[ids].mean(0), atol=1e-6)


# -- seeds -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spherical", "mean", "subword"])
def test_same_seed_same_rows_other_seed_other_rows(tiny_model, method):
    from transformers import AutoTokenizer

    tokenizer, num_base, words, weight = expanded(tiny_model)
    # One word with no usable sub-tokens so the subword init draws something random too.
    base = UnknownFor(AutoTokenizer.from_pretrained(tiny_model), unknown={words[0]}, empty=set())
    results = []
    for seed in (7, 7, 8):
        w = weight.clone()
        init_with(method, w, num_base, words, tokenizer, seed=seed, base_tokenizer=base)
        results.append(w[num_base:])
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])
    if method == "subword":  # only the fallen-back row depends on the seed
        assert torch.equal(results[0][1:], results[2][1:]) and not torch.equal(results[0][0], results[2][0])


# -- through the engine ------------------------------------------------------------------------------------------------


def test_built_in_init_plugins_are_listed():
    found = registry.discover()
    for name in ("spherical", "mean", "subword"):
        assert found[name].origin == "built-in"
    rows = {row["name"]: row for row in registry.describe()}
    assert rows["mean"]["hooks"] == ["init_embeddings"] and rows["subword"]["hooks"] == ["init_embeddings"]


@pytest.mark.parametrize("method, key", [("mean", "init.result.factorization"), ("subword", "init.result.fell_back")])
def test_init_method_through_a_run_logs_what_it_did(tiny_model, texts, method, key):
    overrides = tiny_overrides(tiny_model, texts, **{"init.method": method, "train.max_steps": 2})
    result = engine.run(build_config(None, None, overrides), progress=False)
    params = mlflow.get_run(result.run_id).data.params
    assert params["init.result.method"] == method
    assert key in params
    assert params["plugins.active"].split(",") == [method]


def test_word_pieces_reads_the_added_tokens_once_whatever_the_number_of_words(tiny_model, monkeypatch):
    """transformers builds ``added_tokens_decoder`` afresh on each access: once per word was quadratic, hours at
    P1's 44,195 words (the run-start alias distance and the subword/distill inits all spell every word)."""
    from wakelab.inits.subwords import word_pieces

    tokenizer, num_base, words, _ = expanded(tiny_model, "word")
    reads = []
    cls = type(tokenizer)
    real = cls.added_tokens_decoder
    monkeypatch.setattr(cls, "added_tokens_decoder", property(lambda self: reads.append(1) or real.fget(self)))
    pieces = word_pieces(tokenizer, num_base, range(num_base, len(tokenizer)), words)
    assert len(reads) == 1 and len(pieces) == len(words) >= 2 and all(pieces)
