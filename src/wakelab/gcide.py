"""An offline English text for a faithful Wordybird: GCIDE, split into a tokenizer's text and a ~2 MB corpus.

The notebook trained on a ~2 MB slice of FineWeb with GPT-2's tokenizer (trained on web text), and 60.9% of the
50,257 tokens occur in that slice. Reproducing the proportion offline needs a large natural-language English text
that every machine can install the same way. GCIDE (the Collaborative International Dictionary of English, Debian's
``dict-gcide``: Webster's 1913 plus WordNet glosses, ~40 MB of definitions and literary quotations) is one. Its
entries are the documents: a fixed, content-hashed random sample of them up to ``CORPUS_BYTES`` is the corpus, and
a byte-level BPE is trained on all the others (``bpe.build_gcide_bpe``), so the tokenizer and the corpus are the
same kind of text and never the same text — as GPT-2's WebText and the FineWeb slice are. Technical text does much
worse (Linux or Python documentation: 34-42%), because its rare tokens are identifiers that stay in their own files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

from .errors import DataError
from .paths import cache_root, publishing_file

#: Where Debian's dict-gcide puts the dictionary (dictzip: gzip-compatible); ``WAKELAB_GCIDE`` names another file.
DEFAULT_PATH = Path("/usr/share/dictd/gcide.dict.dz")
INSTALL = "apt-get install dict-gcide"
#: The corpus slice: about the notebook's ~2 MB of FineWeb.
CORPUS_BYTES = 2_000_000
#: The header entries dictd keeps in the file (database name, URL, licence notice): not dictionary text.
_HEADER = re.compile(r"^00-?database", re.IGNORECASE)


def source_path() -> Path:
    """The GCIDE dictionary file, or a one-line error naming the install command."""
    path = Path(os.environ.get("WAKELAB_GCIDE") or DEFAULT_PATH)
    if not path.is_file():
        raise DataError(
            f"the GCIDE dictionary text is missing ({path}); install it with `{INSTALL}` (or set WAKELAB_GCIDE)"
        )
    return path


def fingerprint(path: Path) -> str:
    """A short content hash, so a changed dictionary gets its own corpus and tokenizer in the cache."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def read_entries(path: Path) -> list[str]:
    """The dictionary's entries in file order: each begins with a headword at the start of a line after a blank line."""
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8", errors="replace")
    entries = (e.strip("\n") for e in re.split(r"\n\n(?=\S)", text))
    return [e for e in entries if e.strip() and not _HEADER.match(e)]


def split(entries: list[str], corpus_bytes: int = CORPUS_BYTES) -> tuple[list[str], list[str]]:
    """(corpus, tokenizer text): entries in the order of their content hash fill the corpus up to ``corpus_bytes``;
    the rest train the tokenizer. A random sample that is the same on every machine, with each in file order."""
    order = sorted(range(len(entries)), key=lambda i: hashlib.sha256(entries[i].encode("utf-8")).digest())
    in_corpus, size = set(), 0
    for i in order:
        if size >= corpus_bytes:
            break
        in_corpus.add(i)
        size += len(entries[i].encode("utf-8")) + 2
    corpus = [e for i, e in enumerate(entries) if i in in_corpus]
    rest = [e for i, e in enumerate(entries) if i not in in_corpus]
    return corpus, rest


@lru_cache(maxsize=2)
def load_split(path: Path, key: str) -> tuple[list[str], list[str]]:
    """``split(read_entries(path))``, read once per process for the file whose ``fingerprint`` is ``key`` (the
    corpus and the tokenizer both need it)."""
    return split(read_entries(path))


def ensure_corpus() -> Path:
    """The corpus slice as a UTF-8 file under the wakelab cache (written once per dictionary)."""
    path = source_path()
    key = fingerprint(path)
    target = cache_root() / "gcide" / f"corpus-{CORPUS_BYTES}-{key}.txt"
    if target.is_file():
        return target
    corpus, _ = load_split(path, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    with publishing_file(target) as tmp:
        tmp.write_text("\n\n".join(corpus) + "\n", encoding="utf-8")
    return target
