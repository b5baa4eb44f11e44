"""``wakelab config-keys``, ``show-config`` and ``presets``: what a config can hold and holds."""

from __future__ import annotations

import click

from .options import ConfigOptions, config_options


@click.command("config-keys")
@click.option("--markdown", is_flag=True, help="The full reference as Markdown (docs/configuration.md).")
def config_keys(markdown):
    """List every config key with its default, the plugins' own keys too (marked with their plugin).

    \b
    Example:
      wakelab config-keys
      wakelab config-keys --markdown > docs/configuration.md
    """
    from ..config import reference_markdown

    if markdown:
        click.echo(reference_markdown(), nl=False)
        return
    from ..config import build_config, flatten
    from ..hooks.sections import every_section

    for key, value in build_config("demo").flat().items():
        click.echo(f"{key} = {value}")
    for section in every_section(None).values():
        for key, value in flatten(section.model().model_dump(mode="json"), f"{section.name}.").items():
            click.echo(f"{key} = {value}    (plugin {section.plugin})")


@click.command("show-config")
@config_options
def show_config(options: ConfigOptions):
    """Print the resolved config (preset + file + overrides) as YAML, without running.

    \b
    Example:
      wakelab show-config --preset demo --set train.lr=1e-3
    """
    import yaml

    config = options.resolve()
    click.echo(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), nl=False)


@click.command()
def presets():
    """List the packaged presets.

    \b
    Example:
      wakelab presets
    """
    from ..config import preset_names

    for name in preset_names():
        click.echo(name)
