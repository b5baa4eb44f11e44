"""The package is layered, and its folders say how: a module's layer is the folder it sits in.

core -> storage -> tracking -> run -> apps: a module imports only from its own layer or the layers before it (read
from its import graph with ``ast``; imports inside functions count too, ``if TYPE_CHECKING:`` ones do not), and no
import cycle exists anywhere.
Modules directly in ``src/wakelab/`` are the core. Plugins are checked against the public API in
test_public_api.py. The layout section of docs/architecture.md is generated from the folders' docstrings here:
``python tests/test_layers.py --write`` rewrites it.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "wakelab"
DOC = ROOT / "docs" / "architecture.md"

#: The layers in order, each with its folders (a module directly in src/wakelab/ is core).
LAYERS = {
    "core": ("config", "hooks", "data", "inits"),
    "storage": ("storage",),
    "tracking": ("tracking",),
    "run": ("run",),
    "apps": ("export", "analysis", "sweep", "cli", "testing"),
}
ORDER = list(LAYERS)
FOLDER_LAYER = {folder: layer for layer, folders in LAYERS.items() for folder in folders}
ENTRY_POINTS = {"__main__": "apps"}  # ``python -m wakelab`` starts the CLI
MAX_TOP_LEVEL = 15
MAX_LINES = 800


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


def imports_of(path: Path, package: str) -> set[str]:
    """Every module name ``path`` imports, relative imports resolved, ``from m import n`` as ``m`` and ``m.n``."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {  # ``if TYPE_CHECKING:`` imports never run: they give type checkers a name, not a dependency
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the wakelab modules it imports anywhere in its body (``from . import x`` resolved to modules)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for target in imports_of(path, package):
            while target and target not in files and "." in target:
                target = target.rsplit(".", 1)[0]  # wakelab.analysis.report.X -> wakelab.analysis.report
            if target in files and target != name and target != "wakelab":
                deps.add(target)
        graph[name] = deps
    return graph


def layer_of(module: str) -> str:
    """The layer of ``wakelab.<folder>.…``: its folder's; a module directly in src/wakelab/ is core."""
    parts = module.split(".")[1:]
    if len(parts) == 1 and (SRC / f"{parts[0]}.py").is_file():
        return ENTRY_POINTS.get(parts[0], "core")
    if parts and parts[0] in FOLDER_LAYER:
        return FOLDER_LAYER[parts[0]]
    raise AssertionError(f"{module} has no layer: put it in a folder listed in LAYERS in tests/test_layers.py")


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


def first_sentence(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    text = " ".join(doc.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return match.group(1) if match else text


def layout_markdown() -> str:
    """One line per folder, in layer order, from each package's own docstring."""
    core = sorted(p.stem for p in SRC.glob("*.py") if p.stem not in {"__init__", "__main__"})
    lines = ["```", f"src/wakelab/{'':17}core modules: {', '.join(core)}"]
    folders = sorted(
        (p.parent for p in SRC.rglob("__init__.py") if p.parent != SRC),
        key=lambda p: (
            ORDER.index(FOLDER_LAYER.get(p.relative_to(SRC).parts[0], "apps")),
            p.relative_to(SRC).parts[0] == "plugins",
            p.relative_to(SRC).parts,
        ),
    )
    for folder in folders:
        rel = folder.relative_to(SRC)
        layer = FOLDER_LAYER.get(rel.parts[0], "plugins")
        label = f"{'  ' * len(rel.parts)}{rel.parts[-1]}/"
        tag = f"[{layer}] " if len(rel.parts) == 1 else ""
        lines.append(f"{label:<29}{tag}{first_sentence(folder / '__init__.py')}")
    lines.append("```")
    return "\n".join(lines) + "\n"


BEGIN = "<!-- layout: generated by `python tests/test_layers.py --write`; do not edit by hand -->\n"
END = "<!-- end of layout -->"


def documented_layout() -> str:
    text = DOC.read_text(encoding="utf-8")
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


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
    assert "wakelab.run.state" in import_graph()["wakelab.analysis.report.target"]  # a function-level import counts
    assert layer_of("wakelab.errors") == "core" and layer_of("wakelab.run.engine") == "run"
    assert layer_of("wakelab.storage.recording.writer") == "storage"
    with pytest.raises(AssertionError, match="has no layer"):
        layer_of("wakelab.nowhere.thing")


def test_the_top_level_stays_small_and_modules_short():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules directly in src/wakelab/ (at most {MAX_TOP_LEVEL}): {top}"
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := p.read_text(encoding="utf-8").count("\n")) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def client_uses(path: Path) -> list[int]:
    """The lines of ``path`` that import or reach ``MlflowClient``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            if any(alias.name == "MlflowClient" for alias in node.names):
                found.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "MlflowClient":
            found.append(node.lineno)
    return found


def test_only_tracking_makes_an_mlflow_client():
    """Every MLflow client call goes through tracking/ (its retries, tag limit and view of the store)."""
    bad = [
        f"{name}:{line}"
        for name, path in module_files().items()
        if not name.startswith("wakelab.tracking")
        for line in client_uses(path)
    ]
    assert not bad, "make clients with wakelab.tracking.runs.mlflow_client(): " + "; ".join(bad)


def test_the_mlflow_check_catches_a_client(tmp_path):
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(
        "import mlflow\n\ndef f():\n    from mlflow.tracking import MlflowClient\n    mlflow.MlflowClient()\n"
    )
    assert client_uses(sneaky) == [4, 5]


def test_analysis_imports_no_command_line():
    """The analyses are a library the CLI calls: none of them imports click or a cli module."""
    bad = []
    for name, path in module_files().items():
        if name.startswith("wakelab.analysis"):
            package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
            for target in imports_of(path, package):
                if target.split(".")[0] == "click" or target.startswith("wakelab.cli"):
                    bad.append(f"{name} imports {target}")
    assert not bad, "; ".join(sorted(set(bad)))


def test_every_folder_says_what_it_holds():
    for init in SRC.rglob("__init__.py"):
        assert first_sentence(init), f"{init.relative_to(ROOT)} has no docstring saying what the folder holds"


def test_the_documented_layout_is_the_layout():
    assert documented_layout() == layout_markdown(), "run `python tests/test_layers.py --write`"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        text = DOC.read_text(encoding="utf-8")
        head, rest = text.split(BEGIN, 1)
        DOC.write_text(head + BEGIN + layout_markdown() + END + rest.split(END, 1)[1], encoding="utf-8")
    else:
        print(layout_markdown(), end="")
