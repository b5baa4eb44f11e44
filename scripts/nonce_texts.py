"""Write the second dataset of docs/inits.md: the demo's sentences, each coined blend replaced by a nonce word.

The demo's coined words are blends (``gigglicker`` = giggle + snicker, standing for *laugh*): spelled out, the base
model already half-reads them. Here every coined word becomes a seeded nonce word (``zubatek``) that still stands
for the same ordinary word in the same ordinary sentences, but whose spelling says nothing. An init that copies how
the model reads the spelling (subword, distill) gets no meaning for free on this dataset.

    python scripts/nonce_texts.py OUT_DIR   # lexicon.txt corpus.txt heldout.txt constituents.tsv
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

from wakelab.data.demo_texts import read_constituents, write_demo_texts

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def nonce(rng: random.Random, taken: set[str]) -> str:
    while True:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(3)) + rng.choice("kltx")
        if word not in taken:
            taken.add(word)
            return word


def main(out: Path) -> None:
    demo = write_demo_texts(out / "demo")
    constituents = read_constituents(demo.constituents)
    rng = random.Random("wakelab-nonce-0")
    taken: set[str] = set()
    mapping = {word: nonce(rng, taken) for word in constituents}
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, mapping), key=len, reverse=True)) + r")\b")

    def swap(text: str) -> str:
        return pattern.sub(lambda m: mapping[m.group(1)], text)

    (out / "lexicon.txt").write_text("\n".join(mapping.values()) + "\n", encoding="utf-8")
    (out / "corpus.txt").write_text(swap(demo.corpus.read_text(encoding="utf-8")), encoding="utf-8")
    (out / "heldout.txt").write_text(swap(demo.heldout.read_text(encoding="utf-8")), encoding="utf-8")
    lines = [f"{mapping[w]}\t{parts[0]}\t{parts[0]}" for w, parts in constituents.items()]
    (out / "constituents.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
