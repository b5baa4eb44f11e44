"""Text from a trained model: ``wakelab generate`` and the samples ``wakelab analyze`` logs.

Reading what the model writes with its new words is the quickest check of what the rows learned; the words must
come out with their spaces (see ``vocab.expand_vocabulary``), so decoding is the tokenizer's own, no post-editing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import click
import torch

from .errors import WakelabError
from .logs import warn
from .model import max_positions


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


@click.command("generate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", metavar="RUN")
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=40, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; > 0: sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option(
    "--base",
    default=None,
    type=click.Path(file_okay=False),
    help="The base model's folder, when it is no longer where the run's model.name_or_path points.",
)
def generate(run, prompt, max_new_tokens, temperature, seed, base):
    """Continue PROMPT with a run's trained model (its final rows, or a checkpoint's); new words keep their spaces.

    RUN is a run's output directory, an MLflow run id or a checkpoint-N folder, as for `wakelab export`.

    \b
    Examples:
      wakelab generate runs/demo "The river"
      wakelab generate runs/demo "The river" --max-new-tokens 60 --temperature 0.8 --seed 3
      wakelab generate runs/demo/checkpoint-200 "Once upon a time"
    """
    from .export import expanded_tokenizer, find_source
    from .merge import base_source, merged_model

    source = find_source(run)
    base_path = base_source(source.config, base)
    tokenizer = expanded_tokenizer(source, base_path)
    trained = source.rows()
    for note in source.notes:
        warn(note)
    model = merged_model(source.config, trained, tokenizer, source=base_path)
    num_base = int(trained.base.get("num_base") or len(tokenizer) - trained.token_ids.numel())
    result = generate_text(
        model,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        num_base=num_base,
        warn=warn,
    )
    from .writepoint import WriteFailed, write_point

    # Standard output redirected to a full disk (`> out.txt`): one line, not a traceback at exit.
    try:
        with write_point("generate-output", "standard output", what="the generated text", then="the same command"):
            click.echo(result.prompt + result.text)
            sys.stdout.flush()
    except WriteFailed:
        # What is still buffered would fail again when Python flushes at exit, with a second message: drop it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise
    click.echo(f"wakelab: {result.new_tokens_generated} of the generated tokens are new words", err=True)
