"""Turning a lexicon into new tokens, and the report that says what happened to every word."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DataError


@dataclass
class VocabReport:
    """What the expansion did, and how the corpus tokenizes with the new tokens."""

    lexicon: str
    base_vocab_size: int
    lexicon_lines: int
    added: int
    new_vocab_size: int
    already_in_vocab: list[str]
    duplicates: list[str]
    rejected: list[str]
    add_as: str
    corpus: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"vocabulary {self.base_vocab_size:,} -> {self.new_vocab_size:,} tokens: {self.added:,} words added "
            f"(as {self.add_as}), {len(self.already_in_vocab)} already single tokens, "
            f"{len(self.duplicates)} duplicates, {len(self.rejected)} rejected",
        ]
        if self.corpus:
            c = self.corpus
            lines.append(
                f"corpus: {c['positions']:,} token positions, {c['new_token_share']:.2%} of them new tokens, "
                f"{c['stray_space_before_new']} stray space tokens before new words"
            )
        return "\n".join(lines)

    def to_dict(self, examples: int = 20) -> dict:
        data = asdict(self)
        for key in ("already_in_vocab", "duplicates", "rejected"):
            data[f"{key}_count"] = len(data[key])
            data[key] = data[key][:examples]
        return data

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_lexicon(path: str | Path) -> list[str]:
    """The lexicon's words in file order: UTF-8, one a line, blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"lexicon not found: {path} (set vocab.lexicon to a UTF-8 file with one word per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"lexicon {path} is not UTF-8 (byte {exc.start}); re-save it as UTF-8") from None
    words = [line.strip() for line in text.splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise DataError(f"lexicon {path} holds no words (one word per line; # starts a comment)")
    return words


def expand_vocabulary(tokenizer, words: list[str], add_as: str, lexicon: str) -> tuple[VocabReport, list[str]]:
    """Add every new word to the tokenizer in ONE ``add_tokens`` call (one call per word is quadratic)."""
    from tokenizers import AddedToken

    base_size = len(tokenizer)
    counts = Counter(words)
    duplicates = [w for w, n in counts.items() if n > 1]
    unique = list(counts)
    rejected = [w for w in unique if any(ch.isspace() for ch in w) or not w.isprintable()]
    candidates = [w for w in unique if w not in set(rejected)]
    vocab = tokenizer.get_vocab()
    already = [w for w in candidates if w in vocab or len(tokenizer.tokenize(" " + w)) == 1]
    already_set = set(already)
    new_words = [w for w in candidates if w not in already_set]
    if not new_words:
        raise DataError(
            f"lexicon {lexicon}: all {len(unique)} words are already single tokens of the base vocabulary "
            "(or rejected); nothing to add"
        )
    if add_as == "word":
        # The token is the word with the space before it, as a byte-level BPE word token is: " riverrun" is one token
        # (no stray space token) and decodes back to " riverrun". AddedToken(lstrip=True) matched the same text but
        # dropped every whitespace it swallowed on decode ("Theriverrun"). A word with no space before it (start of a
        # line or text, after a quote) stays in base sub-tokens.
        tokens = [AddedToken(" " + w, normalized=False) for w in new_words]
    else:
        tokens = new_words
    added = tokenizer.add_tokens(tokens)
    report = VocabReport(
        lexicon=str(lexicon),
        base_vocab_size=base_size,
        lexicon_lines=len(words),
        added=added,
        new_vocab_size=len(tokenizer),
        already_in_vocab=already,
        duplicates=duplicates,
        rejected=rejected,
        add_as=add_as,
    )
    return report, new_words


def corpus_stats(ids, num_base: int, tokenizer) -> dict:
    """How the corpus tokenizes: share of new-token positions and stray space tokens just before new words."""
    import numpy as np

    ids = np.asarray(ids)
    is_new = ids >= num_base
    space_ids = [i for i in {tokenizer.convert_tokens_to_ids(t) for t in ("Ġ", "▁", " ")} if isinstance(i, int) and i >= 0]
    space_ids = [i for i in space_ids if i != tokenizer.unk_token_id]
    before_new = np.zeros_like(is_new)
    before_new[:-1] = is_new[1:]
    stray = int(np.isin(ids, space_ids).__and__(before_new).sum()) if space_ids else 0
    return {
        "positions": int(ids.size),
        "new_token_positions": int(is_new.sum()),
        "new_token_share": float(is_new.mean()) if ids.size else 0.0,
        "distinct_new_tokens_seen": int(np.unique(ids[is_new]).size),
        "stray_space_before_new": stray,
    }
