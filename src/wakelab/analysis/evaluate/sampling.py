"""Reproducible sampling for comparing models: the same random numbers drive every model's choices.

``wakelab evaluate`` samples the trained model, the base and other runs from the same prompts. Each (prompt, sample)
gets its own seeded stream of uniforms, one per new token, and a token is chosen by inverse CDF over the vocabulary
in id order. Base tokens come first in every grown vocabulary, so two models whose distributions agree over the base
tokens pick the same token from the same uniform: differences between their samples come from the models, not from
the dice (common random numbers). ``model.generate`` draws from the global generator with ``multinomial``, whose
choice for a given seed changes with the vocabulary's size; that is why this loop is its own.

Generation uses the KV cache: the prompts run once, together, then one token per step for all of them. Decoding
is the tokenizer's own, as ``wakelab generate`` does it, so new words keep the space before them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ...model import max_positions
from .. import batched

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


@torch.no_grad()
def sample(model, prompts: list[list[int]], count: int, settings: Sampling, eos_token_id: int | None = None, *,
           streams: list[int] | None = None, batch_rows: int = 32) -> list[tuple[list[list[int]], bool]]:  # fmt: skip
    """``count`` continuations of each prompt (token ids, cut at the end-of-sequence token), and whether the prompt
    was cut to its last tokens to leave room in the model's context.

    Prompt ``i`` draws from the stream ``settings.stream_seed(streams[i])`` (``streams`` defaults to 0, 1, ...),
    whichever batch it runs in. Prompts run together, up to ``batch_rows`` rows at a time (left-padded,
    :mod:`wakelab.analysis.batched`): one decoding step reads every weight once for all of them, where one prompt at
    a time read them once per prompt.
    """
    limit = max_positions(model.config)
    room = None if limit is None else max(1, limit - settings.max_new_tokens)
    cut = [room is not None and len(ids) > room for ids in prompts]
    prompts = [ids[-room:] if c else ids for ids, c in zip(prompts, cut, strict=True)]
    streams = list(range(len(prompts))) if streams is None else streams
    per_batch = max(1, batch_rows // max(1, count))
    was_training = model.training
    model.eval()
    out: list[tuple[list[list[int]], bool]] = []
    try:
        for first in range(0, len(prompts), per_batch):
            group = range(first, min(first + per_batch, len(prompts)))
            rows = _sample_rows(model, [prompts[i] for i in group], count, settings, [streams[i] for i in group])
            for i, chosen in zip(group, rows, strict=True):
                out.append(([_until(row, eos_token_id) for row in chosen], cut[i]))
    finally:
        model.train(was_training)
    return out


def _sample_rows(model, prompts: list[list[int]], count: int, settings: Sampling,
                 streams: list[int]) -> list[list[list[int]]]:  # fmt: skip
    generators = [torch.Generator().manual_seed(settings.stream_seed(i)) for i in streams]
    logits, batch = batched.start(model, prompts)
    logits, batch = logits.repeat_interleave(count, dim=0), batched.repeat(batch, count)  # one row per sample
    steps: list[torch.Tensor] = []
    for step in range(settings.max_new_tokens):
        uniforms = torch.cat([torch.rand(count, generator=g, dtype=torch.float64) for g in generators])
        chosen = choose(logits.cpu(), uniforms, settings.temperature, settings.top_p)
        steps.append(chosen)
        if step + 1 < settings.max_new_tokens:
            logits, batch = batched.extend(model, batch, [[t] for t in chosen.tolist()])
    table = torch.stack(steps, dim=1).tolist()
    return [table[k * count : (k + 1) * count] for k in range(len(prompts))]


def _until(row: list[int], eos_token_id: int | None) -> list[int]:
    return row[: row.index(eos_token_id)] if eos_token_id is not None and eos_token_id in row else row
