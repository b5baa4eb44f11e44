"""Reproducible sampling for comparing models: the same random numbers drive every model's choices.

``wakelab evaluate`` samples the trained model, the base and other runs from the same prompts. Each (prompt, sample)
gets its own seeded stream of uniforms, one per new token, and a token is chosen by inverse CDF over the vocabulary
in id order. Base tokens come first in every grown vocabulary, so two models whose distributions agree over the base
tokens pick the same token from the same uniform: differences between their samples come from the models, not from
the dice (common random numbers). ``model.generate`` draws from the global generator with ``multinomial``, whose
choice for a given seed changes with the vocabulary's size; that is why this loop is its own.

Generation uses the KV cache: the prompt is run once, then one token per step. Decoding is the tokenizer's own, as
``wakelab generate`` does it, so new words keep the space before them.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch

from ...model import max_positions

__all__ = ["Sampling", "sample", "choose"]


@dataclass(frozen=True)
class Sampling:
    """The sampling settings every compared model shares; logged as params."""

    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95  # nucleus: the smallest set of tokens holding this much probability
    max_new_tokens: int = 48
    seed: int = 0

    def params(self) -> dict[str, float | int]:
        return asdict(self)

    def stream_seed(self, prompt_index: int) -> int:
        """The seed of one prompt's uniforms: the same for every model."""
        return self.seed * 1_000_003 + prompt_index


def choose(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of ``[n, vocab]`` logits: greedy at temperature 0, else inverse CDF of ``uniforms`` over the
    temperature-scaled, nucleus-cut distribution, in id order (float64, so equal distributions choose alike)."""
    if temperature == 0:
        return logits.argmax(dim=1)
    probs = torch.softmax(logits.double() / temperature, dim=1)
    if top_p < 1.0:
        ordered, order = probs.sort(dim=1, descending=True)
        before = ordered.cumsum(dim=1) - ordered  # mass of the tokens ranked above each one
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, before < top_p)
        probs = probs * keep
    cdf = probs.cumsum(dim=1)
    picked = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    return picked.clamp(max=probs.shape[1] - 1)


def _forward(model, ids: torch.Tensor, past, keep_last: bool):
    kwargs = {"input_ids": ids, "use_cache": True}
    if past is not None:
        kwargs["past_key_values"] = past
    if keep_last and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the prompt's other positions need no logits
    out = model(**kwargs)
    return out.logits[:, -1], out.past_key_values


@torch.no_grad()
def sample(model, prompt_ids: list[int], count: int, settings: Sampling, stream_seed: int,
           eos_token_id: int | None = None) -> tuple[list[list[int]], bool]:  # fmt: skip
    """``count`` continuations of one prompt (token ids, cut at the end-of-sequence token), and whether the prompt
    was cut to its last tokens to leave room in the model's context."""
    limit = max_positions(model.config)
    cut = False
    if limit is not None and len(prompt_ids) > limit - settings.max_new_tokens:
        prompt_ids, cut = prompt_ids[-max(1, limit - settings.max_new_tokens) :], True
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(stream_seed)
    try:
        ids = torch.tensor([prompt_ids] * count, dtype=torch.long, device=device)
        logits, past = _forward(model, ids, None, keep_last=True)
        steps: list[torch.Tensor] = []
        for step in range(settings.max_new_tokens):
            uniforms = torch.rand(count, generator=generator, dtype=torch.float64)
            chosen = choose(logits.float().cpu(), uniforms, settings.temperature, settings.top_p)
            steps.append(chosen)
            if step + 1 < settings.max_new_tokens:
                logits, past = _forward(model, chosen[:, None].to(device), past, keep_last=False)
    finally:
        model.train(was_training)
    out = []
    for row in torch.stack(steps, dim=1).tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        out.append(row)
    return out, cut
