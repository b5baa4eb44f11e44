"""The command-line options that build a RunConfig, shared by ``wakelab run``, ``show-config`` and ``sweep``.

``@config_options`` adds the eight options to a command and hands them to it as one :class:`ConfigOptions`
(``options``), so a command passes one object on instead of eight values in an order every caller must repeat.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import click


@dataclasses.dataclass(frozen=True)
class ConfigOptions:
    """What the user gave to build a run's config: a preset, a file, ``--set`` pairs, plugins and the shortcuts."""

    preset: str | None = None
    config_file: str | None = None
    overrides: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()
    max_steps: int | None = None
    output_dir: str | None = None
    experiment: str | None = None
    run_name: str | None = None

    def given(self) -> list[str]:
        """The options the user set, spelled as on the command line (``--set``, ``--max-steps``, ...)."""
        return [FLAGS[f.name] for f in dataclasses.fields(self) if getattr(self, f.name)]

    def resolve(self) -> Any:
        """The validated RunConfig: the preset (the demo's when neither a preset nor a file is given), the file,
        then ``--set`` and the shortcuts."""
        from ..config import build_config

        pairs = list(self.overrides)
        for value, key in (
            (self.max_steps, "train.max_steps"),
            (self.output_dir, "output_dir"),
            (self.experiment, "tracking.experiment"),
            (self.run_name, "tracking.run_name"),
        ):
            if value is not None:
                pairs.append(f"{key}={value}")
        preset = self.preset or (None if self.config_file else "demo")
        return build_config(preset, self.config_file, pairs, plugins=self.plugins)


#: Each field's option as the user types it.
FLAGS = {
    "preset": "--preset",
    "config_file": "--config",
    "overrides": "--set",
    "plugins": "--plugin",
    "max_steps": "--max-steps",
    "output_dir": "--output-dir",
    "experiment": "--experiment",
    "run_name": "--run-name",
}


def config_options(fn):
    """Add the shared options to a command; it receives them as one ``options: ConfigOptions`` argument."""

    @functools.wraps(fn)
    def command(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in FLAGS}
        values["overrides"], values["plugins"] = tuple(values["overrides"]), tuple(values["plugins"])
        return fn(*args, options=ConfigOptions(**values), **kwargs)

    for option in (  # applied first to last, as always (--help lists them last to first)
        click.option("--preset", default=None, help="Packaged preset to start from (default: demo)."),
        click.option(
            "--config", "config_file", type=click.Path(dir_okay=False), help="YAML file layered on the preset."
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override one key, e.g. train.lr=1e-3 (repeatable).",
        ),
        click.option(
            "--plugin",
            "plugins",
            multiple=True,
            metavar="NAME|PATH",
            help="Activate a plugin by name or .py path (repeatable).",
        ),
        click.option("--max-steps", type=int, default=None, help="Shortcut for --set train.max_steps=N."),
        click.option("--output-dir", default=None, help="Shortcut for --set output_dir=DIR."),
        click.option("--experiment", default=None, help="Shortcut for --set tracking.experiment=NAME."),
        click.option("--run-name", default=None, help="Shortcut for --set tracking.run_name=NAME."),
    ):
        command = option(command)
    return command


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
