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
    from ..config import build_config

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


#: The libraries whose installed version ``check_installed_versions`` holds to wakelab's declared range.
CHECKED = ("torch", "transformers", "accelerate", "mlflow", "peft", "tokenizers", "safetensors")


def check_installed_versions(declared: list[str] | None = None) -> None:
    """One line before any work when a library wakelab trains with is outside the range wakelab declares.

    The ranges are read from wakelab's own installed metadata (pyproject.toml's ``dependencies``), so there is one
    list of them. pip keeps them when it installs wakelab; a later ``pip install`` of another project can move a
    library out of range (an older transformers pinned by something else), and Trainer's seams differ there.
    """
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    from ..errors import WakelabError

    if declared is None:
        try:
            declared = requires("wakelab") or []
        except PackageNotFoundError:
            return  # a source tree on sys.path, not installed: nothing declared to check against
    for line in declared:
        req = Requirement(line)
        if req.marker is not None or req.name not in CHECKED:
            continue  # extras (bitsandbytes) are checked where they are used
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            raise WakelabError(f"{req.name} is not installed; wakelab needs {req}: pip install '{req}'") from None
        if not req.specifier.contains(Version(installed).base_version, prereleases=True):
            raise WakelabError(
                f"installed {req.name} {installed} is outside what wakelab supports ({req}); "
                f"install a supported one: pip install '{req}'"
            )
