"""``wakelab run`` and ``wakelab resume``: a training run, new or continued."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import WakelabError
from .options import ConfigOptions, check_installed_versions, config_options


@click.command()
@config_options
@click.option("--overwrite", is_flag=True, help="Reuse an output directory that holds another run's checkpoints.")
@click.option("--resume", "resume", is_flag=True, help="Continue from the output directory's latest checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
def run(options: ConfigOptions, overwrite, resume, no_progress):
    """Run an experiment: expand the vocabulary, train the new rows, track it all in MLflow.

    \b
    Examples:
      wakelab run                                   # the embedded demo
      wakelab run --plugin spherical --plugin mask --set train.trainable=mask
      wakelab run --config my.yaml --set train.lr=1e-3 --max-steps 200
      wakelab run --plugin recorder                 # record every step's rows
    """
    check_installed_versions()  # an out-of-range transformers: one line, before anything is built
    from ..run import engine, ranks

    @ranks.one_error_for_all  # torchrun: a config that fails on one rank (a plugin's import, say) fails them all
    def resolve_and_run():
        ranks.join()
        config = options.resolve()
        resume_from = None
        if resume:
            from ..storage.checkpoints import latest_checkpoint

            resume_from = str(latest_checkpoint(config.resolved_output_dir))
        return engine.run(config, overwrite=overwrite, resume_from=resume_from, progress=not no_progress)

    _print_result(resolve_and_run())


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(file_okay=False),
    help="Resume from this checkpoint (or a Sentry mirror of one) instead of the latest in RUN_DIR.",
)
@click.option("--max-steps", type=int, default=None, help="Train on to this many steps in all (e.g. 100 more).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key of the run's config.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
def resume(run_dir, checkpoint, max_steps, overrides, no_progress):
    """Continue a run from its latest complete checkpoint, in the same MLflow run, with its optimizer state.

    \b
    Examples:
      wakelab resume runs/demo
      wakelab resume runs/wordybird --max-steps 200        # 100 more steps, Adam state carried on
      wakelab resume runs/p1 --checkpoint /mnt/sentry/checkpoint-600
    """
    from ..config import build_config
    from ..run import engine
    from ..storage.checkpoints import latest_checkpoint

    run_path = Path(run_dir)
    config_file = run_path / "config.yaml"
    if not config_file.is_file():
        raise WakelabError(f"{run_dir} is not a wakelab run directory (no config.yaml); give the run's output_dir")
    pairs = [*overrides, f"output_dir={run_path}"]
    if max_steps is not None:
        pairs.append(f"train.max_steps={max_steps}")
    config = build_config(None, config_file, pairs)
    source = Path(checkpoint) if checkpoint else latest_checkpoint(run_path)
    click.echo(f"resuming from {source}", err=True)
    result = engine.run(config, resume_from=str(source), progress=not no_progress)
    _print_result(result)


def _print_result(result) -> None:
    """Where to look, once per job (torchrun's other ranks stay quiet)."""
    from ..logs import is_main_process

    if not is_main_process():
        return
    click.echo(f"run {result.run_id} {result.status} (experiment {result.experiment_id})")
    for key, value in result.metrics.items():
        click.echo(f"  {key}: {value:.4g}")
    click.echo(f"  output: {result.output_dir}")
    from ..tracking.runs import where_to_look

    click.echo("look at it in the MLflow UI:")
    for line in where_to_look(result.tracking_uri, result.experiment_id, result.run_id):
        click.echo(line)
