"""Finding plugins and wiring the active ones into a pluggy PluginManager.

Plugins come from three places, listed by ``wakelab plugins``: the ``wakelab`` entry-point group (where the
built-ins register too, so a pip-installed plugin is a peer of them), ``./plugins/*.py`` in the working directory,
and paths given with ``--plugin path/to/file.py``. Being found does not make a plugin run: a run activates the
plugins its config names.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

import pluggy

from ..errors import PluginError
from . import specs as hookspecs

PROJECT = "wakelab"


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin was found: ``built-in``, ``entry point (dist)`` or ``local file``."""

    name: str
    origin: str
    location: str
    version: str | None = None

    def load(self) -> ModuleType:
        if self.origin == "local file":
            return load_file(Path(self.location))
        try:
            return importlib.import_module(self.location)
        except ImportError as exc:
            raise PluginError(f"plugin '{self.name}' ({self.location}) failed to import: {exc}") from None


def load_file(path: Path) -> ModuleType:
    """Import a plugin from a .py file under a private module name."""
    path = path.resolve()
    if not path.is_file() or path.suffix != ".py":
        raise PluginError(f"plugin file not found: {path} (give a path to a .py file or a plugin name)")
    module_name = module_name_for(path)
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from None
    return module


def module_name_for(path: Path) -> str:
    """The private module name a plugin file is imported under (stable for one path)."""
    path = Path(path).resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"wakelab_local_plugins.{path.stem}_{digest}"


def discover(cwd: Path | None = None) -> dict[str, PluginSource]:
    """Every plugin that can be activated by name, built-ins first; later sources shadow earlier ones."""
    found: dict[str, PluginSource] = {}
    for ep in sorted(entry_points(group=PROJECT), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else "?"
        origin = "built-in" if ep.value.startswith("wakelab.plugins.") else f"entry point ({dist})"
        found[ep.name] = PluginSource(ep.name, origin, ep.value, ep.dist.version if ep.dist else None)
    local = (cwd or Path.cwd()) / "plugins"
    if local.is_dir():
        for path in sorted(local.glob("*.py")):
            if not path.name.startswith("_"):
                found[path.stem] = PluginSource(path.stem, "local file", str(path))
    return found


def resolve(spec: str, available: dict[str, PluginSource]) -> PluginSource:
    """A plugin by name or by path to a .py file; unknown names list what is available."""
    if spec.endswith(".py") or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise PluginError(f"plugin file not found: {spec}")
        return PluginSource(path.stem, "local file", str(path))
    if spec not in available:
        names = ", ".join(sorted(available)) or "none"
        raise PluginError(f"unknown plugin '{spec}'; available: {names} (or give a path to a .py file)")
    return available[spec]


def make_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def build_manager(specs: Iterable[str], cwd: Path | None = None, optional: Iterable[str] = ()) -> pluggy.PluginManager:
    """A PluginManager with exactly the named plugins registered and checked.

    ``optional`` names are activated when a plugin of that name exists (``init.method: spherical`` activates the
    ``spherical`` plugin) and skipped otherwise (another active plugin may answer that method).
    """
    pm = make_manager()
    available = discover(cwd)
    optional = set(optional)
    for spec in dict.fromkeys(specs):
        if spec in optional and spec not in available:
            continue
        source = resolve(spec, available)
        register(pm, source.load(), source.name)
    return pm


def instance_of(plugin: object) -> object:
    """What a manager registers for a loaded plugin module: a new instance of its ``Plugin`` class, or the module.

    A plugin that keeps state for the run in progress (the recorder's open recording, the trajectory's frames, the
    Sentry target) holds it on a ``Plugin`` instance whose methods are its hooks. Each manager (one per run, and one
    per config check) gets its own instance, so nothing one run leaves behind is seen by the next, and two managers
    in one process never share it. A module without a ``Plugin`` class of its own is registered as it is.
    """
    cls = getattr(plugin, "Plugin", None) if isinstance(plugin, ModuleType) else None
    if isinstance(cls, type) and cls.__module__ == plugin.__name__:
        return cls()
    return plugin


def register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Register and check at once: a misspelt hook implementation is an error, not silence."""
    if pm.get_plugin(name) is not None:
        return
    plugin = instance_of(plugin)
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{name}': {exc}") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)
        raise PluginError(f"plugin '{name}': {exc}; hooks are: {', '.join(hook_names())}") from None
    for impl_name in _hookimpl_names(plugin):
        if impl_name not in hook_names():
            pm.unregister(name=name)
            raise PluginError(
                f"plugin '{name}' implements '{impl_name}', which is not a wakelab hook; "
                f"hooks are: {', '.join(hook_names())}"
            )


def _hookimpl_names(plugin: object) -> list[str]:
    names = []
    for attr, value in inspect.getmembers(plugin):
        if getattr(value, f"{PROJECT}_impl", None) is not None:
            names.append(getattr(value, f"{PROJECT}_impl").get("specname") or attr)
    return names


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, f"{PROJECT}_spec")]


def describe(cwd: Path | None = None) -> list[dict]:
    """Each plugin found: name, source, version, where, hooks and config keys (or the error that stops it loading)."""
    rows = []
    for name, source in discover(cwd).items():
        row = {"name": name, "source": source.origin, "version": source.version, "location": source.location,
               "hooks": [], "config_keys": [], "error": None}  # fmt: skip
        try:
            pm = make_manager()
            module = source.load()
            register(pm, module, name)
            row["hooks"] = sorted(impl for impl in _hookimpl_names(pm.get_plugin(name)))
            row["doc"] = ((module.__doc__ or "").strip().splitlines() or [""])[0]
            for impl in pm.hook.config_section.get_hookimpls():
                section, model = impl.function() or (None, None)
                if section is not None:
                    row["config_keys"] += [f"{section}.{key}" for key in model.model_fields]
        except PluginError as exc:
            row["error"] = str(exc)
        rows.append(row)
    return rows
