"""The ``wakelab`` command line. Every user error is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .cli_config import check_installed_versions, resolve_cli_config
from .cli_config import config_options as _config_options
from .errors import WakelabError


class WakelabGroup(click.Group):
    """Turns WakelabError into one clear line and exit code 2; a stop signal into exit 128 + its number."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WakelabError as exc:
            click.echo(f"wakelab: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            # A stop signal (wakelab.stopping.Stopped) says which, and how to resume; it exits 128 + its number.
            click.echo(f"wakelab: {exc or 'interrupted; the MLflow run is marked KILLED'}", err=True)
            sys.exit(getattr(exc, "exit_code", 130))


@click.group(cls=WakelabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wakelab")
def main() -> None:
    """wakelab: add new tokens to a language model, train only their rows, and watch them learn.

    \b
    Example:
      wakelab run                      # the embedded demo, tracked in ./mlflow.db
      wakelab ui                       # the MLflow UI for those runs; prints the URL
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@click.command()
@_config_options
@click.option("--overwrite", is_flag=True, help="Reuse an output directory that holds another run's checkpoints.")
@click.option("--resume", "resume", is_flag=True, help="Continue from the output directory's latest checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
def run(
    preset, config_file, overrides, plugins, max_steps, output_dir, experiment, run_name, overwrite, resume, no_progress
):
    """Run an experiment: expand the vocabulary, train the new rows, track it all in MLflow.

    \b
    Examples:
      wakelab run                                   # the embedded demo
      wakelab run --plugin spherical --plugin mask --set train.trainable=mask
      wakelab run --config my.yaml --set train.lr=1e-3 --max-steps 200
      wakelab run --plugin recorder                 # record every step's rows
    """
    check_installed_versions()  # an out-of-range transformers: one line, before anything is built
    from . import engine, ranks

    @ranks.one_error_for_all  # torchrun: a config that fails on one rank (a plugin's import, say) fails them all
    def resolve_and_run():
        ranks.join()
        config = resolve_cli_config(
            preset, config_file, overrides, plugins, max_steps, output_dir, experiment, run_name
        )
        resume_from = None
        if resume:
            from .checkpoints import latest_checkpoint

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
    from . import engine
    from .checkpoints import latest_checkpoint
    from .config import build_config

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
    from .logs import is_main_process

    if not is_main_process():
        return
    click.echo(f"run {result.run_id} {result.status} (experiment {result.experiment_id})")
    for key, value in result.metrics.items():
        click.echo(f"  {key}: {value:.4g}")
    click.echo(f"  output: {result.output_dir}")
    from .tracking import where_to_look

    click.echo("look at it in the MLflow UI:")
    for line in where_to_look(result.tracking_uri, result.experiment_id, result.run_id):
        click.echo(line)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--contexts-markdown", is_flag=True, help="The hooks and their contexts as Markdown (docs/hooks.md).")
def plugins(as_json, contexts_markdown):
    """List every plugin found: where it comes from, its version, the hooks it implements and its config keys.

    \b
    Example:
      wakelab plugins
      wakelab plugins --json | jq '.[].name'
      wakelab plugins --contexts-markdown > docs/hooks.md
    """
    if contexts_markdown:
        from .hookdocs import reference_markdown

        click.echo(reference_markdown(), nl=False)
        return
    from .registry import describe

    rows = describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=4)
    for row in rows:
        hooks = ", ".join(row["hooks"]) if not row["error"] else f"BROKEN: {row['error']}"
        click.echo(f"{row['name']:<{width}}  {row['source']:<22}  {row['version'] or '-':<8}  {hooks}")
        if row.get("doc"):
            click.echo(f"{'':<{width}}  {row['doc']}")
        if row["config_keys"]:
            click.echo(f"{'':<{width}}  config: {', '.join(row['config_keys'])}")


@click.command("config-keys")
@click.option("--markdown", is_flag=True, help="The full reference as Markdown (docs/configuration.md).")
def config_keys(markdown):
    """List every config key with its default, the plugins' own keys too (marked with their plugin).

    \b
    Example:
      wakelab config-keys
      wakelab config-keys --markdown > docs/configuration.md
    """
    from .config import reference_markdown

    if markdown:
        click.echo(reference_markdown(), nl=False)
        return
    from .config import build_config, flatten
    from .plugin_config import every_section

    for key, value in build_config("demo").flat().items():
        click.echo(f"{key} = {value}")
    for section in every_section(None).values():
        for key, value in flatten(section.model().model_dump(mode="json"), f"{section.name}.").items():
            click.echo(f"{key} = {value}    (plugin {section.plugin})")


@click.command("show-config")
@_config_options
def show_config(preset, config_file, overrides, plugins, max_steps, output_dir, experiment, run_name):
    """Print the resolved config (preset + file + overrides) as YAML, without running.

    \b
    Example:
      wakelab show-config --preset demo --set train.lr=1e-3
    """
    import yaml

    config = resolve_cli_config(preset, config_file, overrides, plugins, max_steps, output_dir, experiment, run_name)
    click.echo(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), nl=False)


@click.command()
def presets():
    """List the packaged presets.

    \b
    Example:
      wakelab presets
    """
    from .config import preset_names

    for name in preset_names():
        click.echo(name)


#: The commands defined above; each becomes a module of its own in the cli/ package (issue 22).
COMMANDS = (run, resume, plugins, config_keys, show_config, presets)


def _register_command_modules() -> None:
    """Commands that live in their own modules (one concern each) join the group here."""
    from importlib import import_module

    for command in COMMANDS:
        main.add_command(command)
    for module_name, attr in COMMAND_MODULES:
        main.add_command(getattr(import_module(f"wakelab.{module_name}"), attr))


#: (module, click command attribute) pairs; each module owns one command or group.
COMMAND_MODULES: list[tuple[str, str]] = [
    ("recording_cli", "recording"),
    ("analyze_cli", "analyze"),
    ("ui", "ui"),
    ("sweep_cli", "sweep"),
    ("export_cli", "export"),
    ("generate", "generate"),
    ("sync_cli", "sync"),
    ("evaluate_cli", "evaluate"),
]

_register_command_modules()

#: docs/cli.md's help text is wrapped to this width whatever the terminal (so the generated page is the same anywhere).
HELP_WIDTH = 100


def help_markdown() -> str:
    """docs/cli.md: every command's ``--help``, as the command prints it (``make docs``; a test keeps it current)."""
    lines = [
        "# Command reference",
        "",
        "<!-- Generated by `make docs` from each command's --help; tests/test_docs.py checks it is current. -->",
        "",
    ]

    def walk(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        ctx = click.Context(
            command,
            info_name=path[-1],
            parent=parent,
            terminal_width=HELP_WIDTH,
            max_content_width=HELP_WIDTH,
            help_option_names=["-h", "--help"],
        )
        lines.extend([f"## {' '.join(path)}", "", "```text", command.get_help(ctx).rstrip(), "```", ""])
        if isinstance(command, click.Group):
            for name in sorted(command.commands):
                walk(command.commands[name], [*path, name], ctx)

    walk(main, ["wakelab"], None)
    return "\n".join(lines)


if __name__ == "__main__":  # python -m wakelab.cli
    main()
