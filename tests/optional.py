"""Optional test dependencies: skipped on a developer's machine when missing, a failure under CI.

``pytest.importorskip`` would turn a broken install in CI into a quietly skipped test, and the claim it checks
into an unchecked one. CI sets ``CI`` (GitHub Actions, GitLab and most others do); there every missing package fails.
"""

from __future__ import annotations

import importlib
import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, what: str) -> None:
    """Skip (or, under CI, fail) unless ``condition`` holds; ``what`` names what is missing and how to get it."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing under CI: {what}")
    pytest.skip(f"needs {what}")


def require(module: str, install: str = "pip install -c constraints.txt -e '.[test,quant]'"):
    """``import module``, or skip (fail under CI) naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        need(False, f"{module} ({install}): {exc}")
