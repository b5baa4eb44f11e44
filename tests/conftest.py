"""Shared fixtures: tiny models built from a config and saved locally, small texts, an isolated MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The helpers wakelab ships for plugin authors are the ones its own tests use (re-exported for `from conftest import`).
from wakelab.testing import (  # noqa: F401
    COINED,
    TINY_HIDDEN,
    build_tiny_llama,
    loaded_plugin,
    make_text,
    tiny_overrides,
    write_texts,
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("texts")
    return write_texts(folder)


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema made once: creating the tables takes seconds per store."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch, empty_mlflow_db):
    """Every test tracks to its own SQLite store and caches under its own folder."""
    import shutil

    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("WAKELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    yield
    while mlflow.active_run():
        mlflow.end_run()


def run_store(root: Path, empty_db: Path, specs: dict[str, dict]) -> dict:
    """Runs made once for a whole test module: ``specs`` maps a name to its config overrides.

    Every run tracks to one SQLite store under ``root`` and writes to ``root / name``. Returns the runs' results by
    name, plus ``uri`` and ``root``, so the module's tests point MLflow there and read the runs back.
    """
    import shutil

    import mlflow

    from wakelab.config import build_config
    from wakelab.run import engine

    shutil.copy(empty_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("WAKELAB_CACHE", str(root / "cache"))
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        for name, overrides in specs.items():
            config = build_config(None, None, {**overrides, "output_dir": str(root / name)})
            out[name] = engine.run(config, progress=False)
    out["uri"], out["root"] = uri, root
    return out


def write_config_file(path: Path, overrides: dict) -> Path:
    """``overrides`` (dotted keys, as ``tiny_overrides`` gives them) as the nested YAML that ``--config`` reads."""
    import yaml

    from wakelab.config import set_in

    tree: dict = {}
    for key, value in overrides.items():
        set_in(tree, key, value)
    path.write_text(yaml.safe_dump(tree))
    return path


def raising_plugin(tmp_path: Path, step: int, exc: str = "RuntimeError", message: str = "power cut") -> Path:
    """A throw-away plugin file whose on_step_end raises ``exc(message)`` at ``step`` (a crash, Ctrl-C, ...)."""
    plugin = tmp_path / f"raise_{exc}_at_{step}.py"
    plugin.write_text(
        "import wakelab\n@wakelab.hookimpl\ndef on_step_end(state):\n"
        f"    if state.step == {step}:\n        raise {exc}({message!r})\n"
    )
    return plugin


def torchrun_wakelab_run(cwd: Path, config: str, timeout: int) -> tuple:
    """``torchrun --nproc_per_node 2 -m wakelab run --config CONFIG`` in ``cwd`` (gloo on CPU): (process, seconds)."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "wakelab", "run", "--config", config, "--no-progress"]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started
