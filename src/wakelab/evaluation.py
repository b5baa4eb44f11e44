"""Held-out evaluation of a model: perplexity over fixed-length blocks.

Its own run-layer module so that the engine (before and after training) and the analyses (of a finished run) measure
perplexity the same way without the analyses importing the engine.
"""

from __future__ import annotations

import math

import torch

from .data import collate


def perplexity(model, dataset, batch_size: int, max_blocks: int) -> float:
    """exp(mean token negative log-likelihood) over the first ``max_blocks`` held-out blocks."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    count = min(len(dataset), max_blocks)
    device = next(p for p in model.parameters()).device
    with torch.no_grad():
        for start in range(0, count, batch_size):
            batch = collate([dataset[i] for i in range(start, min(count, start + batch_size))])
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            tokens = (batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]).numel()
            total_loss += float(out.loss) * tokens
            total_tokens += tokens
    model.train(was_training)
    return math.exp(total_loss / max(total_tokens, 1))
