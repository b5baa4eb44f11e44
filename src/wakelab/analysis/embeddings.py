"""Static analyses of one embedding matrix.

Everything here takes a ``[vocab, d]`` weight tensor (any float dtype, usually bf16) and returns plain Python
numbers, so the results can be logged or written as JSON without further conversion. Arithmetic is done in float32:
bf16 has 8 bits of precision, too few to sum thousands of squares or cosines without visible error.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

__all__ = ["isotropy", "nearest_neighbours", "norm_stats", "summarise"]

_QUANTILES = {"q05": 0.05, "q25": 0.25, "q50": 0.50, "q75": 0.75, "q95": 0.95}

IdsLike = Tensor | Sequence[int] | range


def _as_index(ids: IdsLike) -> Tensor:
    """Row ids as a 1-D int64 tensor (accepts lists, ranges and tensors)."""
    if isinstance(ids, Tensor):
        return ids.reshape(-1).to(torch.long)
    return torch.as_tensor(list(ids), dtype=torch.long)


def summarise(values: Tensor) -> dict:
    """Count, mean, population std, min, max and the 5/25/50/75/95 % quantiles of a 1-D tensor.

    An empty input gives ``count`` 0 and ``None`` for every statistic, so callers need no special case for
    "no new tokens". The std is the population one (ddof 0) so a single value has std 0, not NaN. Quantiles are
    computed with numpy in float64 because ``torch.quantile`` refuses inputs above 16M elements.
    """
    values = values.detach().reshape(-1).to(torch.float32)
    stats: dict = {"count": int(values.numel())}
    if values.numel() == 0:
        stats.update({key: None for key in ("mean", "std", "min", "max", *_QUANTILES)})
        return stats
    as_np = values.cpu().numpy().astype(np.float64)
    stats["mean"] = float(as_np.mean())
    stats["std"] = float(as_np.std())
    stats["min"] = float(as_np.min())
    stats["max"] = float(as_np.max())
    for key, q in _QUANTILES.items():
        stats[key] = float(np.quantile(as_np, q))
    return stats


def norm_stats(weight: Tensor, num_base: int) -> dict:
    """Distribution of row L2 norms for all rows, the base vocabulary and the new tokens.

    Rows ``[0, num_base)`` are the base model's vocabulary and rows ``[num_base, vocab)`` the added tokens, which is
    how wakelab appends tokens. Norms are computed in float32. Returns ``{"all": ..., "base": ..., "new": ...}``,
    each a :func:`summarise` dict; ``new`` has count 0 and ``None`` values when no tokens were added.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [rows, d], got shape {tuple(weight.shape)}")
    if not 0 <= num_base <= weight.shape[0]:
        raise ValueError(f"num_base={num_base} is outside [0, {weight.shape[0]}]")
    norms = weight.detach().to(torch.float32).norm(dim=1)
    return {
        "all": summarise(norms),
        "base": summarise(norms[:num_base]),
        "new": summarise(norms[num_base:]),
    }


def _unit_rows(rows: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm in float32; an all-zero row stays zero (its cosine with anything is 0)."""
    rows = rows.detach().to(torch.float32)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def isotropy(
    weight: Tensor,
    ids: IdsLike,
    sample_size: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Mean pairwise cosine similarity of a seeded random sample of rows, with a confidence interval.

    Mean cosine near 0 means the rows point in all directions (isotropic); near 1 means they share one direction,
    which is what happens when new tokens are initialised at the mean embedding and have not moved apart.

    ``min(sample_size, len(ids))`` rows are drawn without replacement (``torch.randperm`` seeded with ``seed``)
    and the statistic averages all ``n(n-1)/2`` distinct pairs ``i < j``.

    Confidence interval: normal approximation for a U-statistic built from the per-row means. Each row's mean
    cosine to the other sampled rows, ``m_i``, estimates its Hoeffding projection, and the variance of a
    second-order U-statistic is about ``4 * Var(m_i) / n``; the half-width is therefore
    ``z * 2 * std(m_i) / sqrt(n)``. Because ``Var(m_i)`` also includes the pair noise, this is slightly
    conservative (wider than needed) when rows are close to isotropic. No bootstrap is used, so the result is
    deterministic and costs one ``n x n`` Gram matrix.

    Returns ``mean_cosine, ci_low, ci_high, sample_size, pairs, confidence``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    index = _as_index(ids)
    n = min(sample_size, index.numel())
    if n < 2:
        raise ValueError(f"isotropy needs at least 2 rows, got {index.numel()} ids and sample_size={sample_size}")
    generator = torch.Generator().manual_seed(seed)
    picked = index[torch.randperm(index.numel(), generator=generator)[:n]]
    unit = _unit_rows(weight[picked])
    gram = unit @ unit.T
    off_diagonal_sums = gram.sum(dim=1) - gram.diagonal()
    row_means = (off_diagonal_sums / (n - 1)).to(torch.float64)
    mean = float(row_means.mean())
    half_width = NormalDist().inv_cdf(0.5 + confidence / 2) * 2.0 * float(row_means.std(correction=1)) / n**0.5
    return {
        "mean_cosine": mean,
        "ci_low": mean - half_width,
        "ci_high": mean + half_width,
        "sample_size": n,
        "pairs": n * (n - 1) // 2,
        "confidence": confidence,
    }


def _merge_topk(best_values: Tensor, best_ids: Tensor, values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the k largest of the running best and a new chunk (per query row)."""
    all_values = torch.cat([best_values, values], dim=1)
    all_ids = torch.cat([best_ids, ids.expand(values.shape[0], -1)], dim=1)
    top_values, positions = all_values.topk(min(k, all_values.shape[1]), dim=1)
    return top_values, all_ids.gather(1, positions)


def nearest_neighbours(
    weight: Tensor,
    query_ids: IdsLike,
    candidate_ids: IdsLike,
    k: int = 10,
    chunk_size: int = 8192,
    query_batch: int = 256,
) -> list[list[tuple[int, float]]]:
    """Top-``k`` candidates by cosine similarity for each query row, excluding the query itself.

    Returns one list per query, best first, of ``(token_id, cosine)``. A list is shorter than ``k`` when there
    are fewer candidates (the query is never its own neighbour).

    Memory: the full ``queries x candidates`` cosine matrix for a 172,451-row vocabulary would be far larger than
    needed, so candidates are processed ``chunk_size`` rows at a time and queries ``query_batch`` at a time,
    keeping only a running top-k. Peak extra memory is about ``(chunk_size + query_batch) * d`` plus
    ``query_batch * chunk_size`` float32 values.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    queries = _as_index(query_ids)
    candidates = _as_index(candidate_ids)
    results: list[list[tuple[int, float]]] = []
    for q_start in range(0, queries.numel(), query_batch):
        q_ids = queries[q_start : q_start + query_batch]
        q_unit = _unit_rows(weight[q_ids])
        best_values = torch.empty(q_ids.numel(), 0)
        best_ids = torch.empty(q_ids.numel(), 0, dtype=torch.long)
        for c_start in range(0, candidates.numel(), chunk_size):
            c_ids = candidates[c_start : c_start + chunk_size]
            sims = q_unit @ _unit_rows(weight[c_ids]).T
            sims.masked_fill_(q_ids[:, None] == c_ids[None, :], float("-inf"))
            best_values, best_ids = _merge_topk(best_values, best_ids, sims, c_ids[None, :], k)
        for values, ids in zip(best_values.tolist(), best_ids.tolist(), strict=True):
            results.append([(i, v) for i, v in zip(ids, values, strict=True) if v != float("-inf")])
    return results
