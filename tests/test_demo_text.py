"""The demo's offline lexicon and corpus: deterministic, big enough, and every coined word well represented."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest

from wakelab.data.demo_texts import DEMO_SEED, DemoTexts, read_constituents, write_demo_texts
from wakelab.errors import DataError

FILES = ("lexicon", "corpus", "heldout", "constituents")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> DemoTexts:
    return write_demo_texts(tmp_path_factory.mktemp("demo"))


def lexicon_words(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def word_counts(text: str) -> tuple[Counter, Counter]:
    """How often each whole word occurs, and how often it occurs right after a space."""
    everywhere, spaced = Counter(), Counter()
    for match in re.finditer(r"[A-Za-z]+", text):
        everywhere[match.group()] += 1
        if match.start() > 0 and text[match.start() - 1] == " ":
            spaced[match.group()] += 1
    return everywhere, spaced


@pytest.fixture(scope="module")
def corpus_counts(texts) -> tuple[Counter, Counter]:
    return word_counts(texts.corpus.read_text(encoding="utf-8"))


def sentences(text: str) -> list[str]:
    return [s for para in text.split("\n\n") for s in re.split(r"(?<=[.!?])\s+", para.strip()) if s]


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    start = time.perf_counter()
    a = write_demo_texts(tmp_path / "a", seed=DEMO_SEED)
    elapsed = time.perf_counter() - start
    b = write_demo_texts(tmp_path / "b", seed=DEMO_SEED)
    c = write_demo_texts(tmp_path / "c", seed=DEMO_SEED + 1)
    for name in FILES:
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes(), name
    assert a.corpus.read_bytes() != c.corpus.read_bytes()
    assert a.heldout.read_bytes() != c.heldout.read_bytes()
    assert elapsed < 2.0
    # Creates the (nested) folder, leaves no temporary files behind.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "constituents.tsv",
        "corpus.txt",
        "heldout.txt",
        "lexicon.txt",
    ]


def test_sizes(texts):
    corpus = texts.corpus.stat().st_size
    heldout = texts.heldout.stat().st_size
    assert corpus >= 200_000
    assert 0.05 * corpus <= heldout <= 0.2 * corpus


def test_lexicon_words_are_unique_lowercase_blends(texts):
    raw = texts.lexicon.read_text(encoding="utf-8").splitlines()
    assert raw[0].startswith("#") and "" in raw  # a comment header and a blank line for the reader to skip
    words = lexicon_words(texts.lexicon)
    assert 150 <= len(words) <= 300
    assert len(set(words)) == len(words)
    for word in words:
        assert re.fullmatch(r"[a-z]{6,}", word), word


def test_every_coined_word_is_frequent_lowercase_and_after_a_space(texts, corpus_counts):
    everywhere, spaced = corpus_counts
    for word in lexicon_words(texts.lexicon):
        assert spaced[word] >= 15, (word, spaced[word])
        # Never glued to anything on the left, never capitalised (so never sentence-initial).
        assert everywhere[word] == spaced[word], word
        assert everywhere[word.capitalize()] == 0, word


def test_constituents_cover_the_lexicon_and_meanings_occur(texts, corpus_counts):
    words = lexicon_words(texts.lexicon)
    table = read_constituents(texts.constituents)
    assert list(table) == words
    everywhere, _ = corpus_counts
    meanings = [row[0] for row in table.values()]
    assert len(set(meanings)) == len(meanings)
    for word, (meaning, *parts) in table.items():
        assert len(parts) >= 2, word
        assert meaning not in words
        # The ordinary word is there too, but the coined word gets most of its slots.
        assert 1 <= everywhere[meaning] < everywhere[word], (word, meaning)


def test_text_is_sentences_in_paragraphs(texts):
    corpus = texts.corpus.read_text(encoding="utf-8")
    paragraphs = corpus.strip().split("\n\n")
    assert len(paragraphs) > 100
    found = sentences(corpus)
    assert len(set(found)) > 0.9 * len(found)  # varied, not one sentence repeated
    for sentence in found:
        assert sentence[0].isupper() or sentence[0] == '"', sentence
        assert sentence[-1] in '.!?"', sentence


def test_heldout_is_new_text_with_the_coined_words(texts):
    corpus = set(sentences(texts.corpus.read_text(encoding="utf-8")))
    heldout_text = texts.heldout.read_text(encoding="utf-8")
    heldout = sentences(heldout_text)
    assert sum(s in corpus for s in heldout) < 0.5 * len(heldout)
    _, spaced = word_counts(heldout_text)
    assert all(spaced[word] >= 1 for word in lexicon_words(texts.lexicon))


def test_every_meaning_word_gives_the_meaning_probe_its_contexts_in_the_heldout_text(texts):
    """The demo agrees with itself: the trajectory plugin's meaning probe needs a held-out context for each word (its
    meaning word right after a space), and no constituents word is left out for want of one."""
    from wakelab.analysis.probe import Probe

    _, spaced = word_counts(texts.heldout.read_text(encoding="utf-8"))
    constituents = read_constituents(texts.constituents)
    short = {word: spaced[parts[0]] for word, parts in constituents.items() if spaced[parts[0]] < 1}
    assert not short, Probe(words=[], elsewhere=[], no_context=sorted(short)).report()


def test_read_constituents_round_trips(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("# word\tmeaning_word\tparts\n\nsmirtle\tlaugh\tsmile chortle\nriverrun\triver\triver run\n")
    assert read_constituents(path) == {"smirtle": ["laugh", "smile", "chortle"], "riverrun": ["river", "river", "run"]}


@pytest.mark.parametrize(
    "bad",
    ["smirtle laugh smile chortle", "smirtle\tlaugh", "smirtle\tlaugh\t", "smirtle\tlaugh\tsmile\textra"],
)
def test_read_constituents_rejects_a_malformed_line(tmp_path, bad):
    path = tmp_path / "c.tsv"
    path.write_text(f"# header\nriverrun\triver\triver run\n{bad}\n")
    with pytest.raises(DataError, match=r"c\.tsv:3:"):
        read_constituents(path)


def test_read_constituents_rejects_a_repeated_word_and_a_missing_file(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("riverrun\triver\triver run\nriverrun\tstream\triver run\n")
    with pytest.raises(DataError, match=r"c\.tsv:2:.*twice"):
        read_constituents(path)
    with pytest.raises(DataError, match="missing"):
        read_constituents(tmp_path / "missing.tsv")
