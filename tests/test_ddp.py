"""Two processes, one run: `torchrun --nproc_per_node 2 -m wakelab run` trains with DDP (gloo, CPU) through Trainer.

One MLflow run (rank 0 logs), one recording, one set of checkpoints and mirrors, and the same trained rows on both
ranks: a throw-away plugin on each rank writes its final rows to rows-rank<R>.safetensors and they must be equal.
"""

from __future__ import annotations

import json

import mlflow
import pytest
from conftest import tiny_overrides, torchrun_wakelab_run, write_config_file

pytestmark = pytest.mark.slow

ROWS_PLUGIN = '''
"""Each rank writes the rows it ended with, and the run id it was given."""
import json
import os

from safetensors.torch import save_file

import wakelab


MAIN = {}


@wakelab.hookimpl
def mask_grads(ctx):
    MAIN.setdefault("grad", set()).add(ctx.is_main_process)


@wakelab.hookimpl
def on_step_end(state):
    MAIN.setdefault("step", set()).add(state.is_main_process)


@wakelab.hookimpl
def on_run_end(run, status):
    rank = os.environ.get("RANK", "0")  # only to name this test's files: plugins ask run.is_main_process
    ids = run.rows.new_ids
    save_file({"token_ids": ids, "rows": run.rows.values(ids).contiguous().cpu()}, f"rows-rank{rank}.safetensors")
    main = {kind: sorted(seen) for kind, seen in MAIN.items()} | {"run": [run.is_main_process]}
    with open(f"seen-rank{rank}.json", "w") as handle:
        json.dump({"run_id": run.run_id, "status": status, "world_size": os.environ.get("WORLD_SIZE"),
                   "main": main}, handle)
'''


def test_torchrun_two_processes_one_run_same_rows(tiny_model, texts, tmp_path):
    from safetensors.torch import load_file

    from wakelab.storage.checkpoints import MANIFEST, verify

    plugin = tmp_path / "rows_dump.py"
    plugin.write_text(ROWS_PLUGIN)
    mirrors = tmp_path / "mirrors"
    overrides = tiny_overrides(
        tiny_model,
        texts,
        **{
            "train.max_steps": 6,
            "train.save_steps": 3,
            "train.save_total_limit": 5,
            "sentry.target": str(mirrors),
            "recorder.every": 1,
            "plugins": ["spherical", "recorder", "sentry", str(plugin)],
        },
    )
    write_config_file(tmp_path / "tiny.yaml", overrides)

    proc, seconds = torchrun_wakelab_run(tmp_path, "tiny.yaml", timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])

    # One MLflow run, with the loss Trainer averaged over both ranks.
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1, runs[["run_id", "status"]]
    run_id = runs.iloc[0]["run_id"]
    assert runs.iloc[0]["status"] == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [2, 4, 6]

    # Both ranks saw that run and ended FINISHED; their trained rows are identical, and are the run's final rows.
    seen = [json.loads((tmp_path / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["run_id"] for s in seen] == [run_id, run_id]
    assert {s["status"] for s in seen} == {"FINISHED"} and {s["world_size"] for s in seen} == {"2"}
    # Every context answers "am I the main process" the same way on a rank: yes on rank 0, no on rank 1.
    assert [s["main"] for s in seen] == [{k: [main] for k in ("grad", "step", "run")} for main in (True, False)]
    rank0, rank1 = (load_file(str(tmp_path / f"rows-rank{r}.safetensors")) for r in (0, 1))
    assert rank0["rows"].equal(rank1["rows"]) and rank0["token_ids"].equal(rank1["token_ids"])
    final = load_file(str(tmp_path / "out" / "final" / "new_rows.safetensors"))
    assert final["rows"].equal(rank0["rows"])

    # One set of checkpoints, complete (each rank's RNG state inside), nothing left in staging.
    out = tmp_path / "out"
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    for name in checkpoints:
        manifest = verify(out / name)
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"]), sorted(manifest["files"])
        assert manifest["run_id"] == run_id
    assert not any((out / ".staging").glob("*")) if (out / ".staging").exists() else True

    # One set of mirrors (sentry on rank 0 only), one recording (recorder on rank 0 only).
    mirrored = sorted(p.name for p in (mirrors / run_id).iterdir() if (p / MANIFEST).is_file())
    assert mirrored == ["checkpoint-3", "checkpoint-6"], sorted(p.name for p in (mirrors / run_id).iterdir())
    index = json.loads((out / "recording" / "index.json").read_text())
    assert index, "the recording is empty"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("recording")) == ["recording"]
    print(f"two-process run: {seconds:.0f} s")
