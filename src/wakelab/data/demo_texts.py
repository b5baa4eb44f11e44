"""The demo's lexicon and corpus, generated offline and deterministically by wakelab itself.

The demo has to run on a machine with no network, so it cannot download a corpus or a word list; and it has to give
the same numbers every time, so the text is generated here from a fixed table and a seeded ``random.Random``
(never the global generator, never the clock), and the same seed always writes byte-identical files.

Each coined word is a Wake-style blend (``gigglicker``, from *giggle* and *snicker*) that *stands in for an
ordinary word* of the same part of speech (*laugh*): the corpus is built from many sentence templates whose slots
are filled by the ordinary word or, more often, by the coined word meaning it. A coined word therefore appears in
exactly the contexts of a word the base model already knows, so a researcher can check whether the new token's
embedding moves toward the word it replaces (and, separately, toward the words it was blended from, which it
resembles only in spelling). ``constituents.tsv`` records both for every coined word.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..paths import publishing_file
from .demo_words import _ENTRIES, _FILLERS, _KINDS, _NAMES, _OPENERS, _SLOT, _TAILS, _TEMPLATE_LIST, _Entry

#: The seed the demo uses; any other seed gives the same lexicon and a different corpus.
DEMO_SEED = 0

_TARGET_CORPUS_BYTES = 240_000

_HELDOUT_FRACTION = 0.10

_MIN_COINED = 20  # every coined word occurs at least this often in the corpus

_MIN_MEANING = 2  # and its ordinary word at least this often

#: Every ordinary word occurs in the held-out text too: the meaning probe (the trajectory plugin's, on by default
#: in the demo) compares a coined word with its ordinary word in held-out contexts (up to
#: ``trajectory.probe_contexts`` of them); a word without one would be left out with a warning.
_MIN_HELDOUT_MEANING = 1

#: The held-out text uses the coined and the ordinary word equally often (the corpus: four coined in five), so a
#: text a tenth the corpus's size has both for every word.
_HELDOUT_COIN = (1, 1)

#: Part of the texts' cache folder name: bumped when the generator changes what a seed writes, so a cache written
#: by an earlier version is not read as this one's.
TEXTS_VERSION = 2


@dataclass(frozen=True)
class DemoTexts:
    """Paths of the files ``write_demo_texts`` wrote."""

    lexicon: Path
    corpus: Path
    heldout: Path
    constituents: Path


class _Deck:
    """Draws items in shuffled rounds, so every item is drawn equally often (give or take one)."""

    def __init__(self, items, rng: random.Random):
        self._items = list(items)
        self._rng = rng
        self._left: list = []

    def draw(self):
        if not self._left:
            self._left = self._items[:]
            self._rng.shuffle(self._left)
        return self._left.pop()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Generator:
    def __init__(self, rng: random.Random, seen: set[str], coin: tuple[int, int] = (4, 1)):
        self.rng = rng
        self.seen = seen  # sentences not to repeat (the corpus's, when writing the held-out text)
        by_kind = {kind: [e for e in _ENTRIES if e.kind == kind] for kind in _KINDS}
        self.entries = {kind: _Deck(by_kind[kind], rng) for kind in _KINDS}
        self.sizes = {kind: len(by_kind[kind]) for kind in _KINDS}
        self.templates = {
            kind: _Deck([t for t in _TEMPLATE_LIST if "{" + kind + "}" in t or "{a:" + kind + "}" in t], rng)
            for kind in _KINDS
        }
        # ``coin``: (coined, ordinary) uses per round, shuffled per word so no word falls short by chance; the
        # corpus gives four uses in five to the coined word.
        self.coin = {e.word: _Deck([True] * coin[0] + [False] * coin[1], rng) for e in _ENTRIES}
        self.kind_uses = dict.fromkeys(_KINDS, 0)
        self.coined = {e.word: 0 for e in _ENTRIES}
        self.meaning = {e.meaning: 0 for e in _ENTRIES}

    def sentence(self, names: tuple[str, str]) -> tuple[str, list[tuple[_Entry, bool]]]:
        # The kind used least (per word) so far picks the template, which keeps the words' counts level.
        kind = min(_KINDS, key=lambda k: (self.kind_uses[k] / self.sizes[k], _KINDS.index(k)))
        template = self.templates[kind].draw()
        fixed = template.startswith("=") or template.startswith('"')
        template = template.lstrip("=")
        fills: list[tuple[_Entry, bool]] = []

        def fill(match: re.Match) -> str:
            article, slot = match.group(1), match.group(2)
            if slot in self.entries:
                entry = self.entries[slot].draw()
                coined = self.coin[entry.word].draw()
                fills.append((entry, coined))
                word = entry.word if coined else entry.meaning
            elif slot == "name":
                word = names[0]
            elif slot == "name2":
                word = names[1]
            else:
                word = self.rng.choice(_FILLERS[slot])
            return f"{_article(word)} {word}" if article else word

        text = _SLOT.sub(fill, template)
        if not fixed and text.endswith("."):
            if self.rng.random() < 0.2:
                text = text[:-1] + self.rng.choice(_TAILS) + "."
            if "{time}" not in template and self.rng.random() < 0.2:
                text = self.rng.choice(_OPENERS) + text
        return text[0].upper() + text[1:], fills

    def paragraph(self) -> str:
        first, second = self.rng.sample(_NAMES, 2)
        sentences = []
        for _ in range(self.rng.randint(3, 7)):
            for _attempt in range(20):
                text, fills = self.sentence((first, second))
                if text not in self.seen:
                    break
            self.seen.add(text)
            sentences.append(text)
            for entry, coined in fills:
                self.kind_uses[entry.kind] += 1
                if coined:
                    self.coined[entry.word] += 1
                else:
                    self.meaning[entry.meaning] += 1
        return " ".join(sentences)

    def text(self, min_bytes: int, min_coined: int, min_meaning: int) -> str:
        paragraphs: list[str] = []
        size = 0
        while size < min_bytes or min(self.coined.values()) < min_coined or min(self.meaning.values()) < min_meaning:
            paragraph = self.paragraph()
            paragraphs.append(paragraph)
            size += len(paragraph.encode("utf-8")) + 2
        return "\n\n".join(paragraphs) + "\n"


def _check_table() -> None:
    """A bug guard for edits to the tables above: the words must be usable as new tokens."""
    words = [e.word for e in _ENTRIES]
    meanings = [e.meaning for e in _ENTRIES]
    if len(set(words)) != len(words) or len(set(meanings)) != len(meanings):
        raise ValueError("demo_text: coined words and meaning words must be unique")
    bad = [w for w in words if not re.fullmatch(r"[a-z]{6,}", w)]
    if bad:
        raise ValueError(f"demo_text: coined words must be 6+ lowercase ASCII letters: {bad}")


def _lexicon_text() -> str:
    header = (
        "# wakelab demo lexicon: coined words (Wake-style blends) to add as new tokens, one a line.\n"
        "# Each stands in for an ordinary word in the demo corpus; constituents.tsv says which, and what it blends.\n"
        "# Generated by wakelab.data.demo_texts; blank lines and lines starting with # are ignored.\n"
    )
    return header + "\n" + "".join(e.word + "\n" for e in _ENTRIES)


def _constituents_text() -> str:
    header = "# word\tmeaning_word\tparts\n"
    return header + "".join(f"{e.word}\t{e.meaning}\t{' '.join(e.parts)}\n" for e in _ENTRIES)


def _write(path: Path, text: str) -> None:
    with publishing_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def write_demo_texts(folder: Path, seed: int = DEMO_SEED) -> DemoTexts:
    """Write the demo's ``lexicon.txt``, ``corpus.txt``, ``heldout.txt`` and ``constituents.tsv`` into ``folder``.

    The same ``seed`` always gives byte-identical files; the lexicon and constituents do not depend on it. The
    held-out text is drawn from a separate random stream, is about a tenth the corpus's size, and repeats none of
    the corpus's sentences where it can avoid it.
    """
    _check_table()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    corpus_gen = _Generator(random.Random(f"wakelab-demo-corpus-{seed}"), set())
    corpus = corpus_gen.text(_TARGET_CORPUS_BYTES, _MIN_COINED, _MIN_MEANING)
    heldout_gen = _Generator(random.Random(f"wakelab-demo-heldout-{seed}"), set(corpus_gen.seen), _HELDOUT_COIN)
    heldout = heldout_gen.text(int(len(corpus.encode("utf-8")) * _HELDOUT_FRACTION), 1, _MIN_HELDOUT_MEANING)

    texts = DemoTexts(
        lexicon=folder / "lexicon.txt",
        corpus=folder / "corpus.txt",
        heldout=folder / "heldout.txt",
        constituents=folder / "constituents.tsv",
    )
    _write(texts.lexicon, _lexicon_text())
    _write(texts.corpus, corpus)
    _write(texts.heldout, heldout)
    _write(texts.constituents, _constituents_text())
    return texts


def read_constituents(path: Path) -> dict[str, list[str]]:
    """Read a constituents file: ``word<TAB>meaning_word<TAB>part1 part2 ...`` a line, ``#`` lines and blanks skipped.

    Returns ``{word: [meaning_word, part1, part2, ...]}`` in file order. A malformed line or a repeated word raises
    ``DataError`` naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read constituents file {path}: {exc}") from exc
    out: dict[str, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3 or len(fields[0].split()) != 1 or len(fields[1].split()) != 1 or not fields[2].split():
            raise DataError(f"{path}:{number}: expected 'word<TAB>meaning_word<TAB>part1 part2', got {line.strip()!r}")
        word, meaning, parts = (f.strip() for f in fields)
        if word in out:
            raise DataError(f"{path}:{number}: {word!r} is listed twice")
        out[word] = [meaning, *parts.split()]
    return out
