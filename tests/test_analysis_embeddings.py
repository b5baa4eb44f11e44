"""Static embedding analyses on synthetic matrices with known answers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from wakelab.analysis.embeddings import isotropy, nearest_neighbours, norm_stats, summarise


def _rows_with_norms(norms: list[float], d: int = 6, seed: int = 0) -> torch.Tensor:
    """Rows pointing in random directions with exactly the given L2 norms."""
    directions = torch.randn(len(norms), d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    return (directions * torch.tensor(norms, dtype=torch.float64)[:, None]).to(torch.float32)


# ---------------------------------------------------------------------------------------------------- norm_stats


def test_norm_stats_known_norms():
    base_norms = [1.0, 2.0, 3.0, 4.0, 5.0]
    new_norms = [10.0, 20.0]
    stats = norm_stats(_rows_with_norms(base_norms + new_norms), num_base=5)

    base = stats["base"]
    assert base["count"] == 5
    assert base["mean"] == pytest.approx(3.0, rel=1e-6)
    assert base["std"] == pytest.approx(math.sqrt(2.0), rel=1e-6)  # population std of 1..5
    assert base["min"] == pytest.approx(1.0, rel=1e-6)
    assert base["max"] == pytest.approx(5.0, rel=1e-6)
    assert base["q50"] == pytest.approx(3.0, rel=1e-6)
    assert base["q25"] == pytest.approx(2.0, rel=1e-6)
    assert base["q75"] == pytest.approx(4.0, rel=1e-6)
    assert base["q05"] == pytest.approx(1.2, rel=1e-6)  # linear interpolation between 1 and 2
    assert base["q95"] == pytest.approx(4.8, rel=1e-6)

    new = stats["new"]
    assert new["count"] == 2
    assert new["mean"] == pytest.approx(15.0, rel=1e-6)
    assert new["min"] == pytest.approx(10.0, rel=1e-6)
    assert new["max"] == pytest.approx(20.0, rel=1e-6)

    assert stats["all"]["count"] == 7
    assert stats["all"]["mean"] == pytest.approx(sum(base_norms + new_norms) / 7, rel=1e-6)
    assert set(base) == {"count", "mean", "std", "min", "max", "q05", "q25", "q50", "q75", "q95"}


def test_norm_stats_bf16_input_and_no_new_tokens():
    weight = _rows_with_norms([2.0, 2.0, 2.0]).to(torch.bfloat16)
    stats = norm_stats(weight, num_base=3)
    assert stats["base"]["mean"] == pytest.approx(2.0, rel=1e-2)
    assert stats["new"]["count"] == 0
    assert all(stats["new"][key] is None for key in stats["new"] if key != "count")


def test_norm_stats_rejects_bad_num_base():
    with pytest.raises(ValueError, match=r"num_base=4 is outside \[0, 3\]"):
        norm_stats(torch.zeros(3, 4), num_base=4)


def test_summarise_single_value_has_zero_std():
    stats = summarise(torch.tensor([7.0]))
    assert stats["std"] == 0.0
    assert stats["q05"] == stats["q95"] == 7.0


# ---------------------------------------------------------------------------------------------------- isotropy


def test_isotropic_gaussian_has_mean_cosine_near_zero():
    weight = torch.randn(3000, 256, generator=torch.Generator().manual_seed(1))
    result = isotropy(weight, range(3000), sample_size=1000, seed=0)
    assert abs(result["mean_cosine"]) < 0.01
    assert result["ci_low"] < 0.0 < result["ci_high"]
    assert result["ci_high"] - result["ci_low"] < 0.01
    assert result["sample_size"] == 1000
    assert result["pairs"] == 1000 * 999 // 2


def test_near_identical_rows_have_mean_cosine_near_one():
    generator = torch.Generator().manual_seed(2)
    centre = torch.randn(64, generator=generator)
    weight = (centre + 0.01 * torch.randn(200, 64, generator=generator)).to(torch.bfloat16)
    result = isotropy(weight, torch.arange(200), sample_size=1000)
    assert result["mean_cosine"] > 0.99
    assert result["ci_low"] <= result["mean_cosine"] <= result["ci_high"] <= 1.0 + 1e-6
    assert result["sample_size"] == 200  # clamped to the number of ids


def test_isotropy_matches_brute_force_pairs_and_is_seeded():
    weight = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    ids = list(range(10, 40))
    result = isotropy(weight, ids, sample_size=12, seed=5)

    picked = torch.tensor(ids)[torch.randperm(len(ids), generator=torch.Generator().manual_seed(5))[:12]]
    cosines = [
        torch.nn.functional.cosine_similarity(weight[i], weight[j], dim=0).item()
        for i, j in itertools.combinations(picked.tolist(), 2)
    ]
    assert result["pairs"] == len(cosines) == 66
    assert result["mean_cosine"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-6)
    assert isotropy(weight, ids, sample_size=12, seed=5) == result
    assert isotropy(weight, ids, sample_size=12, seed=6)["mean_cosine"] != result["mean_cosine"]


def test_isotropy_needs_two_rows():
    with pytest.raises(ValueError, match="isotropy needs at least 2 rows, got 1 ids"):
        isotropy(torch.randn(5, 3), [1])


# ---------------------------------------------------------------------------------------------------- neighbours


def test_row_placed_next_to_a_token_finds_it_first():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(500, 64, generator=generator)
    weight[400] = weight[17] + 0.01 * torch.randn(64, generator=generator)

    (neighbours,) = nearest_neighbours(weight, [400], range(500), k=5)
    assert len(neighbours) == 5
    assert neighbours[0][0] == 17
    assert neighbours[0][1] > 0.99
    assert 400 not in [token for token, _ in neighbours]
    assert [cos for _, cos in neighbours] == sorted((cos for _, cos in neighbours), reverse=True)


def test_chunked_search_matches_full_cosine_matrix():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(300, 16, generator=generator).to(torch.bfloat16)
    queries = [0, 5, 299, 150]
    candidates = torch.arange(300)
    chunked = nearest_neighbours(weight, queries, candidates, k=7, chunk_size=13, query_batch=3)

    unit = torch.nn.functional.normalize(weight.float(), dim=1)
    full = unit[queries] @ unit.T
    full[torch.arange(len(queries)), torch.tensor(queries)] = float("-inf")
    expected_values, expected_ids = full.topk(7, dim=1)
    for row, q_result in enumerate(chunked):
        assert [token for token, _ in q_result] == expected_ids[row].tolist()
        assert [cos for _, cos in q_result] == pytest.approx(expected_values[row].tolist(), abs=1e-5)


def test_fewer_candidates_than_k_and_self_only():
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    assert len(nearest_neighbours(weight, [0], [0, 1, 2], k=10)[0]) == 2
    assert nearest_neighbours(weight, [0], [0], k=3) == [[]]
