"""Plugins see only the public API: ``wakelab``'s exported names, and nothing else from the package.

Every plugin module (built-in, repository-local and the example distribution) is read with ``ast``; an import of
any ``wakelab.<module>``, or of a name ``wakelab`` does not export, fails here, function-level imports included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import wakelab

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_FILES = sorted(
    [
        *(ROOT / "src" / "wakelab" / "plugins").glob("*.py"),
        *(ROOT / "plugins").glob("*.py"),
        *(ROOT / "examples").glob("*/*.py"),
    ]
)


def wakelab_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, what)`` for every import of wakelab in ``path``: ``wakelab``, ``wakelab.x`` or ``wakelab:Name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "wakelab"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "wakelab":
            if node.module == "wakelab":
                found += [(node.lineno, f"wakelab:{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_there_are_plugins_to_check():
    names = {p.name for p in PLUGIN_FILES}
    assert {"recorder.py", "sentry.py", "subword.py", "top_movers.py"} <= names


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_public_api(path):
    bad = []
    for line, what in wakelab_imports(path):
        if what == "wakelab":
            continue
        if what.startswith("wakelab:") and what.split(":", 1)[1] in wakelab.__all__:
            continue
        bad.append(f"{path.name}:{line} imports {what}")
    assert not bad, "plugins may use only what `wakelab` exports: " + "; ".join(bad)


def test_attribute_access_stays_public_too():
    """``wakelab.storage.checkpoints.verify`` in a plugin reaches past the API as surely as an import does."""
    bad = []
    for path in PLUGIN_FILES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "wakelab":
                if node.attr not in wakelab.__all__:
                    bad.append(f"{path.name}:{node.lineno} uses wakelab.{node.attr}")
    assert not bad, "; ".join(bad)


def test_the_checker_catches_an_internal_import(tmp_path):
    plugin = tmp_path / "sneaky.py"
    plugin.write_text("import wakelab\nfrom wakelab.engine import run\n\ndef f():\n    from wakelab import engine\n")
    found = [what for _, what in wakelab_imports(plugin)]
    assert found == ["wakelab", "wakelab.engine", "wakelab:engine"]
    assert "engine" not in wakelab.__all__


def test_every_exported_name_resolves():
    for name in wakelab.__all__:
        assert getattr(wakelab, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'engine_internals'"):
        wakelab.__getattr__("engine_internals")


def test_import_wakelab_is_cheap():
    code = (
        "import sys, wakelab\n"
        "heavy = [m for m in ('torch', 'mlflow', 'transformers', 'wakelab.run.engine') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`import wakelab` pulled in {out}"


def test_the_testing_helper_runs_a_plugin_on_a_tiny_model(tmp_path):
    from wakelab.testing import loaded_plugin, run_with_plugins

    plugin = tmp_path / "counter.py"
    plugin.write_text(
        "import wakelab\nSEEN = []\n@wakelab.hookimpl\ndef on_step_end(state):\n    SEEN.append(state.step)\n"
    )
    result = run_with_plugins([plugin], tmp_path / "work", {"train.max_steps": 3})
    assert result.status == "FINISHED" and result.output_dir == tmp_path / "work" / "out"
    assert loaded_plugin(plugin).SEEN == [1, 2, 3]


def test_the_plugin_guide_lists_every_public_name():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    missing = [name for name in wakelab.__all__ if name != "__version__" and f"`{name}`" not in guide]
    assert not missing, f"docs/plugins.md does not mention {missing}"
