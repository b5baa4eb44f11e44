"""The meaning probe: has the model learned to use a coined word the way it uses the word it stands for?

Cosine neighbours miss this (a row can be far from its meaning word's row and still do that word's job), so the probe
asks the model itself, in held-out contexts where the meaning word occurs:

- **KL** (nats): ``KL(P(next | prefix + meaning) || P(next | prefix + coined))``, averaged over contexts. Zero when
  the coined word leaves the model expecting exactly what the meaning word does; large for a word it has not learned.
- **substitution** (nats): mean ``log P(coined | prefix)`` where the meaning word would stand, minus the mean at
  word boundaries where it would not (other held-out prefixes). Positive when the model has learned *where* the
  coined word goes; about zero for a word it has never seen used. A log-probability difference, it grows with the
  row's norm: a long row that learned little can outscore a short one that learned more.
- **AUC** (0..1, norm-free): the share of (meaning-word slot, elsewhere) pairs in which the coined word's *logit* is
  higher at the slot; ties count half. Scaling a row scales all of its logits alike (a head without bias), so their
  order across contexts, and this score, do not change with its norm. 0.5: no idea where the word goes; 1: always
  preferred where its meaning word stands.
- **rank**: the coined word's median rank among all tokens at the meaning word's slots (1 = the model's first
  choice); where it stands against the whole vocabulary (a rank, so bounded, but not free of the norm).

:func:`probe` runs both for a set of :class:`ProbeWord` s on a model in eval mode, batched, under ``no_grad``.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..vocab import word_token_id

__all__ = ["ProbeWord", "Probe", "build_probe", "probe", "summarise"]


@dataclass
class ProbeWord:
    """A coined word, its token id, its meaning word, and held-out prefixes that the meaning word follows."""

    word: str
    token_id: int
    meaning: str
    meaning_ids: list[int]
    prefixes: list[list[int]] = field(default_factory=list)  # token ids of text right before the meaning word


@dataclass
class Probe:
    """The prepared probe: its words, the 'elsewhere' prefixes, and what was left out and why."""

    words: list[ProbeWord]
    elsewhere: list[list[int]]
    not_in_base: list[str] = field(default_factory=list)  # meaning words the base vocabulary cannot spell alone
    not_new: list[str] = field(default_factory=list)  # constituents words that are not new tokens of this run
    no_context: list[str] = field(default_factory=list)  # meaning words absent from the held-out text

    def report(self) -> list[str]:
        """Warnings, one line each, for what the probe left out."""
        lines = []
        left_out = (("are not new tokens of this run", self.not_new),
                    ("have a meaning word that is not in the base vocabulary", self.not_in_base),
                    ("have a meaning word that never occurs in the held-out text", self.no_context))  # fmt: skip
        for label, items in left_out:
            if items:
                shown = ", ".join(items[:10]) + (f" and {len(items) - 10} more" if len(items) > 10 else "")
                lines.append(f"meaning probe: {len(items)} constituents words {label} and are left out: {shown}")
        return lines


def build_probe(
    tokenizer,
    constituents: Mapping[str, Sequence[str]],
    heldout_text: str,
    *,
    num_base: int,
    contexts: int = 4,
    max_words: int = 64,
    prefix_chars: int = 160,
    elsewhere: int = 64,
    seed: int = 0,
) -> Probe:
    """Find, for each constituents word that is a new token, up to ``contexts`` held-out prefixes of its meaning word.

    ``constituents`` maps a coined word to ``[meaning_word, part, ...]`` (the ``init.constituents`` file). A meaning
    word must be spelled by base tokens only (else the comparison is not between a new and a known word).
    """
    vocab = tokenizer.get_vocab()
    out = Probe(words=[], elsewhere=[])
    rng = random.Random(seed)
    for word, parts in constituents.items():
        if len(out.words) >= max_words:
            break
        token_id = word_token_id(vocab, word)
        if token_id is None or token_id < num_base:
            out.not_new.append(word)
            continue
        meaning = parts[0]
        meaning_ids = tokenizer(" " + meaning, add_special_tokens=False)["input_ids"]
        if not meaning_ids or any(i >= num_base for i in meaning_ids):
            out.not_in_base.append(word)
            continue
        starts = [m.start() for m in re.finditer(rf"(?<![\w-]){re.escape(meaning)}(?![\w-])", heldout_text)]
        starts = [s for s in starts if s > 0 and heldout_text[s - 1] == " "]
        if not starts:
            out.no_context.append(word)
            continue
        chosen = sorted(rng.sample(starts, min(contexts, len(starts))))
        prefixes = [_prefix_ids(tokenizer, heldout_text, s - 1, prefix_chars) for s in chosen]
        out.words.append(ProbeWord(word, int(token_id), meaning, list(meaning_ids), [p for p in prefixes if p]))
    meaning_words = {w.meaning for w in out.words}
    boundaries = [m.start() for m in re.finditer(r"(?<=\w) (?=\w)", heldout_text)]
    boundaries = [b for b in boundaries if _next_word(heldout_text, b + 1) not in meaning_words]
    for b in sorted(rng.sample(boundaries, min(elsewhere, len(boundaries)))):
        ids = _prefix_ids(tokenizer, heldout_text, b, prefix_chars)
        if ids:
            out.elsewhere.append(ids)
    return out


def _prefix_ids(tokenizer, text: str, end: int, chars: int) -> list[int]:
    """Token ids of the text before ``end`` (a space), starting at a word boundary at most ``chars`` before it."""
    start = max(0, end - chars)
    if start > 0:
        space = text.find(" ", start)
        start = space + 1 if 0 <= space < end else start
    return tokenizer(text[start:end], add_special_tokens=False)["input_ids"]


def _next_word(text: str, at: int) -> str:
    match = re.match(r"[\w'-]+", text[at:])
    return match.group(0) if match else ""


@torch.no_grad()
def _last_logprobs(model, sequences: list[list[int]], positions: list[list[int]], batch_size: int,
                   raw: bool = False) -> list[torch.Tensor]:  # fmt: skip
    """For each sequence, log-softmax of the logits (``raw``: the logits) at each of its ``positions``."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for i, wanted in enumerate(positions[start : start + batch_size]):
            out.append((logits[i, wanted] if raw else torch.log_softmax(logits[i, wanted], dim=-1)).cpu())
    return out


def probe(model, p: Probe, *, batch_size: int = 16, max_len: int = 96) -> dict[str, dict[str, float]]:
    """``{word: {"kl": nats, "substitution": nats, "auc": share, "rank": median, "contexts": n}}`` for every probe
    word with a context."""
    was_training = model.training
    model.eval()
    try:
        elsewhere = [s[-max_len:] for s in p.elsewhere]
        other = (
            _last_logprobs(model, elsewhere, [[len(s) - 1] for s in elsewhere], batch_size, raw=True)
            if elsewhere
            else []
        )
        sequences: list[list[int]] = []
        positions: list[list[int]] = []
        owners: list[tuple[int, str]] = []
        for index, w in enumerate(p.words):
            for prefix in w.prefixes:
                prefix = prefix[-(max_len - len(w.meaning_ids)) :]
                sequences.append(prefix + w.meaning_ids)  # the slot (end of prefix) and after the meaning word
                positions.append([len(prefix) - 1, len(prefix) + len(w.meaning_ids) - 1])
                owners.append((index, "meaning"))
                sequences.append(prefix + [w.token_id])
                positions.append([len(prefix)])
                owners.append((index, "coined"))
        logits = _last_logprobs(model, sequences, positions, batch_size, raw=True) if sequences else []
    finally:
        model.train(was_training)
    other_lp = [torch.log_softmax(x, dim=-1) for x in other]
    results: dict[str, dict[str, float]] = {}
    for index, w in enumerate(p.words):
        kls, slots, slot_logits, ranks = [], [], [], []
        mine = [lp for lp, (owner, _) in zip(logits, owners, strict=True) if owner == index]
        for meaning_raw, coined_raw in zip(mine[0::2], mine[1::2], strict=True):
            meaning, coined = torch.log_softmax(meaning_raw, dim=-1), torch.log_softmax(coined_raw, dim=-1)
            after_meaning, after_coined = meaning[1], coined[0]
            kls.append(float((after_meaning.exp() * (after_meaning - after_coined)).sum()))
            slots.append(float(meaning[0][w.token_id]))
            slot_logits.append(float(meaning_raw[0][w.token_id]))
            ranks.append(1 + int((meaning_raw[0] > meaning_raw[0][w.token_id]).sum()))
        if not kls:
            continue
        away = [float(lp[0][w.token_id]) for lp in other_lp]
        substitution = sum(slots) / len(slots) - (sum(away) / len(away) if away else math.nan)
        away_logits = [float(x[0][w.token_id]) for x in other]
        results[w.word] = {"kl": sum(kls) / len(kls), "substitution": substitution,
                           "auc": _auc(slot_logits, away_logits), "rank": float(statistics.median(ranks)),
                           "contexts": float(len(kls))}  # fmt: skip
    return results


def _auc(high: list[float], low: list[float]) -> float:
    """P(a value of ``high`` > one of ``low``), ties half: the Mann-Whitney U over all pairs (nan for no pairs)."""
    if not high or not low:
        return math.nan
    wins = sum((h > v) + 0.5 * (h == v) for h in high for v in low)
    return wins / (len(high) * len(low))


def summarise(before: Mapping[str, Mapping[str, float]] | None, after: Mapping[str, Mapping[str, float]]) -> dict:
    """Mean KL and substitution over the probe words, after (and before) training: the metrics to log."""
    out: dict[str, float] = {}
    for label, results in (("before", before), ("after", after)):
        if not results:
            continue
        values = list(results.values())
        out[f"probe_kl_{label}"] = sum(v["kl"] for v in values) / len(values)
        out[f"probe_substitution_{label}"] = sum(v["substitution"] for v in values) / len(values)
        aucs = [v["auc"] for v in values if "auc" in v and v["auc"] == v["auc"]]
        if aucs:
            out[f"probe_auc_{label}"] = sum(aucs) / len(aucs)
        if all("rank" in v for v in values):
            out[f"probe_rank_{label}"] = float(statistics.median(v["rank"] for v in values))
    if after:
        out["probe_words"] = float(len(after))
    return out


def by_word(before, after) -> Callable[[str], dict[str, float | None]]:
    """A per-word lookup of the probe scores, for the per-token table."""

    def scores(word: str) -> dict[str, float | None]:
        b, a = (before or {}).get(word, {}), (after or {}).get(word, {})
        return {"probe_kl_before": b.get("kl"), "probe_kl_after": a.get("kl"),
                "substitution_before": b.get("substitution"), "substitution_after": a.get("substitution"),
                "probe_auc_before": b.get("auc"), "probe_auc_after": a.get("auc")}  # fmt: skip

    return scores
