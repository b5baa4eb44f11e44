"""The configuration reference (docs/configuration.md), generated from the sections."""

from __future__ import annotations

import json
from typing import Any, Literal

from .sections import ALIASES, SECTIONS, RunConfig


def reference_markdown() -> str:
    """The configuration reference, generated from the field definitions above and the built-in plugins' sections
    (docs/configuration.md)."""
    from ..hooks.sections import every_section

    out = [
        "# Configuration reference",
        "",
        "Generated from `wakelab.config` by `wakelab config-keys --markdown`; do not edit by hand.",
        "Set any key with `--set section.key=value`, in a `--config` YAML file, or in a preset.",
        "A plugin's section (`recorder`, `sentry`, ...) is used when that plugin is active.",
        "",
    ]
    top = {k: v for k, v in RunConfig.model_fields.items() if k not in SECTIONS}
    out += ["## (top level)", "", "| key | default | description |", "| --- | --- | --- |"]
    out += [f"| `{k}` | `{_default(v)}` | {v.description} |" for k, v in top.items()]
    plugin_sections = {s.name: s for s in every_section(None, origins={"built-in"}).values()}
    for section, model in {**SECTIONS, **{n: s.model for n, s in sorted(plugin_sections.items())}}.items():
        owner = f" (plugin `{plugin_sections[section].plugin}`)" if section in plugin_sections else ""
        out += ["", f"## {section}{owner}", "", (model.__doc__ or "").strip(), ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            kind = _type_name(field.annotation)
            out.append(f"| `{section}.{name}` | {kind} | `{_default(field)}` | {field.description} |")
    out += ["", "## Short names", "", "| short | key |", "| --- | --- |"]
    out += [f"| `{a}` | `{k}` |" for a, k in ALIASES.items()]
    return "\n".join(out) + "\n"


def _default(field: Any) -> str:
    value = field.default
    return "null" if value is None else json.dumps(value) if not isinstance(value, str) else value


def _type_name(annotation: Any) -> str:
    import typing

    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in typing.get_args(annotation))
    text = str(annotation).replace("typing.", "")
    if text.startswith("<class '"):
        text = text[8:-2]
    return text.replace(" | ", " or ")
