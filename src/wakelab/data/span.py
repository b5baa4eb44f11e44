"""The part of a run's corpus that training reads: what an init that learns from the corpus may read too.

With a held-out *fraction* the held-out blocks are the corpus's tail; an init that read the whole token stream
would see the held-out text and flatter every held-out measure. The span here ends with the last training block.
"""

from __future__ import annotations

import numpy as np

from ..config import DataConfig, RunConfig
from . import corpus as data_mod


def training_span(corpus: data_mod.CorpusData, data: DataConfig) -> np.ndarray:
    """The corpus's token ids up to the end of its last training block."""
    blocks = corpus.train.blocks
    if len(blocks) == 0:
        return corpus.train_ids[:0]
    stride = data.effective_stride
    return corpus.train_ids[: (len(blocks) - 1) * stride + blocks.shape[1]]


def training_ids(config: RunConfig, tokenizer) -> np.ndarray:
    """Read and tokenize the config's corpus as a run does, and return its training span."""
    _, corpus_path, heldout_path = data_mod.resolve_data_paths(config)
    corpus = data_mod.build_datasets(
        config.data,
        corpus_path,
        heldout_path,
        tokenizer,
        data_mod.token_cache_dir(config.data),
        data_mod.text_form(config),
    )
    return training_span(corpus, config.data)
