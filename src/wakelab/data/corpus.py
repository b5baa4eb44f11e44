"""Corpus text -> token ids -> fixed-length training blocks, with a held-out split and a content-hash cache."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig, RunConfig
from ..errors import ConfigError, DataError
from ..paths import cache_root


def resolve_lexicon(config: RunConfig) -> str | None:
    """The lexicon path; `demo` names the embedded demo lexicon."""
    if config.vocab.lexicon == "demo":
        from .demo import ensure_demo_texts

        return str(ensure_demo_texts().lexicon)
    return config.vocab.lexicon


def text_form(config: RunConfig) -> str:
    """How the corpus and held-out text are read: in the lexicon's form (``vocab.normalize``) when the run adds
    words, as written otherwise (Wordybird's corpus is the notebook's bytes)."""
    return config.vocab.normalize if config.vocab.lexicon else "none"


def resolve_data_paths(config: RunConfig) -> tuple[str | None, str | None, str | None]:
    """Lexicon, corpus and held-out paths; `demo` names the embedded demo texts, `gcide` the GCIDE corpus slice."""
    corpus, heldout = config.data.corpus, config.data.heldout
    if "demo" in (corpus, heldout):
        from .demo import ensure_demo_texts

        texts = ensure_demo_texts()
        corpus = str(texts.corpus) if corpus == "demo" else corpus
        heldout = str(texts.heldout) if heldout == "demo" else heldout
    if corpus == "gcide":
        from .gcide import ensure_corpus

        corpus = str(ensure_corpus())
    if corpus is None:
        raise ConfigError("data.corpus: no corpus given; set data.corpus to a UTF-8 text file (or `demo`, `gcide`)")
    return resolve_lexicon(config), corpus, heldout


def token_cache_dir(cfg: DataConfig) -> Path:
    """Where tokenized corpora are cached by content hash (``data.cache_dir``, else under the wakelab cache)."""
    return Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "tokens"


def read_text(path: str | Path, what: str = "corpus", normalize: str = "none") -> str:
    """The file's text; ``normalize="nfc"`` reads it in the form the lexicon's words were added in
    (``vocab.normalize``), so a word typed decomposed in the corpus still meets its token."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path} (set data.{what} to a UTF-8 text file)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not text
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"{what} {path} is empty; give a file with text in it")
    return unicodedata.normalize("NFC", text) if normalize == "nfc" else text


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenize(text: str, tokenizer, cache_dir: Path | None = None) -> np.ndarray:
    """All token ids of ``text`` (no special tokens), cached by the hash of the text and the tokenizer."""
    key = hashlib.sha256(text.encode("utf-8") + tokenizer_fingerprint(tokenizer).encode()).hexdigest()[:24]
    cached = cache_dir / f"{key}.npy" if cache_dir else None
    if cached is not None and cached.exists():
        return np.load(cached)
    # Encode paragraph batches: one call on a huge string is slow and warns about length.
    pieces = _split_paragraphs(text)
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    ids = np.fromiter((i for seq in encoded for i in seq), dtype=np.int32)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npy")
        np.save(tmp, ids)
        tmp.replace(cached)
    return ids


def _split_paragraphs(text: str, target: int = 8192) -> list[str]:
    """Chunks of about ``target`` characters cut after newlines, so no word is split."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + target)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        chunks.append(text[start:end])
        start = end
    return chunks


def make_blocks(ids: np.ndarray, length: int, stride: int) -> np.ndarray:
    """Blocks ``ids[i : i + length]`` for i = 0, stride, 2 stride, ... (non-overlapping when stride == length)."""
    if len(ids) < length:
        return np.zeros((0, length), dtype=np.int64)
    starts = np.arange(0, len(ids) - length + 1, stride)
    return np.stack([ids[s : s + length] for s in starts]).astype(np.int64)


class BlockDataset(torch.utils.data.Dataset):
    """Training examples from blocks: labels = inputs (the model shifts), or the explicit shift of the notebook."""

    def __init__(self, blocks: np.ndarray, explicit_shift: bool = False, double_shift: bool = False):
        self.blocks = torch.from_numpy(blocks)
        self.explicit_shift = explicit_shift
        self.double_shift = double_shift

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        if self.double_shift:
            # The notebook's TokenDataset: labels already shifted once, and the model shifts them again.
            return {"input_ids": block[:-1], "labels": block[1:]}
        if self.explicit_shift:
            return {"input_ids": block[:-1], "labels": block[:-1], "shift_labels": block[1:]}
        return {"input_ids": block, "labels": block}


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}


@dataclass
class CorpusData:
    train: BlockDataset
    heldout: BlockDataset | None
    train_ids: np.ndarray
    corpus_bytes: int


def build_datasets(
    cfg: DataConfig,
    corpus_path: str,
    heldout_path: str | None,
    tokenizer,
    cache_dir: Path | None,
    normalize: str = "none",
):
    """Training and held-out block datasets; too short a corpus is an error that says how long it must be."""
    text = read_text(corpus_path, "corpus", normalize)
    ids = tokenize(text, tokenizer, cache_dir)
    explicit, double = cfg.shift == "explicit", cfg.shift == "double"
    length = cfg.seq_len + 1 if explicit or double else cfg.seq_len
    blocks = make_blocks(ids, length, cfg.effective_stride)
    if len(blocks) == 0:
        raise DataError(
            f"corpus {corpus_path} has {len(ids)} tokens, shorter than one block of {length}; "
            f"give a longer corpus or lower data.seq_len"
        )
    heldout = None
    if heldout_path:
        held_ids = tokenize(read_text(heldout_path, "heldout", normalize), tokenizer, cache_dir)
        held_blocks = make_blocks(held_ids, length, length)
        if len(held_blocks) == 0:
            raise DataError(f"held-out text {heldout_path} is shorter than one block of {length} tokens")
        heldout = BlockDataset(held_blocks, explicit, double)
    elif cfg.heldout_fraction > 0 and len(blocks) >= 4:
        n_held = max(1, int(round(len(blocks) * cfg.heldout_fraction)))
        # Hold out the tail with a gap of one block, so overlapping strides never leak held-out tokens.
        gap = -(-length // cfg.effective_stride)
        heldout = BlockDataset(blocks[-n_held:], explicit, double)
        blocks = blocks[: max(1, len(blocks) - n_held - gap)]
    return CorpusData(BlockDataset(blocks, explicit, double), heldout, ids, len(text.encode("utf-8")))
