"""The command-line options that build a RunConfig, shared by ``wakelab run``, ``show-config`` and ``sweep``.

Their own module so that command modules (``sweep_cli``) use them without importing ``cli``, which imports them.
"""

from __future__ import annotations

import click


def config_options(fn):
    """The options every config-taking command shares: preset, file, --set, --plugin and the shortcuts."""
    fn = click.option("--preset", default=None, help="Packaged preset to start from (default: demo).")(fn)
    fn = click.option(
        "--config", "config_file", type=click.Path(dir_okay=False), help="YAML file layered on the preset."
    )(fn)
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one key, e.g. train.lr=1e-3 (repeatable).",
    )(fn)
    fn = click.option(
        "--plugin",
        "plugins",
        multiple=True,
        metavar="NAME|PATH",
        help="Activate a plugin by name or .py path (repeatable).",
    )(fn)
    fn = click.option("--max-steps", type=int, default=None, help="Shortcut for --set train.max_steps=N.")(fn)
    fn = click.option("--output-dir", default=None, help="Shortcut for --set output_dir=DIR.")(fn)
    fn = click.option("--experiment", default=None, help="Shortcut for --set tracking.experiment=NAME.")(fn)
    fn = click.option("--run-name", default=None, help="Shortcut for --set tracking.run_name=NAME.")(fn)
    return fn


def resolve_cli_config(preset, config_file, overrides, plugins, max_steps, output_dir, experiment, run_name):
    from .config import build_config

    pairs = list(overrides)
    if max_steps is not None:
        pairs.append(f"train.max_steps={max_steps}")
    if output_dir is not None:
        pairs.append(f"output_dir={output_dir}")
    if experiment is not None:
        pairs.append(f"tracking.experiment={experiment}")
    if run_name is not None:
        pairs.append(f"tracking.run_name={run_name}")
    if not preset and not config_file:
        preset = "demo"
    return build_config(preset, config_file, pairs, plugins=plugins)
