"""Stylometry of generated text against a corpus: does a model write like the text it was trained on?

Plain functions over strings, no model: :func:`words` splits text the one way every figure here counts it, and
:func:`profile` gives one text set's figures (coined-word rate, corpus-context share, distinct-1/2, repetition,
mean word length). :func:`burrows_delta` compares several text sets at once.

Burrows' Delta (Burrows 2002, as R's ``stylo`` computes "Classic Delta"): take the ``n`` most frequent words of all
the texts together; for each text, each word's relative frequency; z-score each word across the texts (mean and
*sample* standard deviation, ``ddof=1``, as ``stylo``'s ``sd``); Delta between two texts is the mean absolute
difference of their z-scores. Lower is closer. Words whose frequency is the same in every text (standard deviation
0) carry no information and are left out; how many words were used is returned beside the distances.

Why not a library: ``faststylometry`` (the maintained Python Delta) tokenises English with its own pronoun-removing
tokeniser and fits its z-scores on a corpus of several authors; here the texts are a corpus, a reference and a few
generated sets, with coined words that must count as words. The computation is twenty exact lines.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["WORD", "words", "burrows_delta", "coined_rate", "context_share", "distinct", "repetition_rate",
           "profile", "closest"]  # fmt: skip

#: A word: letters, with inner apostrophes or hyphens (``o'er``, ``riverrun-like``); digits and punctuation split.
WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")


def words(text: str) -> list[str]:
    """The text's words, lower-cased, in order."""
    return [w.lower() for w in WORD.findall(text)]


def burrows_delta(texts: Mapping[str, Sequence[str]], mfw: int = 100) -> tuple[dict[tuple[str, str], float], list[str]]:
    """Classic Delta between every pair of word lists in ``texts`` (at least 3), over their ``mfw`` most frequent
    words. Returns ``({(a, b): delta}, the words used)``; pairs are given both ways round."""
    if len(texts) < 3:
        raise ValueError(f"Burrows' Delta needs at least 3 texts to z-score across, got {len(texts)}")
    names = list(texts)
    counts = {name: Counter(texts[name]) for name in names}
    totals = {name: max(len(texts[name]), 1) for name in names}
    pooled: Counter[str] = Counter()
    for name in names:
        pooled.update(counts[name])
    # most frequent first; ties broken alphabetically so the word list never depends on dict order
    ranked = [w for w, _ in sorted(pooled.items(), key=lambda item: (-item[1], item[0]))][:mfw]
    freq = np.array([[counts[n][w] / totals[n] for w in ranked] for n in names], dtype=np.float64)
    if freq.size == 0:
        return {(a, b): float("nan") for a in names for b in names if a != b}, []
    std = freq.std(axis=0, ddof=1)
    keep = std > 0
    used = [w for w, k in zip(ranked, keep, strict=True) if k]
    if not used:
        return {(a, b): float("nan") for a in names for b in names if a != b}, []
    z = (freq[:, keep] - freq[:, keep].mean(axis=0)) / std[keep]
    out = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                out[(a, b)] = float(np.abs(z[i] - z[j]).mean())
    return out, used


def coined_rate(text_words: Sequence[str], coined: Iterable[str]) -> float:
    """Coined words per 1,000 words (0 for no words)."""
    coined = set(coined)
    if not text_words:
        return 0.0
    return 1000.0 * sum(1 for w in text_words if w in coined) / len(text_words)


def next_words(corpus_words: Sequence[str], coined: Iterable[str]) -> dict[str, set[str]]:
    """For each coined word, the words that follow it somewhere in the corpus."""
    coined = set(coined)
    out: dict[str, set[str]] = {}
    for word, following in zip(corpus_words, corpus_words[1:]):  # noqa: B905 - pairs of neighbours
        if word in coined:
            out.setdefault(word, set()).add(following)
    return out


def context_share(samples: Sequence[Sequence[str]], corpus_next: Mapping[str, set[str]]) -> tuple[float, int]:
    """Share of coined-word uses (with a word after them) whose next word follows that coined word in the corpus,
    and how many such uses there were (``nan`` share for none). The coined words are ``corpus_next``'s keys (a word
    the corpus never uses has an empty set)."""
    hits = uses = 0
    for sample in samples:
        for word, following in zip(sample, sample[1:]):  # noqa: B905 - pairs of neighbours
            if word in corpus_next:
                uses += 1
                hits += following in corpus_next[word]
    return (hits / uses if uses else float("nan")), uses


def distinct(samples: Sequence[Sequence[str]], n: int) -> float:
    """Distinct-n: unique n-grams over all n-grams of the samples pooled (n-grams never cross samples)."""
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(samples: Sequence[Sequence[str]], n: int = 4) -> float:
    """Mean over samples of the share of word n-grams that repeat one earlier in the same sample (seq-rep-n)."""
    rates = []
    for s in samples:
        grams = [tuple(s[i : i + n]) for i in range(len(s) - n + 1)]
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else float("nan")


def profile(samples: Sequence[str], coined: Iterable[str], corpus_next: Mapping[str, set[str]]) -> dict[str, float]:
    """The figures of one text set: words, coined per 1,000, corpus-context share, distinct-1/2, repetition, length."""
    coined = set(coined)
    split = [words(s) for s in samples]
    pooled = [w for s in split for w in s]
    share, uses = context_share(split, {w: corpus_next.get(w, set()) for w in coined})
    return {
        "words": len(pooled),
        "coined_per_1k": coined_rate(pooled, coined),
        "coined_uses": sum(1 for w in pooled if w in coined),
        "corpus_context_share": share,
        "context_uses": uses,
        "distinct_1": distinct(split, 1),
        "distinct_2": distinct(split, 2),
        "repetition_4": repetition_rate(split, 4),
        "mean_word_length": float(np.mean([len(w) for w in pooled])) if pooled else float("nan"),
    }


def closest(deltas: Mapping[tuple[str, str], float], target: str, candidates: Sequence[str]) -> str | None:
    """The candidate with the lowest Delta to ``target`` (None when none has a number)."""
    scored = [(deltas.get((c, target), float("nan")), c) for c in candidates]
    scored = [(d, c) for d, c in scored if d == d]
    return min(scored)[1] if scored else None
