"""Text from a trained model: ``wakelab generate`` and the samples ``wakelab analyze`` logs.

Reading what the model writes with its new words is the quickest check of what the rows learned; the words must
come out with their spaces (see ``vocab.expand_vocabulary``), so decoding is the tokenizer's own, no post-editing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import WakelabError
from ..model import max_positions


@dataclass
class Generation:
    prompt: str
    text: str
    prompt_tokens: int
    new_tokens_generated: int
    truncated: bool


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    num_base: int | None = None,
    warn: Callable[[str], None] = lambda _: None,
) -> Generation:
    """Continue ``prompt``. A prompt too long for the context keeps its last tokens (with a warning); greedy when
    ``temperature`` is 0, else sampled with ``seed``."""
    if max_new_tokens < 1:
        raise WakelabError("--max-new-tokens must be at least 1")
    if temperature < 0:
        raise WakelabError("--temperature must be >= 0 (0 means greedy)")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise WakelabError("the prompt is empty; give some text to continue")
    limit = max_positions(model.config)
    truncated = False
    if limit is not None:
        if max_new_tokens >= limit:
            raise WakelabError(
                f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's "
                f"context of {limit} tokens; ask for fewer"
            )
        room = limit - max_new_tokens
        if ids.shape[1] > room:
            warn(
                f"the prompt is {ids.shape[1]} tokens; the model's context is {limit}: keeping its last {room} "
                f"tokens to leave room for {max_new_tokens} new ones"
            )
            ids, truncated = ids[:, -room:], True
    device = next(model.parameters()).device
    kwargs = (
        {"do_sample": False}
        if temperature == 0
        else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    new = out[0, ids.shape[1] :].cpu()
    text = tokenizer.decode(new, skip_special_tokens=True)
    base = num_base if num_base is not None else len(tokenizer)
    return Generation(
        tokenizer.decode(ids[0], skip_special_tokens=True), text, int(ids.shape[1]), int((new >= base).sum()), truncated
    )


def sample_prompts(text: str, tokenizer, num_base: int, count: int = 3, length: int = 24) -> list[str]:
    """Up to ``count`` prompts cut from ``text``, each ending just after a new word (spread over the text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    hits = [i for i, token in enumerate(ids) if token >= num_base and i >= 4]
    if not hits:
        return []
    step = max(1, len(hits) // count)
    picked = hits[::step][:count]
    return [tokenizer.decode(ids[max(0, i + 1 - length) : i + 1]) for i in picked]


def samples(
    model, tokenizer, num_base: int, heldout_text: str, *, count: int = 3, max_new_tokens: int = 24, seed: int = 0
) -> list[dict]:
    """Greedy continuations of prompts from the held-out text that hold new words: rows for a table."""
    rows = []
    for prompt in sample_prompts(heldout_text, tokenizer, num_base, count):
        result = generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, seed=seed, num_base=num_base)
        rows.append(
            {"prompt": prompt, "continuation": result.text, "new_tokens_generated": result.new_tokens_generated}
        )
    return rows
