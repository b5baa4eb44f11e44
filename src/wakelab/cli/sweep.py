"""``wakelab sweep``: run one experiment under several values of one config key and compare them in MLflow.

The work is in :mod:`wakelab.sweep`; this module is the command line around it.
"""

from __future__ import annotations

import sys

import click

from ..logs import log
from .options import ConfigOptions, config_options


@click.command("sweep", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--over",
    "over",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="The key to vary and its values: a config key or short name (init, lr, max_steps, ...) or an "
    "active plugin's key (recorder.every), and comma-separated values, each typed as --set would "
    "read it. Repeat to cross several keys.",
)
@config_options
@click.option(
    "--constituents",
    default=None,
    metavar="PATH|demo",
    help="Constituents file (word<TAB>meaning<TAB>parts) for the neighbour hit rates; default: "
    "init.constituents, or the demo's with the demo lexicon. It becomes each child's init.constituents too "
    "(meaning words on its trajectory page, its probe) unless the config names its own.",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Base-token neighbours searched for the meaning word or a part.",
)
@click.option(
    "--evaluate",
    "evaluate",
    is_flag=True,
    help="Run `wakelab evaluate` on each finished child (against the base): coined-word rate, Delta, new-word "
    "perplexity and the cost on ordinary text join the comparison.",
)
@click.option("--overwrite", is_flag=True, help="Replace earlier runs in the children's folders.")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
@click.option(
    "--resume",
    "resume_parent",
    default=None,
    metavar="PARENT",
    help="Finish a stopped sweep: its parent run id or folder. Finished children are kept, a stopped one "
    "continues from its checkpoint, the rest run.",
)
def sweep(over, options: ConfigOptions, constituents, top_k, evaluate, overwrite, no_progress, resume_parent):
    """Run one experiment under several values of one config key, each value a child MLflow run nested under one
    parent run, and log a side-by-side comparison to the parent.

    Takes the options of `wakelab run` (--preset, --config, --set, --plugin, --max-steps, ...); the swept key is
    set last. Each child runs in <output_dir>/<key>=<value>, one after another in this process. The parent gets
    comparison/comparison.{csv,json,md,html} (held-out perplexity before/after, final loss, mean new-row norm at
    step 0 and at the end, nearest-neighbour hit rates at step 0 and at the end) and PNG plots (loss curves,
    perplexity, new-row norms, hit rates). Hit rates need a constituents file that maps each new word to the base
    words it should end up near; the demo ships one.

    Everything is checked before the first child starts (the key, every child's config, the init plugins, the
    folders, the constituents file, and what the active plugins check against each child's model and corpus, such
    as distill's target layer): bad input is one line and exit 2. A child that fails is marked FAILED, the others go
    on, the comparison names it, and the exit code is 1.

    \b
    Example:
      wakelab sweep --over init=spherical,mean,subword          # the demo: about 10 min on 2 CPU cores
      wakelab sweep --over init=spherical,subword --evaluate    # each child evaluated against the base
      wakelab sweep --over lr=1e-3,5e-3,2e-2 --max-steps 100 --output-dir runs/lr-sweep
      wakelab sweep --config my.yaml --over init.scale=0.01,0.1,1 --set init.method=mean
      wakelab sweep --over init=spherical,subword --constituents my_constituents.tsv --top-k 20
      wakelab sweep --preset wordybird_precision --over train.precision=bf16,fp32-master,stochastic,kahan \\
          --over train.scheduler=linear,constant   # the Wordybird question: children x schedule, with a verdict
      wakelab sweep --resume 3f2c9a...                          # after a SIGTERM: finish the stopped sweep
      wakelab sweep --over recorder.every=1,5 --plugin recorder      # a plugin's own config key
    """
    from ..sweep.runner import run_sweep

    if resume_parent is not None:
        plan, saved = _resumed_plan(resume_parent, over, options, constituents, overwrite)
    else:
        plan, saved = _new_plan(over, options, constituents, top_k, overwrite), None
    plan.evaluate = evaluate or (saved is not None and saved.evaluate)  # --resume keeps what the sweep was asked
    result = run_sweep(plan, overwrite=overwrite, progress=not no_progress, log=log, resume=saved)
    _report(result, plan)


def _resumed_plan(resume_parent, over, options: ConfigOptions, constituents, overwrite):
    """``--resume PARENT``: the sweep as it was planned (any other planning option is an error), and its record."""
    from ..errors import ConfigError
    from ..sweep.plan import plan_sweep
    from ..sweep.resume import load_sweep

    given = (["--over"] if over else []) + options.given()
    given += [flag for flag, value in (("--constituents", constituents), ("--overwrite", overwrite)) if value]
    if given:
        raise ConfigError(f"--resume continues the sweep as it was planned; drop {', '.join(given)}")
    saved = load_sweep(resume_parent)
    plan = plan_sweep(
        saved.base,
        saved.over,
        constituents=saved.constituents,  # the hit rates' file; the children's is in the saved base already
        top_k=saved.top_k,
        overwrite=True,
        log=log,
        constituents_to_children=False,
    )
    log(f"resuming the sweep over {plan.canonical} (parent run {saved.parent_run_id}) in {plan.root}")
    return plan, saved


def _new_plan(over, options: ConfigOptions, constituents, top_k, overwrite):
    """A new sweep: the base config from the shared options, every child planned and checked."""
    from ..errors import ConfigError
    from ..sweep.plan import plan_sweep

    if not over:
        raise ConfigError("give --over KEY=V1,V2,... (or --resume PARENT to finish a stopped sweep)")
    base = options.resolve()
    plan = plan_sweep(base, list(over), constituents=constituents, top_k=top_k, overwrite=overwrite, log=log)
    log(f"sweep over {plan.canonical}: {len(plan.children)} children in {plan.root}")
    return plan


def _report(result, plan) -> None:
    """The comparison table, where to look in MLflow, and exit 1 naming the children that failed."""
    from ..tracking.runs import where_to_look

    click.echo(f"sweep {result.parent_run_id} over {plan.canonical} (experiment {result.experiment_id})")
    click.echo(result.table, nl=False)
    click.echo(f"  comparison: {result.comparison_dir}")
    click.echo("look at it in the MLflow UI (the comparison is under the parent's artifacts, comparison/):")
    for line in where_to_look(result.tracking_uri, result.experiment_id, result.parent_run_id):
        click.echo(line)
    if result.failed:
        failed = "; ".join(f"{c.label} {c.status}: {c.error}" for c in result.failed)
        click.echo(
            f"wakelab: error: {failed} ({len(result.failed)} of {len(result.children)} children failed)", err=True
        )
        sys.exit(1)
