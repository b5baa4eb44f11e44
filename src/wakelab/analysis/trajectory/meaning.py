"""Meaning in the picture: each tracked word's meaning word (from ``init.constituents``) as a fixed base point.

The constituents file says what a coined word stands for (``riverrun -> river``). The meaning word's row is the mean
of the base rows that spell it (one row for most meaning words), fixed for the run. Per frame, each tracked word's
cosine distance to that row is measured (tracked words only: a few hundred dot products, at any vocabulary size), so
the page can draw the word, its meaning point, the thin line between them, and a chart of the distance over steps,
and say how many words moved closer and how many moved away.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...vocab import word_token_id

__all__ = ["Meanings", "closer_and_away", "resolve_meanings"]


@dataclass
class Meanings:
    """Per tracked word: its meaning word ('' when none), the meaning row, and the base ids that spell it."""

    words: list[str]
    rows: torch.Tensor  # [tracked, d] (zeros where there is no meaning word)
    base_ids: list[list[int]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def known(self) -> np.ndarray:
        return np.array([bool(w) for w in self.words], dtype=bool)

    def distance(self, tracked_rows: torch.Tensor) -> np.ndarray:
        """Cosine distance (1 - cosine) of each tracked row to its meaning row; NaN where there is none."""
        rows = torch.nn.functional.normalize(tracked_rows.detach().float().cpu(), dim=1)
        meant = torch.nn.functional.normalize(self.rows, dim=1)
        out = (1.0 - (rows * meant).sum(1)).numpy().astype(np.float32)
        out[~self.known] = np.nan
        return out


def _shown(items: Sequence[str]) -> str:
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def resolve_meanings(
    constituents: Mapping[str, Sequence[str]],
    tokenizer,
    tracked_ids: Sequence[int],
    base_rows: torch.Tensor,
    *,
    num_base: int,
    source: str = "constituents file",
    warn: Callable[[str], None] | None = None,
) -> Meanings:
    """Match the constituents file to the tracked tokens; words it names that are not new tokens of this run (not in
    the lexicon) are reported in one line with their count, and the rest are drawn."""
    vocab = tokenizer.get_vocab()
    position = {int(t): i for i, t in enumerate(tracked_ids)}
    words = [""] * len(tracked_ids)
    rows = torch.zeros(len(tracked_ids), base_rows.shape[1])
    base_ids: list[list[int]] = [[] for _ in tracked_ids]
    not_new, not_spelled = [], []
    for word, parts in constituents.items():
        token_id = word_token_id(vocab, word)
        if token_id is None or token_id < num_base:
            not_new.append(word)
            continue
        if int(token_id) not in position:
            continue  # a new token that is not tracked: drawn as density, without a meaning line
        ids = tokenizer(" " + parts[0], add_special_tokens=False)["input_ids"]
        if not ids or any(i >= num_base for i in ids):
            not_spelled.append(word)
            continue
        at = position[int(token_id)]
        words[at] = parts[0]
        base_ids[at] = [int(i) for i in ids]
        rows[at] = base_rows[ids].detach().float().cpu().mean(0)
    out = Meanings(words, rows, base_ids)
    if not_new:
        out.messages.append(
            f"{source}: {len(not_new)} of {len(constituents)} words are not new tokens of this run (not in the "
            f"lexicon) and get no meaning line: {_shown(not_new)}"
        )
    if not_spelled:
        out.messages.append(
            f"{source}: {len(not_spelled)} words have a meaning word the base vocabulary cannot spell and get no "
            f"meaning line: {_shown(not_spelled)}"
        )
    for line in out.messages:
        if warn is not None:
            warn(line)
    return out


def closer_and_away(first: np.ndarray, now: np.ndarray, tolerance: float = 1e-4) -> tuple[int, int, int]:
    """How many words are closer to their meaning word now than at first, how many farther, how many unchanged."""
    known = ~(np.isnan(first) | np.isnan(now))
    delta = now[known] - first[known]
    return int((delta < -tolerance).sum()), int((delta > tolerance).sum()), int((np.abs(delta) <= tolerance).sum())
