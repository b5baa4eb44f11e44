"""Held-out evaluation of a model: perplexity over fixed-length blocks.

Its own run-layer module so that the engine (before and after training) and the analyses (of a finished run) measure
perplexity the same way without the analyses importing the engine.
"""

from __future__ import annotations

import math

import torch

from ..data.corpus import collate
from ..loss import DEFAULT_CHUNK_TOKENS, ChunkedLoss


def perplexity(
    model, dataset, batch_size: int, max_blocks: int, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS
) -> float:
    """exp(mean token negative log-likelihood) over the first ``max_blocks`` held-out blocks.

    The loss is the training loss (chunked over the split head unless ``chunk_tokens`` is None), so evaluation never
    holds the whole batch's vocabulary logits either."""
    chunked = ChunkedLoss(chunk_tokens) if chunk_tokens is not None else None
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    count = min(len(dataset), max_blocks)
    device = next(p for p in model.parameters()).device
    with torch.no_grad():
        for start in range(0, count, batch_size):
            batch = collate([dataset[i] for i in range(start, min(count, start + batch_size))])
            batch = {k: v.to(device) for k, v in batch.items()}
            result = chunked(model, batch) if chunked is not None else None
            loss = result[0] if result is not None else model(**batch).loss
            tokens = (batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]).numel()
            total_loss += float(loss) * tokens
            total_tokens += tokens
    model.train(was_training)
    return math.exp(total_loss / max(total_tokens, 1))
