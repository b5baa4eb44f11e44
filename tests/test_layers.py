"""The package is layered, read from its import graph (``ast``; imports inside functions count too).

core -> storage -> tracking -> run -> apps: a module imports only from its own layer or the layers before it, and
no import cycle exists anywhere, not even through function-level imports. Plugins are checked against the public
API in test_public_api.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "wakelab"

LAYERS = {
    "core": {
        "errors", "config", "paths", "logs", "durable", "hookspecs", "registry", "plugin_config", "rows", "context",
        "data", "vocab", "model", "bpe", "gcide", "demo", "demo_text", "phase", "gaussian", "precision", "loss",
        "crashpoint", "quantized", "hub", "hookdocs", "subwords", "aliasing", "corpus_span", "writepoint",
    },
    "storage": {"checkpoints", "recording"},
    "tracking": {"tracking", "datasets", "sync"},
    "run": {"engine", "build", "trainer", "evaluation", "state", "stopping", "ranks", "merge", "logged_model",
            "sharding"},
    "apps": {
        "cli", "cli_config", "__main__", "analyze_cli", "recording_cli", "sweep", "sweep_cli", "ui", "analysis",
        "precision_report", "sweep_resume", "export", "export_cli", "gguf_export", "generate", "sync_cli",
        "evaluate_cli",
        "testing",
    },
}  # fmt: skip
ORDER = list(LAYERS)


def module_files() -> dict[str, Path]:
    """``wakelab.x.y`` -> file, for every module except the plugins (they see only the public API)."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[0] == "plugins":
            continue
        name = ".".join(("wakelab", *parts)).removesuffix(".__init__")
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the wakelab modules it imports anywhere in its body (``from . import x`` resolved to modules)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]  # wakelab.analysis.report.X -> wakelab.analysis.report
                if target in files and target != name and target != "wakelab":
                    deps.add(target)
        graph[name] = deps
    return graph


def layer_of(module: str) -> str:
    top = module.split(".")[1] if "." in module else module
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    for name in module_files():
        if name != "wakelab":
            layer_of(name)


def test_modules_import_only_their_layer_or_the_ones_before():
    bad = []
    for module, deps in import_graph().items():
        if module == "wakelab":
            continue
        for dep in deps:
            if ORDER.index(layer_of(dep)) > ORDER.index(layer_of(module)):
                bad.append(f"{module} ({layer_of(module)}) imports {dep} ({layer_of(dep)})")
    assert not bad, "; ".join(sorted(bad))


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_what_they_should():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert "wakelab.state" in import_graph()["wakelab.analysis.report"]  # a function-level import counts
    with pytest.raises(AssertionError, match="has no layer"):
        layer_of("wakelab.nowhere")
