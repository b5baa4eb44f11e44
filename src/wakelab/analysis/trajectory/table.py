"""The per-token table: one row per new word, so a researcher can sort and filter what each word did.

Columns: the word and its id, how often it occurs in the training corpus, its norm at start and end, how far it
moved (L2), its nearest base tokens at start and end, whether it is frozen (moved less than the threshold: a word the
corpus never shows gets no gradient under the `tokens` strategy), and the meaning probe's scores when it has some.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["COLUMNS", "corpus_counts", "token_rows"]

COLUMNS = (
    "word", "token_id", "corpus_frequency", "norm_start", "norm_end", "displacement", "neighbours_start",
    "neighbours_end", "frozen", "probe_kl_before", "probe_kl_after", "substitution_before", "substitution_after",
    "probe_auc_before", "probe_auc_after",
)  # fmt: skip


def corpus_counts(corpus_ids, token_ids: Sequence[int]) -> list[int | None]:
    """How often each of ``token_ids`` occurs in the corpus (None for all when the corpus is not known)."""
    if corpus_ids is None:
        return [None] * len(token_ids)
    ids = np.asarray(corpus_ids).reshape(-1)
    if not len(token_ids):
        return []
    size = max(int(ids.max(initial=0)), max(token_ids)) + 1
    counts = np.bincount(ids[ids >= 0], minlength=size)
    return [int(counts[i]) for i in token_ids]


def token_rows(
    words: Sequence[str],
    token_ids: Sequence[int],
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    nearest: Callable[[torch.Tensor], list[list[str]]],
    frequency: Sequence[int | None] | None = None,
    probe_scores: Callable[[str], dict[str, Any]] | None = None,
    freeze_threshold: float = 1e-6,
) -> list[dict[str, Any]]:
    """The table's rows, in the order of ``words`` (``start``/``end``: the rows ``[n, d]`` before and after)."""
    start, end = start.detach().float().cpu(), end.detach().float().cpu()
    displacement = (end - start).norm(dim=1)
    norm_start, norm_end = start.norm(dim=1), end.norm(dim=1)
    near_start, near_end = nearest(start), nearest(end)
    frequency = list(frequency) if frequency is not None else [None] * len(words)
    rows = []
    for i, word in enumerate(words):
        row = {
            "word": word,
            "token_id": int(token_ids[i]),
            "corpus_frequency": frequency[i],
            "norm_start": float(norm_start[i]),
            "norm_end": float(norm_end[i]),
            "displacement": float(displacement[i]),
            "neighbours_start": " ".join(near_start[i]),
            "neighbours_end": " ".join(near_end[i]),
            "frozen": bool(float(displacement[i]) < freeze_threshold),
        }
        row.update(probe_scores(word) if probe_scores else dict.fromkeys(COLUMNS[9:]))
        rows.append(row)
    return rows
