"""The plugin guide's hook and context reference (docs/hooks.md), generated from the code it describes.

The hooks' docstrings (``wakelab.hooks.specs``) say when each runs and what it may do; the contexts' fields are
documented on their dataclasses (``wakelab.hooks.context``). Rendering both here, and a test that compares the result
with the committed page, keeps the guide from drifting as the contexts grow (``wakelab plugins --contexts-markdown``).
"""

from __future__ import annotations

import dataclasses
import inspect

from . import specs as hookspecs
from .context import CONTEXTS

HEADER = """# Hooks and their contexts

Generated from `src/wakelab/hooks/specs.py` and `src/wakelab/hooks/context.py` by `wakelab plugins --contexts-markdown`
(`make docs`); do not edit by hand. [Writing a wakelab plugin](plugins.md) explains how the pieces fit.
"""


def hook_names() -> list[str]:
    """The hooks in the order hookspecs.py declares them."""
    return [name for name, value in vars(hookspecs).items() if hasattr(value, "wakelab_spec")]


def _hook_section(name: str) -> str:
    function = getattr(hookspecs, name)
    signature = f"{name}({', '.join(inspect.signature(function).parameters)})"
    first = " (first answer wins)" if function.wakelab_spec.get("firstresult") else ""
    return f"### `{signature}`{first}\n\n{inspect.getdoc(function)}\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _context_section(cls: type) -> str:
    summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n", 1)[0]
    lines = [f"### `{cls.__name__}`", "", summary, "", "| field | type | meaning |", "| --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        lines.append(f"| `{field.name}` | `{_cell(kind)}` | {_cell(field.metadata['doc'])} |")
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """docs/hooks.md: every hook's docstring, then every context's fields as a table."""
    parts = [HEADER, "## Hooks\n", *(_hook_section(name) for name in hook_names()), "## Contexts\n"]
    parts.extend(_context_section(cls) for cls in CONTEXTS)
    return "\n".join(parts)
