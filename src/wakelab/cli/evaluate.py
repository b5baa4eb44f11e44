"""``wakelab evaluate``: generation, stylometry and per-token-class perplexity of a run, base against trained. The
work is in :mod:`wakelab.analysis.evaluate.report`."""

from __future__ import annotations

import click

from ..logs import warn


@click.command("evaluate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", metavar="RUN")
@click.option(
    "--against",
    "against",
    multiple=True,
    metavar="base|RUN2",
    help="Compare with the base model (`base`, its own tokenizer) or another run, e.g. a sweep child "
    "(repeatable; default: base).",
)
@click.option("--prompts", default=None, metavar="FILE", help="Prompts, one a line (default: held-out passages).")
@click.option(
    "--reference",
    default=None,
    metavar="FILE",
    help="A reference text for the stylometry and the cost on ordinary text (default: the held-out text).",
)
@click.option("--samples", type=int, default=2, show_default=True, help="Samples per prompt and model.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True, help="Tokens per sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every model's sampling (the same).")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus sampling mass (1: all tokens).")
@click.option("--num-prompts", type=click.IntRange(min=1), default=6, show_default=True,
              help="Held-out passages to prompt with, without --prompts.")  # fmt: skip
@click.option("--prompt-words", type=click.IntRange(min=1), default=8, show_default=True,
              help="Words of each held-out passage in its prompt.")  # fmt: skip
@click.option("--mfw", type=int, default=100, show_default=True, help="Most frequent words for Burrows' Delta.")
@click.option("--eval-max-blocks", type=click.IntRange(min=1), default=None,
              help="Held-out blocks for the perplexities (default: the run's train.eval_max_blocks).")  # fmt: skip
@click.option("--allow-different-base", is_flag=True, help="Compare with runs of another base model all the same.")
@click.option("--no-probe", is_flag=True, help="Skip the meaning probe.")
@click.option("--no-mlflow", is_flag=True, help="Write the files locally only; log nothing to MLflow.")
@click.option(
    "--out", default=None, type=click.Path(file_okay=False), help="Local folder (default: <run_dir>/evaluate)."
)
def evaluate(run, against, prompts, reference, samples, max_new_tokens, seed, temperature, top_p, num_prompts,
             prompt_words, mfw, eval_max_blocks, allow_different_base, no_probe, no_mlflow, out):  # fmt: skip
    """Did the model learn the Wake? Sample the trained model and the base (same prompts, seeds and settings), compare
    the samples' style with the corpus and a reference, and split held-out perplexity by token class.

    RUN is a run's output directory or its MLflow run id. Results go to a new MLflow run nested under RUN
    (evaluate-<name>), under evaluate/: samples (a table and samples.json, coined words marked [[so]]),
    stylometry (Burrows' Delta, coined words per 1,000, corpus contexts, distinct-1/2, repetition, word length),
    perplexity_by_class (new / base / all targets, right after init and trained), reference_cost (ordinary text:
    base against trained, and the probability the new tokens take), probe (KL, substitution, norm-free AUC) and
    the plot coined_rate_and_delta.png; the table is printed.

    \b
    Examples:
      wakelab evaluate runs/demo
      wakelab evaluate runs/demo --samples 4 --max-new-tokens 64 --seed 3
      wakelab evaluate runs/sweep/init=spherical --against base --against runs/sweep/init=mean
      wakelab evaluate runs/demo --prompts prompts.txt --reference ordinary_english.txt
    """
    from ..analysis.evaluate.report import BASE, EvaluateOptions, evaluate_run

    opts = EvaluateOptions(
        against=tuple(against) or (BASE,),
        prompts=prompts,
        reference=reference,
        samples=samples,
        max_new_tokens=max_new_tokens,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        num_prompts=num_prompts,
        prompt_words=prompt_words,
        mfw=mfw,
        eval_max_blocks=eval_max_blocks,
        allow_different_base=allow_different_base,
        probe=not no_probe,
        mlflow=not no_mlflow,
        out=out,
    )
    click.echo(evaluate_run(run, opts, warn).text)
