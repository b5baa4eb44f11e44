"""``wakelab sync``: send what a run kept while its tracking server was away. The work is in
:mod:`wakelab.tracking.sync`."""

from __future__ import annotations

import click


@click.command("sync", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path())
@click.option(
    "--tracking-uri",
    default=None,
    help="Send to this tracking server instead of the one the run used (it moved, say). The run id stays.",
)
def sync(run_dir, tracking_uri):
    """Send RUN_DIR/mlflow_unlogged.json (what the tracking server missed: metrics with their steps and times,
    params, tags, artifacts, the final status) to the run's MLflow run.

    Each value is sent once: run it again after an interruption and it goes on where it stopped; once all is
    sent the file becomes mlflow_unlogged.synced.json, and a second sync sends nothing.

    \b
    Examples:
      wakelab sync runs/demo
      wakelab sync runs/demo --tracking-uri http://mlflow.example.org:5000
    """
    from ..tracking.sync import LEDGER_FILE, SyncError, describe, find_file
    from ..tracking.sync import sync as do_sync

    try:
        result = do_sync(run_dir, tracking_uri)
    except KeyboardInterrupt:
        stopped = SyncError(
            f"sync interrupted; what was sent is recorded in {find_file(run_dir).parent / LEDGER_FILE}: run "
            f"`wakelab sync {run_dir}` again to send the rest (nothing is sent twice)"
        )
        stopped.exit_code = 130
        raise stopped from None
    for line in describe(result):
        click.echo(line)
