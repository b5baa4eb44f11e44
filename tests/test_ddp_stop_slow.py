"""torchrun, two processes (gloo, CPU): a pre-flight failure on one rank is every rank's error, at once and before
any MLflow run; a SIGTERM that reaches one rank stops both after the same step, with one checkpoint."""

from __future__ import annotations

import mlflow
import pytest
from conftest import tiny_overrides, torchrun_wakelab_run, write_config_file

pytestmark = pytest.mark.slow


def torchrun(tmp_path, tiny_model, texts, plugin: str, timeout: int = 300, **extra):
    (tmp_path / "rank_plugin.py").write_text(plugin)
    values = tiny_overrides(tiny_model, texts, **extra)
    values["plugins"] = [str(tmp_path / "rank_plugin.py")]
    write_config_file(tmp_path / "tiny.yaml", values)
    return torchrun_wakelab_run(tmp_path, "tiny.yaml", timeout=timeout)


RANK1_FAILS = """
import os
if os.environ.get("RANK") == "1":
    raise RuntimeError("the dataset disk is not mounted on this node")
import wakelab
"""


def test_preflight_failure_on_rank_1_only_is_every_ranks_error(tiny_model, texts, tmp_path):
    proc, seconds = torchrun(tmp_path, tiny_model, texts, RANK1_FAILS)
    assert proc.returncode != 0
    line = (
        f"wakelab: error: plugin file {tmp_path / 'rank_plugin.py'} failed to import: RuntimeError: the dataset "
        "disk is not mounted on this node"
    )
    assert proc.stderr.count(line) == 2, proc.stderr[-4000:]  # rank 1's own error, and rank 0 with the same line
    assert "wakelab/run/engine.py" not in proc.stderr  # no worker traceback (torchrun's own summary has one)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []  # no run, so none RUNNING
    assert seconds < 120, seconds  # not the process group's timeout (30 min)
    print(f"rank-1 pre-flight failure: both ranks out in {seconds:.0f} s")


SIGTERM_RANK1_AT_3 = """
import os, signal
import wakelab

@wakelab.hookimpl
def on_step_end(state):
    if state.step == 3 and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 hears it; the flag is all-reduced at the step's end
"""


def test_sigterm_on_one_rank_stops_both_at_the_same_step_with_one_checkpoint(tiny_model, texts, tmp_path):
    from wakelab.storage.checkpoints import verify

    proc, _ = torchrun(tmp_path, tiny_model, texts, SIGTERM_RANK1_AT_3, **{"train.max_steps": 6})
    assert proc.returncode != 0  # torchrun reports its workers' 143
    hint = (
        "wakelab: stopped by SIGTERM after step 3; the MLflow run is marked KILLED; checkpoint out/checkpoint-3 "
        "is complete; continue with: wakelab resume out"
    )
    assert proc.stderr.count(hint) == 2, proc.stderr[-4000:]  # both ranks stopped after step 3
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(verify(out / "checkpoint-3")["files"])
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED" and run.data.tags["wakelab.stop.step"] == "3"
