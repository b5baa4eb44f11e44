"""``wakelab recording``: look into a recording and export it, without loading it whole.

``info`` prints what :func:`wakelab.storage.recording.summary` says (steps, shards, fields, rows, flags, size);
``export`` streams a recording into the old notebook's single safetensors file. Every error is a ``WakelabError`` (one
line, exit status 2), raised by the storage layer or here.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group("recording", context_settings={"help_option_names": ["-h", "--help"]})
def recording() -> None:
    """Inspect and export per-step recordings written by the `recorder` plugin.

    \b
    Example:
      wakelab run --plugin recorder --set recorder.rows=new
      wakelab recording info runs/demo/recording
      wakelab recording export runs/demo/recording --single-file rec.safetensors
    """


@recording.command("info")
@click.argument("path", type=click.Path(path_type=Path))
def info(path: Path) -> None:
    """Describe the recording at PATH (a recording directory or its index.json).

    \b
    Example:
      wakelab recording info runs/demo/recording
    """
    from ..storage.recording import summary

    click.echo(summary(path))


@recording.command("export")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--single-file",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="OUT.safetensors",
    help="Write the notebook's single-file layout (embeddings, grads, momentum, variance, logits, losses, "
    "recorded_steps) here.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(path: Path, out: Path, overwrite: bool) -> None:
    """Export the recording at PATH into one safetensors file, streaming shard by shard.

    \b
    Example:
      wakelab recording export runs/demo/recording --single-file rec.safetensors
      wakelab recording export runs/demo/recording --single-file rec.safetensors --overwrite
    """
    from ..storage.recording import export_single_file
    from ..storage.recording import open as open_recording

    with open_recording(path) as rec:
        written = export_single_file(rec, out, overwrite=overwrite)
        steps = len(rec)
    click.echo(f"wrote {written} ({steps} steps)")
