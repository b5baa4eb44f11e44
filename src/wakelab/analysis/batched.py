"""Many short sequences through a causal LM at once: left-padded, continued from the KV cache, head at the end only.

The meaning probe and ``wakelab evaluate``'s sampler ask the same thing of a model: the next-token logits after each
of many sequences of different lengths, and then after a few more tokens. One sequence at a time leaves a CPU
waiting on memory (a single token's forward reads every weight), and running a prefix again for each continuation
pays for it twice. Here sequences are padded on the left, so every row's last token sits in the last column: the
head runs on that column only (``logits_to_keep=1``), and continuations append to the prefix's cache.

Position ids count real tokens only, so a padded row reads exactly as it would alone; the padding is masked.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

__all__ = ["Batch", "left_pad", "start", "extend", "repeat"]


@dataclass
class Batch:
    """The state of a batch after a forward: the attention mask so far, each row's real length and the KV cache."""

    mask: torch.Tensor  # [rows, columns so far]
    lengths: torch.Tensor  # [rows] real tokens so far
    past: object


def left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, width]`` token ids (0 where padded) and their attention mask, each row's tokens at the right."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward(
    model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past
) -> tuple[torch.Tensor, object]:
    device = next(model.parameters()).device
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": True}
    if _accepts(model, "position_ids"):  # ALiBi models (BLOOM) take none: their positions come from the mask
        kwargs["position_ids"] = positions.to(device)
    if past is not None:
        kwargs["past_key_values"] = past
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # only the last column's logits are read
    out = model(**kwargs)
    return out.logits[:, -1].float(), out.past_key_values


@torch.no_grad()
def start(model, seqs: list[list[int]]) -> tuple[torch.Tensor, Batch]:
    """Logits after each whole sequence (``[rows, vocab]`` float32) and the batch to continue from."""
    ids, mask = left_pad(seqs)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits, past = _forward(model, ids, mask, positions, None)
    return logits, Batch(mask, mask.sum(1), past)


@torch.no_grad()
def extend(model, batch: Batch, seqs: list[list[int]]) -> tuple[torch.Tensor, Batch]:
    """Logits after each row's sequence plus ``seqs[row]`` (continued from the cache, which grows in place)."""
    ids, mask = left_pad(seqs)
    positions = (batch.lengths[:, None] + mask.cumsum(1) - 1).clamp(min=0)
    full = torch.cat([batch.mask, mask], dim=1)
    logits, past = _forward(model, ids, full, positions, batch.past)
    return logits, Batch(full, batch.lengths + mask.sum(1), past)


def repeat(batch: Batch, times: int) -> Batch:
    """Each row ``times`` times in a row (row i becomes rows i*times .. i*times+times-1), its cache included: one
    prefix, several continuations."""
    batch.past.batch_repeat_interleave(times)
    return Batch(batch.mask.repeat_interleave(times, dim=0), batch.lengths.repeat_interleave(times), batch.past)
