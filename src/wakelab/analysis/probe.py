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
from . import batched

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


def probe(model, p: Probe, *, batch_size: int = 16, max_len: int = 96) -> dict[str, dict[str, float]]:
    """``{word: {"kl": nats, "substitution": nats, "auc": share, "rank": median, "contexts": n}}`` for every probe
    word with a context.

    Each context's prefix runs once; the meaning word and the coined token both continue from its KV cache
    (:mod:`wakelab.analysis.batched`), and the head runs only where a figure is read. Figures are reduced batch by
    batch, so no more than one batch of vocabulary-wide logits exists at a time.
    """
    if not p.words:
        return {}
    was_training = model.training
    model.eval()
    token_ids = torch.tensor([w.token_id for w in p.words])
    contexts = [(index, prefix[-(max_len - len(w.meaning_ids)) :])
                for index, w in enumerate(p.words) for prefix in w.prefixes]  # fmt: skip
    figures: dict[int, dict[str, list[float]]] = {}
    try:
        away_logits, away_logprobs = _elsewhere(model, p.elsewhere, token_ids, batch_size, max_len)
        for start in range(0, len(contexts), batch_size):
            chunk = contexts[start : start + batch_size]
            slot, batch = batched.start(model, [prefix for _, prefix in chunk])
            continuations = []
            for index, _ in chunk:
                continuations += [p.words[index].meaning_ids, [p.words[index].token_id]]
            after, _ = batched.extend(model, batched.repeat(batch, 2), continuations)
            after_meaning, after_coined = torch.log_softmax(after[0::2], 1), torch.log_softmax(after[1::2], 1)
            kls = (after_meaning.exp() * (after_meaning - after_coined)).sum(1)
            coined = token_ids[[index for index, _ in chunk]][:, None]
            slot_logits = slot.gather(1, coined).squeeze(1)
            slot_logprobs = slot_logits - torch.logsumexp(slot, 1)
            ranks = 1 + (slot > slot_logits[:, None]).sum(1)
            for row, (index, _) in enumerate(chunk):
                f = figures.setdefault(index, {"kl": [], "slot": [], "slot_logit": [], "rank": []})
                for key, values in (("kl", kls), ("slot", slot_logprobs), ("slot_logit", slot_logits), ("rank", ranks)):
                    f[key].append(float(values[row]))
    finally:
        model.train(was_training)
    results: dict[str, dict[str, float]] = {}
    for index, f in sorted(figures.items()):
        w = p.words[index]
        away = [float(x) for x in away_logprobs[:, index]]
        substitution = sum(f["slot"]) / len(f["slot"]) - (sum(away) / len(away) if away else math.nan)
        results[w.word] = {"kl": sum(f["kl"]) / len(f["kl"]), "substitution": substitution,
                           "auc": _auc(f["slot_logit"], [float(x) for x in away_logits[:, index]]),
                           "rank": float(statistics.median(f["rank"])),
                           "contexts": float(len(f["kl"]))}  # fmt: skip
    return results


def _elsewhere(model, seqs: list[list[int]], token_ids: torch.Tensor, batch_size: int,
               max_len: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The probe words' logits and log-probabilities after each 'elsewhere' prefix: ``[prefixes, words]`` twice."""
    logits, logprobs = [torch.zeros((0, len(token_ids)))], [torch.zeros((0, len(token_ids)))]
    for start in range(0, len(seqs), batch_size):
        after, _ = batched.start(model, [s[-max_len:] for s in seqs[start : start + batch_size]])
        picked = after[:, token_ids]
        logits.append(picked)
        logprobs.append(picked - torch.logsumexp(after, 1, keepdim=True))
    return torch.cat(logits), torch.cat(logprobs)


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
