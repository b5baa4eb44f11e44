"""Static embedding analyses on synthetic matrices with known answers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from wakelab.analysis.embeddings import isotropy, nearest_neighbours, norm_stats, summarise, top_k_cosine


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


# ------------------------------------------------------------------------------------------- top_k_cosine (chunked)


def _exact_unit_rows(count: int, d: int, seed: int) -> torch.Tensor:
    """Rows of four +-1 entries and zeros: every norm is 2, so unit entries are +-0.5 and every cosine is a multiple
    of 0.25, computed exactly in float32 whatever the chunking; many cosines are equal, so ties are everywhere."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.zeros(count, d)
    for i in range(count):
        columns = torch.randperm(d, generator=generator)[:4]
        rows[i, columns] = torch.randint(0, 2, (4,), generator=generator).float() * 2 - 1
    return rows


def _one_shot(queries: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole cosine matrix, stably sorted: best first, of equal cosines the earlier candidate first."""
    unit_q = torch.nn.functional.normalize(queries.float(), dim=1)
    unit_c = torch.nn.functional.normalize(candidates.float(), dim=1)
    values, positions = (unit_q @ unit_c.T).sort(dim=1, descending=True, stable=True)
    return values[:, :k], positions[:, :k]


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 8, 9, 64, 1000])
@pytest.mark.parametrize("query_batch", [1, 5, 64])
def test_chunked_top_k_equals_one_shot_exactly_with_ties_at_every_chunk_boundary(chunk_size, query_batch):
    candidates = _exact_unit_rows(64, 6, seed=1)
    candidates[40] = candidates[3]  # exact duplicates: a tie that crosses chunk boundaries
    candidates[41] = candidates[3]
    candidates[10] = 0.0  # a zero row: cosine 0 with everything, tied with every orthogonal row
    queries = torch.cat([_exact_unit_rows(11, 6, seed=2), candidates[3:4]])
    expected_values, expected_positions = _one_shot(queries, candidates, 8)
    assert (expected_values[:, :-1] == expected_values[:, 1:]).any(), "the inputs must have ties inside the top 8"

    values, positions = top_k_cosine(queries, candidates, 8, chunk_size=chunk_size, query_batch=query_batch)
    assert torch.equal(positions, expected_positions)
    assert torch.equal(values, expected_values)
    assert positions[-1, :3].tolist() == [3, 40, 41]  # the duplicates, in candidate order


def test_chunked_top_k_on_random_rows_matches_the_full_matrix_for_any_chunk():
    generator = torch.Generator().manual_seed(7)
    candidates = torch.randn(500, 32, generator=generator)
    queries = torch.randn(20, 32, generator=generator)
    reference = top_k_cosine(queries, candidates, 10, chunk_size=500, query_batch=20)
    expected_positions = _one_shot(queries, candidates, 10)[1]
    assert torch.equal(reference[1], expected_positions)
    for chunk_size in (1, 3, 64, 499):
        values, positions = top_k_cosine(queries, candidates, 10, chunk_size=chunk_size, query_batch=7)
        assert torch.equal(positions, reference[1])
        torch.testing.assert_close(values, reference[0], rtol=0, atol=1e-6)


def test_top_k_skips_the_query_itself_and_takes_any_row_dtype():
    weight = _exact_unit_rows(30, 5, seed=3).to(torch.bfloat16)
    ids = torch.arange(30)
    values, positions = top_k_cosine(weight[:4], weight, 3, query_ids=ids[:4], candidate_ids=ids, chunk_size=4)
    assert not (positions == ids[:4, None]).any()
    assert values.dtype == torch.float32 and torch.isfinite(values).all()
    with pytest.raises(ValueError, match="k must be"):
        top_k_cosine(weight[:1], weight, 0)


# ---------------------------------------------------------------------------------------------------- read in place


@pytest.mark.parametrize("strategy", ["tokens", "mask"])
def test_analyses_of_the_rows_read_in_place_equal_those_of_the_whole_matrix(strategy):
    """analyze reads ``RowAccess.stacked()`` (no copy of the matrix): every figure is the one the copy gave."""
    from torch import nn

    from wakelab.analysis.embeddings import row_norms
    from wakelab.rows import StackedRows, setup_trainable_rows

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(300, 16)
            self.head = nn.Linear(16, 300, bias=False)
            self.head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def set_input_embeddings(self, module):
            self.embed = module

        def get_output_embeddings(self):
            return self.head

        def set_output_embeddings(self, module):
            self.head = module

    torch.manual_seed(3)
    model = Tiny()
    with torch.no_grad():
        model.embed.weight[250:] *= 3.0  # new rows with their own norms
    rows = setup_trainable_rows(model, 250, strategy)
    whole = rows.values().float()
    stacked = rows.stacked()
    assert isinstance(stacked, StackedRows) and stacked.shape == tuple(whole.shape)
    assert stacked.base.data_ptr() == rows.values(range(250), share=True).data_ptr()  # a view, not a copy
    assert torch.equal(row_norms(stacked), whole.norm(dim=1))
    assert norm_stats(stacked, 250) == norm_stats(whole, 250)
    assert isotropy(stacked, range(250, 300), 30, seed=1) == isotropy(whole, range(250, 300), 30, seed=1)
    queries = [251, 260, 299, 5]
    for pool in (range(250), range(250, 300), [7, 3, 290, 120]):
        got = nearest_neighbours(stacked, queries, pool, k=6, chunk_size=37)
        assert got == nearest_neighbours(whole, queries, pool, k=6, chunk_size=37)
