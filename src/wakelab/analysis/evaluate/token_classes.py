"""Loss by token class: is the trained model better at the new words, and no worse at the rest?

One perplexity over all positions mixes two questions. :func:`score_positions` scores every position of some token
blocks once and keeps, per position, the target, its loss over the whole vocabulary, its loss over the base rows
alone (the base model's softmax: with bit-identical base rows the base model's logits are exactly the first
``num_base`` logits of the grown model) and the probability mass the new rows take. :func:`class_split` and
:func:`reference_cost` turn those into the figures ``wakelab evaluate`` reports.

Scale: the decoder's hidden states go through the head ``chunk`` positions at a time, so at most ``chunk x vocab``
logits exist at once (the whole block's ``seq x vocab`` logits never do), and no new x base matrix is ever formed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ...loss import head_parts, unsupported_reason

__all__ = ["PositionScores", "score_positions", "class_split", "reference_cost"]


@dataclass
class PositionScores:
    """Per scored position (flattened over blocks): the target id and three figures, all float64 on the CPU."""

    targets: torch.Tensor  # long
    nll: torch.Tensor  # -log P(target) over the whole vocabulary
    nll_base: torch.Tensor  # -log P(target) over the base rows alone (inf where the target is new)
    new_mass: torch.Tensor  # sum of P(new token) over the whole vocabulary


def _logit_chunks(model, input_ids: torch.Tensor, chunk: int):
    """``[positions, vocab]`` float32 logits of one ``[1, seq]`` input, ``chunk`` positions at a time."""
    if unsupported_reason(model) is None:
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state[0]
        parts = head_parts(model.get_output_embeddings())
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            yield torch.cat([h @ part.T for part in parts], dim=1).float()
    else:  # a head the chunked path cannot read (bias, soft-capping): the model's own logits
        logits = model(input_ids=input_ids).logits[0]
        for start in range(0, logits.shape[0], chunk):
            yield logits[start : start + chunk].float()


@torch.no_grad()
def score_positions(model, blocks: Iterable[torch.Tensor], num_base: int, chunk: int = 256) -> PositionScores:
    """Score every next-token position of each 1-D block of token ids (the last token is only an input)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {"targets": [], "nll": [], "nll_base": [], "new_mass": []}
    try:
        for block in blocks:
            block = torch.as_tensor(block, dtype=torch.long).reshape(-1)
            if block.numel() < 2:
                continue
            targets = block[1:].to(device)
            at = 0
            for logits in _logit_chunks(model, block[:-1].unsqueeze(0).to(device), chunk):
                t = targets[at : at + logits.shape[0]]
                at += logits.shape[0]
                picked = logits.gather(1, t[:, None]).squeeze(1)
                lse_all = torch.logsumexp(logits, dim=1)
                lse_base = torch.logsumexp(logits[:, :num_base], dim=1)
                if logits.shape[1] > num_base:
                    new_mass = torch.exp(torch.logsumexp(logits[:, num_base:], dim=1) - lse_all)
                else:
                    new_mass = torch.zeros_like(lse_all)
                nll_base = torch.where(t < num_base, lse_base - picked, torch.full_like(picked, math.inf))
                for key, value in (("targets", t), ("nll", lse_all - picked), ("nll_base", nll_base),
                                   ("new_mass", new_mass)):  # fmt: skip
                    out[key].append(value.cpu())
    finally:
        model.train(was_training)
    if not out["targets"]:
        empty = torch.zeros(0, dtype=torch.float64)
        return PositionScores(torch.zeros(0, dtype=torch.long), empty, empty, empty)
    return PositionScores(
        torch.cat(out["targets"]).long(), *(torch.cat(out[k]).double() for k in ("nll", "nll_base", "new_mass"))
    )


def _mean_ppl(values: torch.Tensor) -> dict[str, float | int]:
    if values.numel() == 0:
        return {"positions": 0, "loss": None, "perplexity": None}
    loss = float(values.mean())
    return {"positions": int(values.numel()), "loss": loss, "perplexity": math.exp(loss)}


def class_split(scores: PositionScores, num_base: int) -> dict[str, dict[str, float | int]]:
    """Mean loss and perplexity at positions whose target is a new token, a base token, and over all of them."""
    new = scores.targets >= num_base
    return {"new": _mean_ppl(scores.nll[new]), "base": _mean_ppl(scores.nll[~new]), "all": _mean_ppl(scores.nll)}


def reference_cost(scores: PositionScores, num_base: int) -> dict[str, float | int | None]:
    """On text scored with base-vocabulary targets: perplexity under the base rows' softmax (the base model) and the
    whole vocabulary's (the trained model), and the mean probability mass the new rows take."""
    base_only = scores.targets < num_base
    base = _mean_ppl(scores.nll_base[base_only])
    trained = _mean_ppl(scores.nll[base_only])
    mass = scores.new_mass[base_only]
    return {
        "positions": int(base_only.sum()),
        "positions_with_new_targets": int((~base_only).sum()),
        "base_perplexity": base["perplexity"],
        "trained_perplexity": trained["perplexity"],
        "loss_increase": (trained["loss"] - base["loss"]) if base["loss"] is not None else None,
        "new_mass_mean": float(mass.mean()) if mass.numel() else None,
        "new_mass_max": float(mass.max()) if mass.numel() else None,
    }
