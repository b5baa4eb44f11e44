"""Resolving a config: preset, then ``--config FILE``, then ``--set key=value``, validated."""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, create_model

from ..errors import ConfigError
from .sections import ALIASES, SECTIONS, RunConfig


def all_keys() -> list[str]:
    """Every settable key, `section.key` form."""
    keys = [name for name in RunConfig.model_fields if name not in SECTIONS]
    for section, model in SECTIONS.items():
        keys.extend(f"{section}.{name}" for name in model.model_fields)
    return keys


def resolve_key(key: str) -> str:
    """The canonical `section.key` for a key or alias, or a ConfigError that lists near matches."""
    key = key.strip()
    if key in ALIASES:
        return ALIASES[key]
    known = all_keys()
    if key in known:
        return key
    leaf_matches = [k for k in known if k.rsplit(".", 1)[-1] == key]
    if len(leaf_matches) == 1:
        return leaf_matches[0]
    import difflib

    near = difflib.get_close_matches(key, known + list(ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else "; `wakelab config-keys` lists them"
    raise ConfigError(f"unknown config key '{key}'{hint}")


def plugin_section(key: str) -> str | None:
    """The section a dotted key names outside the core sections (a plugin's, checked once the active ones are known)."""
    section = key.strip().split(".", 1)[0]
    return section if "." in key and section not in RunConfig.model_fields else None


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars and lists (`1e-3`, `true`, `null`, `[a, b]`), else the string itself."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML reads 1e-3 as a string; numbers in scientific notation are what researchers type.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def set_in(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
    node[leaf] = value


def preset_names() -> list[str]:
    folder = resources.files("wakelab.config") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(preset_names())}")
    text = (resources.files("wakelab.config") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    return data


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(
    preset: str | None = "demo",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | tuple[str, ...] = (),
    *,
    plugins: tuple[str, ...] | list[str] = (),
    cwd: Path | None = None,
) -> RunConfig:
    """Resolve preset -> file -> overrides into a validated RunConfig, with the active plugins' own sections.

    ``overrides`` is either ``["key=value", ...]`` as typed on the command line or a ``{key: value}`` dict.
    ``plugins`` are activated on top of the config's own list (``--plugin``); ``cwd`` is where ``./plugins`` is.
    """
    tree: dict[str, Any] = load_preset(preset) if preset else {}
    if config_file:
        tree = merge(tree, load_config_file(config_file))
    if preset:
        tree["preset"] = preset
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set '{item}' must be key=value, e.g. --set train.lr=1e-3")
            key, text = item.split("=", 1)
            pairs.append((key, parse_value(text)))
    explicit = set()
    for key, value in pairs:
        section = plugin_section(key)
        if section:
            explicit.add(section)  # a plugin's section: checked against the plugin once the active ones are known
            set_in(tree, key.strip(), value)
            continue
        set_in(tree, resolve_key(key), value)
    if plugins:
        listed = tree.get("plugins") or ()
        listed = [p.strip() for p in listed.split(",") if p.strip()] if isinstance(listed, str) else list(listed)
        tree["plugins"] = list(dict.fromkeys([*listed, *plugins]))
    return validate(tree, cwd=cwd, explicit=explicit)


def validate(
    tree: dict[str, Any],
    cwd: Path | None = None,
    explicit: set[str] | frozenset[str] = frozenset(),
    strict: bool = True,
) -> RunConfig:
    """A RunConfig from a nested mapping: the core sections, then the sections the active plugins declare.

    A section no active plugin declares is an error when it was set explicitly (``explicit``: it would be ignored)
    or when no plugin found declares it; one from a preset or file for a plugin that is found but not active is
    left out, so a preset's ``recorder:`` block does no harm when the recorder is switched off. ``strict=False``
    (reading a finished run back) skips plugins that are gone, and their sections.
    """
    from ..hooks import sections as plugin_config

    core_tree = {k: v for k, v in tree.items() if k in RunConfig.model_fields}
    others = {k: v for k, v in tree.items() if k not in RunConfig.model_fields}
    core = _validated(RunConfig, core_tree, {})
    pm, sections = plugin_config.active_sections(
        core.active_plugins, cwd, optional=[core.init.method], reserved=RunConfig.model_fields, strict=strict
    )
    for name, value in others.items():
        if name in sections or not strict:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"unknown config key '{name}'{resolve_hint(name)}")
        owner = plugin_config.owner_of(name, cwd)
        if owner is None:
            raise ConfigError(
                f"unknown config key '{_first_key(name, value)}': neither wakelab nor any plugin found has a section "
                f"'{name}'; `wakelab config-keys` lists them all"
            )
        if name in explicit:
            raise ConfigError(
                f"config key '{_first_key(name, value)}' belongs to plugin '{owner}', which is not active, so it "
                f"would be ignored; activate it with --plugin {owner} (or list it under plugins:)"
            )
    config = core
    if sections:
        model = _with_sections(tuple(sorted((s.name, s.model) for s in sections.values())))
        full_tree = {**core_tree, **{k: v for k, v in others.items() if k in sections}}
        config = _validated(model, full_tree, {s.name: s.plugin for s in sections.values()})
    plugin_config.check(pm, config)
    return config


def _first_key(name: str, value: Any) -> str:
    return f"{name}.{next(iter(value))}" if isinstance(value, dict) and value else name


@functools.cache
def _with_sections(sections: tuple[tuple[str, type], ...]) -> type[RunConfig]:
    """RunConfig with the plugins' sections as fields (one class per set of sections, so configs compare equal)."""
    fields = {name: (model, model()) for name, model in sections}
    return create_model("RunConfig", __base__=RunConfig, __module__=__name__, **fields)


def _validated(model: type[RunConfig], tree: dict[str, Any], owners: dict[str, str]) -> RunConfig:
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, owners, model)) from None


def describe_validation_error(
    exc: ValidationError, owners: dict[str, str] | None = None, model: type[RunConfig] = RunConfig
) -> str:
    """One line per problem: the dotted key, what was given, and what is expected; a plugin's key names the plugin."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        given = err.get("input")
        owner = (owners or {}).get(str(err["loc"][0])) if err["loc"] else None
        prefix = f"plugin '{owner}': " if owner else ""
        if err["type"] == "extra_forbidden":
            near = _plugin_hint(model, key) if owner else resolve_hint(key)
            lines.append(f"{prefix}unknown config key '{key}'{near}")
            continue
        expected = err["msg"].removeprefix("Value error, ")
        if key:
            shown = json.dumps(given, default=str) if not isinstance(given, dict) else "a mapping"
            lines.append(f"{prefix}config key '{key}': got {shown}; {expected}")
        else:
            lines.append(expected)
    return "; ".join(lines)


def _plugin_hint(model: type[RunConfig], key: str) -> str:
    import difflib

    section, _, leaf = key.partition(".")
    known = list(model.model_fields[section].annotation.model_fields)
    near = difflib.get_close_matches(leaf, known, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(f'{section}.{n}' for n in near)}?" if near else f"; keys: {', '.join(known)}"


def resolve_hint(key: str) -> str:
    try:
        resolve_key(key.rsplit(".", 1)[-1])
    except ConfigError as exc:
        message = str(exc)
        return message[message.index(";") :] if ";" in message else ""
    return f"; did you mean '{resolve_key(key.rsplit('.', 1)[-1])}'?"
