"""Which plugin owns which config section, so the core config can validate sections it does not know by name.

A plugin declares its section with the ``config_section`` hook (a name and a ``wakelab.PluginConfig`` model) and may
refuse a resolved config with ``check_config``. ``wakelab.config`` asks this module for the sections of the plugins a
run activates; the core never names a plugin. Loading the active plugins here also means a plugin that cannot be
imported (a missing dependency) stops the run while its config is resolved, before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from ..errors import PluginError
from . import registry


@dataclass(frozen=True)
class Section:
    """A config section and the plugin that declared it."""

    name: str
    plugin: str
    model: type


def declared(pm: pluggy.PluginManager, reserved: Iterable[str] = ()) -> dict[str, Section]:
    """The sections the manager's plugins declare; two claims on one name, or on a core section, are errors."""
    reserved = set(reserved)
    found: dict[str, Section] = {}
    for impl in pm.hook.config_section.get_hookimpls():
        answer = impl.function()
        if answer is None:
            continue
        if not (isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], str)):
            raise PluginError(f"plugin '{impl.plugin_name}': config_section must return (name, PluginConfig subclass)")
        name, model = answer
        if name in reserved:
            raise PluginError(
                f"plugin '{impl.plugin_name}' claims the config section '{name}', which is wakelab's own; "
                "rename the plugin's section"
            )
        if name in found:
            raise PluginError(
                f"plugins '{found[name].plugin}' and '{impl.plugin_name}' both claim the config section '{name}'; "
                "activate only one of them, or rename one plugin's section"
            )
        found[name] = Section(name, impl.plugin_name, model)
    return found


def active_sections(
    specs: Iterable[str], cwd: Path | None, optional: Iterable[str], reserved: Iterable[str], strict: bool = True
) -> tuple[pluggy.PluginManager, dict[str, Section]]:
    """Load the active plugins (a broken one is a PluginError naming it) and collect their sections.

    ``strict=False`` skips plugins that cannot be found or loaded: reading back a finished run's config (to analyse
    it) must not depend on the plugins it ran with still being installed.
    """
    if strict:
        pm = registry.build_manager(specs, cwd, optional=optional)
    else:
        pm = registry.make_manager()
        for spec in specs:
            try:
                source = registry.resolve(spec, registry.discover(cwd))
                registry.register(pm, source.load(), source.name)
            except PluginError:
                continue
    return pm, declared(pm, reserved)


def owner_of(section: str, cwd: Path | None) -> str | None:
    """The plugin found (active or not) that declares ``section``, if any; broken plugins are skipped."""
    for name, source in registry.discover(cwd).items():
        pm = registry.make_manager()
        try:
            registry.register(pm, source.load(), name)
        except PluginError:
            continue
        if section in declared(pm):
            return name
    return None


def every_section(cwd: Path | None, origins: Iterable[str] | None = None) -> dict[str, Section]:
    """The sections of every plugin found that loads (``origins`` limits it, e.g. to ``{"built-in"}``)."""
    found: dict[str, Section] = {}
    for name, source in registry.discover(cwd).items():
        if origins is not None and source.origin not in origins:
            continue
        pm = registry.make_manager()
        try:
            registry.register(pm, source.load(), name)
        except PluginError:
            continue
        for section in declared(pm).values():
            found.setdefault(section.name, section)
    return found


def check(pm: pluggy.PluginManager, config: Any) -> None:
    """Let each active plugin refuse the resolved config (it raises ConfigError naming the key and the fix)."""
    pm.hook.check_config(config=config)
