"""What issue 12 left over: one home for the UI address and for the rank, warnings through `wakelab.warn`."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import wakelab

SRC = Path(__file__).resolve().parents[1] / "src" / "wakelab"


def sources() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text(encoding="utf-8") for p in SRC.rglob("*.py")}


def code_strings(text: str) -> list[tuple[str, str]]:
    """``(where, value)`` for every string constant in the code, docstrings left out (they may mention anything)."""
    tree = ast.parse(text)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    assigned = {
        id(node.value): node.targets[0].id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    return [
        (assigned.get(id(node), f"line {node.lineno}"), node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_ui_address_is_spelled_in_one_place():
    spelled = {
        (name, where)
        for name, text in sources().items()
        for where, value in code_strings(text)
        if "#/experiments" in value
    }
    assert {where for _, where in spelled} == {"RUNS_VIEW", "RUN_VIEW"}, spelled  # the two views ui_page fills in
    assert len({name for name, _ in spelled}) == 1, spelled  # both in one module
    assert code_strings('"""#/experiments in a docstring"""\nX = "#/experiments"\n') == [("X", "#/experiments")]


def test_no_module_hand_writes_the_warning_prefix():
    written = [name for name, text in sources().items() if "wakelab: warning" in text and name != "logs.py"]
    assert written == [], f"use wakelab.logs.warn instead of printing the prefix: {written}"


def test_init_context_talks_on_stderr_by_default(capsys):
    ctx = wakelab.InitContext(
        method="x",
        weight=torch.zeros(2, 2),
        num_base=1,
        new_ids=torch.tensor([1]),
        new_words=["w"],
        tokenizer=None,
        options={},
        generator=torch.Generator(),
    )
    ctx.log("filled 1 row")
    out, err = capsys.readouterr()
    assert out == "" and err == "wakelab: filled 1 row\n"


def test_only_logs_reads_the_rank():
    readers = sorted(name for name, text in sources().items() if '"RANK"' in text)
    assert readers == ["logs.py"], f"ask logs.is_main_process() or a context's is_main_process instead: {readers}"
