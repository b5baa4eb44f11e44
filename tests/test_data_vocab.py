"""Corpus -> blocks, and lexicon -> new tokens, with the report that says what happened."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from wakelab.config import DataConfig
from wakelab.data import corpus as data
from wakelab.errors import DataError
from wakelab.vocab import corpus_stats, expand_vocabulary, read_lexicon


def test_blocks_are_non_overlapping_when_stride_equals_length():
    ids = np.arange(10)
    blocks = data.make_blocks(ids, 4, 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert data.make_blocks(ids, 4, 3).tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert data.make_blocks(ids, 11, 11).shape == (0, 11)


def test_explicit_shift_examples_are_the_notebooks():
    dataset = data.BlockDataset(data.make_blocks(np.arange(10), 5, 1), explicit_shift=True)
    example = dataset[2]
    assert example["input_ids"].tolist() == [2, 3, 4, 5]
    assert example["shift_labels"].tolist() == [3, 4, 5, 6]
    assert len(dataset) == 6


def test_tokenized_corpus_is_cached_by_content(tiny_model, tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    calls = []
    real = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    first = data.tokenize("the river ran past the hill\n" * 50, tokenizer, tmp_path)
    second = data.tokenize("the river ran past the hill\n" * 50, tokenizer, tmp_path)
    assert np.array_equal(first, second) and len(calls) == 1
    data.tokenize("another text\n", tokenizer, tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.npy"))) == 2


def test_heldout_split_leaves_a_gap(tiny_model, texts, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = DataConfig(seq_len=16, stride=8, heldout_fraction=0.1)
    corpus = data.build_datasets(cfg, str(texts["corpus"]), None, tokenizer, tmp_path)
    train_last = corpus.train.blocks[-1]
    held_first = corpus.heldout.blocks[0]
    ids = corpus.train_ids.tolist()

    # Find where the last training block and the first held-out block start: they must not overlap.
    def start_of(block):
        block = block.tolist()
        return next(i for i in range(len(ids)) if ids[i : i + len(block)] == block)

    assert start_of(train_last) + 16 <= start_of(held_first)


def test_lexicon_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "lex.txt"
    path.write_text("# header\n\nriverrun\n  smirtle  \n# more\n", encoding="utf-8")
    assert read_lexicon(path) == ["riverrun", "smirtle"]


def test_expansion_adds_in_one_call_and_reports(tiny_model, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    calls = []
    real = type(tokenizer).add_tokens
    monkeypatch.setattr(type(tokenizer), "add_tokens", lambda self, t, **k: calls.append(len(t)) or real(self, t, **k))
    words = ["riverrun", "smirtle", "riverrun", "the", "two words", "glimmerous"]
    report, new_words = expand_vocabulary(tokenizer, words, "word", "lex.txt")
    assert calls == [3]
    assert new_words == ["riverrun", "smirtle", "glimmerous"]
    assert report.duplicates == ["riverrun"]
    assert report.already_in_vocab == ["the"]
    assert report.rejected == [{"word": "two words", "reason": "inner whitespace (U+0020)"}]
    assert report.new_vocab_size == report.base_vocab_size + 3


@pytest.mark.parametrize("add_as, stray_expected", [("word", 0), ("plain", None)])
def test_word_mode_avoids_stray_space_tokens(tiny_model, add_as, stray_expected):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = len(tokenizer)
    expand_vocabulary(tokenizer, ["riverrun"], add_as, "lex.txt")
    tokens = tokenizer.tokenize("The riverrun rose")
    ids = tokenizer("The riverrun rose")["input_ids"]
    stats = corpus_stats(ids, base, tokenizer)
    assert stats["new_token_positions"] == 1
    if stray_expected == 0:
        assert stats["stray_space_before_new"] == 0
        assert tokens[:2] == ["The", " riverrun"]  # the space is absorbed: no "Ġ" between them
    else:
        assert stats["stray_space_before_new"] == 1  # byte-level BPE leaves "Ġ" before the bare added string


def test_read_text_errors(tmp_path):
    with pytest.raises(DataError, match="corpus not found"):
        data.read_text(tmp_path / "none.txt")
