"""``wakelab generate``: text from a trained run, with its new words."""

from __future__ import annotations

import os
import sys

import click

from ..analysis.generation import generate_text
from ..logs import warn


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
    from ..export.formats import expanded_tokenizer, find_source
    from ..run.merge import base_source, merged_model

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
    from ..storage.writepoint import WriteFailed, write_point

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
