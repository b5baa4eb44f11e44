"""What issue 12 left over: one home for the UI address and for the rank, warnings through `wakelab.warn`."""

from __future__ import annotations

from pathlib import Path

import torch

import wakelab

SRC = Path(__file__).resolve().parents[1] / "src" / "wakelab"


def sources() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text(encoding="utf-8") for p in SRC.rglob("*.py")}


def test_the_ui_address_is_spelled_in_one_place():
    spelled = {name: text.count("#/experiments") for name, text in sources().items() if "#/experiments" in text}
    assert spelled == {"tracking.py": 3}, spelled  # ui_page's docstring, RUNS_VIEW and RUN_VIEW; all use ui_page


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
