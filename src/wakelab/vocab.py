"""Turning a lexicon into new tokens, and the report that says what happened to every word.

Lexicons come from many editors: a Windows one starts the file with a byte-order mark, a macOS one may write "café"
decomposed (NFD) where another writes it composed (NFC). Both are the same word to a reader, so the BOM is dropped
and words are compared (and added) in NFC unless ``vocab.normalize`` is ``none``. A word that cannot be a token a
reader would type (inner whitespace, control characters, a runaway line) is rejected with its reason.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DataError

if TYPE_CHECKING:
    from .config.sections import VocabConfig


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
    rejected: list[dict]
    add_as: str
    corpus: dict = field(default_factory=dict)
    #: Words written in more than one Unicode form (NFC and NFD "café"): {"word": NFC form, "forms": [as written]}.
    canonical_duplicates: list[dict] = field(default_factory=list)
    normalize: str = "nfc"
    #: What the init plugin reported about the words (e.g. ``distill``'s words that fell back to subword).
    init: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"vocabulary {self.base_vocab_size:,} -> {self.new_vocab_size:,} tokens: {self.added:,} words added "
            f"(as {self.add_as}), {len(self.already_in_vocab)} already single tokens, "
            f"{len(self.duplicates)} duplicates, {len(self.rejected)} rejected",
        ]
        if self.rejected:
            reasons = Counter(r["reason"].split(" (")[0] for r in self.rejected)
            lines.append(
                "rejected words (each with its reason in vocab_report.json): "
                + ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
            )
        if self.canonical_duplicates:
            shown = ", ".join(d["word"] for d in self.canonical_duplicates[:5])
            how = "merged (vocab.normalize=nfc)" if self.normalize == "nfc" else "kept apart (vocab.normalize=none)"
            lines.append(
                f"{len(self.canonical_duplicates)} words written in more than one Unicode form, {how}: "
                f"{shown}{' ...' if len(self.canonical_duplicates) > 5 else ''}"
            )
        if self.corpus:
            c = self.corpus
            lines.append(
                f"corpus: {c['positions']:,} token positions, {c['new_token_share']:.2%} of them new tokens, "
                f"{c['stray_space_before_new']} stray space tokens before new words"
            )
        return "\n".join(lines)

    def to_dict(self, examples: int = 20) -> dict:
        data = asdict(self)
        for key in ("already_in_vocab", "duplicates", "rejected", "canonical_duplicates"):
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
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not a word
    except UnicodeDecodeError as exc:
        raise DataError(f"lexicon {path} is not UTF-8 (byte {exc.start}); re-save it as UTF-8") from None
    words = [line.strip() for line in text.splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise DataError(f"lexicon {path} holds no words (one word per line; # starts a comment)")
    return words


#: The longest word accepted by default: Finnegans Wake's thunderwords are 100 letters; a longer line is a mistake.
DEFAULT_MAX_WORD_CHARS = 128


def rejection_reason(word: str, max_chars: int = DEFAULT_MAX_WORD_CHARS) -> str | None:
    """Why ``word`` cannot be a new token, or None. The first reason found is the one given."""
    if len(word) > max_chars:
        return f"longer than {max_chars} characters ({len(word)}; vocab.max_word_chars)"
    for ch in word:
        if ch.isspace():
            return f"inner whitespace (U+{ord(ch):04X})"
        if unicodedata.category(ch) in ("Cc", "Cf"):
            return f"control character (U+{ord(ch):04X})"
        if not ch.isprintable():
            return f"unprintable character (U+{ord(ch):04X})"
    return None


def canonical_forms(words: list[str]) -> list[dict]:
    """Words written in more than one Unicode form: each NFC word with the distinct forms it was written in."""
    forms: dict[str, list[str]] = {}
    for word in dict.fromkeys(words):
        forms.setdefault(unicodedata.normalize("NFC", word), []).append(word)
    return [{"word": nfc, "forms": written} for nfc, written in forms.items() if len(written) > 1]


def expand_vocabulary(
    tokenizer,
    words: list[str],
    add_as: str,
    lexicon: str,
    *,
    normalize: str = "nfc",
    max_word_chars: int = DEFAULT_MAX_WORD_CHARS,
) -> tuple[VocabReport, list[str]]:
    """Add every new word to the tokenizer in ONE ``add_tokens`` call (one call per word is quadratic)."""
    from tokenizers import AddedToken

    base_size = len(tokenizer)
    variants = canonical_forms(words)
    if normalize == "nfc":
        words = [unicodedata.normalize("NFC", w) for w in words]
    counts = Counter(words)
    duplicates = [w for w, n in counts.items() if n > 1]
    unique = list(counts)
    reasons = {w: rejection_reason(w, max_word_chars) for w in unique}
    rejected = [{"word": _shown(w), "reason": reason} for w, reason in reasons.items() if reason]
    candidates = [w for w in unique if not reasons[w]]
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
        canonical_duplicates=variants,
        normalize=normalize,
    )
    return report, new_words


def expand_from_lexicon(tokenizer, vocab: VocabConfig, lexicon: str | Path) -> tuple[VocabReport, list[str]]:
    """The lexicon's words added as a run's ``vocab`` section says: training and export grow the tokenizer alike."""
    return expand_vocabulary(
        tokenizer,
        read_lexicon(lexicon),
        vocab.add_as,
        str(lexicon),
        normalize=vocab.normalize,
        max_word_chars=vocab.max_word_chars,
    )


def word_token_id(vocab: dict[str, int], word: str) -> int | None:
    """The id of a lexicon word's own token: `word` mode adds " word" (with its space), `plain` the bare word."""
    return vocab.get(word, vocab.get(" " + word))


def _shown(word: str, limit: int = 80) -> str:
    """A rejected word as the report shows it: a runaway line cut short."""
    return word if len(word) <= limit else f"{word[:limit]}... ({len(word)} characters)"


def corpus_stats(ids, num_base: int, tokenizer) -> dict:
    """How the corpus tokenizes: share of new-token positions and stray space tokens just before new words."""
    import numpy as np

    ids = np.asarray(ids)
    is_new = ids >= num_base
    space_ids = [
        i for i in {tokenizer.convert_tokens_to_ids(t) for t in ("Ġ", "▁", " ")} if isinstance(i, int) and i >= 0
    ]
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
