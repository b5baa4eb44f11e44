"""``train.distributed=fsdp`` under torchrun, 2 gloo ranks on the CPU: the frozen base sharded by FSDP2, the same run
as a single process with the same global batch.

The reference is one single-process run with ``train.batch_size=4``; the FSDP runs use 2 ranks x 2 blocks. Tolerance:
the loss per step to 1e-5 relative, the new rows to 1e-6 absolute (fp32; the gradient is averaged over ranks instead
of over one batch, so the sums are ordered differently); recorded rows (bf16) to one bf16 step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import run_store, tiny_overrides, write_config_file
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 6
SINGLE = {"train.batch_size": 4, "train.max_steps": STEPS, "train.logging_steps": 1, "train.save_steps": 3}
FSDP = {**SINGLE, "train.batch_size": 2, "train.distributed": "fsdp"}

PROBE = '''
"""Each rank says what it holds: the base sharded (DTensor, its own rows), the new rows whole, base rows readable."""
import json
import os

import wakelab


@wakelab.hookimpl
def on_run_start(run):
    base = run.model.get_input_embeddings().base_weight
    seen = {"base_type": type(base).__name__, "local_rows": int(base.to_local().shape[0]) if hasattr(base, "to_local")
            else int(base.shape[0]), "main": run.is_main_process, "new_rows_type": type(run.rows.values(
            run.rows.new_ids)).__name__}
    try:
        seen["base_rows_sum"] = float(run.rows.values(range(run.rows.num_base)).float().sum())
    except RuntimeError as exc:
        seen["base_rows_error"] = str(exc)
    with open(run.output_dir / f"probe-rank{os.environ.get('RANK', '0')}.json", "w") as handle:
        json.dump(seen, handle)
'''


def plugins(tmp_path: Path) -> list[str]:
    (tmp_path / "probe.py").write_text(PROBE)
    return ["spherical", "recorder", "sentry", "trajectory", str(tmp_path / "probe.py")]


def extras(tmp_path: Path) -> dict:
    return {
        "recorder.every": 1,
        "trajectory.every": 3,
        "sentry.target": str(tmp_path / "mirrors"),
        "plugins": plugins(tmp_path),
    }


@pytest.fixture(scope="module")
def reference(tiny_model, texts, tmp_path_factory, empty_mlflow_db):
    """The single-process run every FSDP run is compared with."""
    root = tmp_path_factory.mktemp("single")
    runs = run_store(root, empty_mlflow_db, {"single": tiny_overrides(tiny_model, texts, **SINGLE, **extras(root))})
    client = mlflow.MlflowClient(runs["uri"])
    run_id = runs["single"].run_id
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    probe = json.loads((root / "single" / "probe-rank0.json").read_text())
    return {"out": root / "single", "losses": losses, "probe": probe}


def torchrun(cwd: Path, args: list[str], timeout: int = 300, launcher: list[str] | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    command = [sys.executable, "-m", "torch.distributed.run"]
    command += launcher or ["--standalone", "--nproc_per_node", "2"]
    started = time.monotonic()
    proc = subprocess.run(
        [*command, "-m", "wakelab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - started


def losses_of(run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")}


def assert_same_losses(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), (got, want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])


def assert_same_rows(folder: Path, reference_folder: Path) -> None:
    got = load_file(str(folder / "final" / "new_rows.safetensors"))
    want = load_file(str(reference_folder / "final" / "new_rows.safetensors"))
    assert got["token_ids"].equal(want["token_ids"])
    torch.testing.assert_close(got["rows"], want["rows"], rtol=0, atol=1e-6)


def test_fsdp_two_ranks_train_as_one_process(tiny_model, texts, tmp_path, reference):
    from wakelab.storage import recording
    from wakelab.storage.checkpoints import MANIFEST, verify

    write_config_file(tmp_path / "fsdp.yaml", tiny_overrides(tiny_model, texts, **FSDP, **extras(tmp_path)))
    proc, seconds = torchrun(tmp_path, ["run", "--config", "fsdp.yaml", "--no-progress"])
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    assert "FSDP2: 2 decoder layers and the rest of the base sharded over 2 processes" in proc.stderr

    # Each rank held half the base (a DTensor), the new rows whole; the main process read the base rows whole (the
    # trajectory's basis needs them), the other one is told to read them there instead of waiting on a collective.
    probes = [json.loads((tmp_path / "out" / f"probe-rank{r}.json").read_text()) for r in (0, 1)]
    num_base = reference["probe"]["local_rows"]
    assert [p["base_type"] for p in probes] == ["DTensor", "DTensor"]
    assert sum(p["local_rows"] for p in probes) == num_base and max(p["local_rows"] for p in probes) < num_base
    assert [p["new_rows_type"] for p in probes] == ["Tensor", "Tensor"]
    assert probes[0]["base_rows_sum"] == pytest.approx(reference["probe"]["base_rows_sum"], rel=1e-6)
    assert "read them on the main process" in probes[1]["base_rows_error"]

    # One MLflow run; its loss per step and its final rows are the single process's.
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED" and run.data.params["train.distributed"] == "fsdp"
    assert_same_losses(losses_of(run.info.run_id), reference["losses"])
    out = tmp_path / "out"
    assert_same_rows(out, reference["out"])

    # The recording (rank 0) holds the same rows step by step.
    with recording.open(out / "recording") as got, recording.open(reference["out"] / "recording") as want:
        assert got.steps.tolist() == want.steps.tolist()
        torch.testing.assert_close(got["embeddings"][:].float(), want["embeddings"][:].float(), rtol=8e-3, atol=1e-6)

    # Complete checkpoints (both ranks' RNG states), mirrored once by Sentry; the trajectory page was drawn.
    for name in ("checkpoint-3", "checkpoint-6"):
        manifest = verify(out / name)
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"])
        assert (tmp_path / "mirrors" / run.info.run_id / name / MANIFEST).is_file()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "trajectory")}
    assert "trajectory/trajectory.html" in artifacts, artifacts

    # `wakelab export` gives the same model as from the single process.
    for folder in (out, reference["out"]):
        export = subprocess.run(
            [sys.executable, "-m", "wakelab", "export", str(folder), "--to", str(folder / "exported")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert export.returncode == 0, export.stderr[-3000:]
    got, want = (load_file(str(f / "exported" / "model.safetensors")) for f in (out, reference["out"]))
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    print(f"2-rank FSDP run: {seconds:.0f} s")


SIGTERM_RANK1_AT_3 = """
import os, signal
import wakelab

@wakelab.hookimpl
def on_step_end(state):
    if state.step == 3 and os.environ.get("RANK") == "1" and not os.path.exists("resumed"):
        os.kill(os.getpid(), signal.SIGTERM)
"""


@pytest.mark.parametrize("trainable", ["tokens", "full"])
def test_fsdp_resume_after_sigterm_continues_the_same_run(tiny_model, texts, tmp_path, reference, trainable):
    """``tokens``: the new rows and Adam's state whole in the checkpoint; ``full``: the sharded layers and their Adam
    state gathered whole into it, and scattered back on resume."""
    from wakelab.config import build_config
    from wakelab.run import engine

    want = reference
    if trainable == "full":  # its own single-process reference: every weight trains
        values = tiny_overrides(tiny_model, texts, **SINGLE, **{"train.trainable": "full", "output_dir": "single"})
        single = engine.run(build_config(None, None, {**values, "plugins": ["spherical"]}), progress=False)
        want = {"out": tmp_path / "single", "losses": losses_of(single.run_id)}
    (tmp_path / "stop.py").write_text(SIGTERM_RANK1_AT_3)
    values = tiny_overrides(tiny_model, texts, **FSDP, plugins=["spherical", str(tmp_path / "stop.py")])
    write_config_file(tmp_path / "fsdp.yaml", {**values, "train.trainable": trainable})
    proc, _ = torchrun(tmp_path, ["run", "--config", "fsdp.yaml", "--no-progress"])
    assert proc.returncode != 0
    assert proc.stderr.count("wakelab: stopped by SIGTERM after step 3") == 2, proc.stderr[-4000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (run,) = [r for r in runs if r.info.status != "FINISHED"]  # the single-process reference is FINISHED
    assert run.info.status == "KILLED"

    (tmp_path / "resumed").write_text("")
    proc, seconds = torchrun(tmp_path, ["resume", "out", "--no-progress"])
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    again = mlflow.MlflowClient().get_run(run.info.run_id)
    assert again.info.status == "FINISHED"
    assert_same_losses(losses_of(run.info.run_id), want["losses"])  # steps 1-3, then 4-6 after the resume
    assert_same_rows(tmp_path / "out", want["out"])
    if trainable == "full":  # the whole model, layers included, as the single process trained it
        folders = (tmp_path / "out", want["out"])
        got, expected = (load_file(str(f / "checkpoint-6" / "model.safetensors")) for f in folders)
        assert sorted(got) == sorted(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    print(f"2-rank FSDP resume ({trainable}): {seconds:.0f} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_on_loopback(tiny_model, texts, tmp_path, reference):
    """Two torchrun launchers, one process each, meeting through c10d rendezvous: what a two-node job runs."""
    values = tiny_overrides(tiny_model, texts, **FSDP, plugins=["spherical"])
    write_config_file(tmp_path / "fsdp.yaml", values)
    launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d"]
    launcher += ["--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "wakelab-two-nodes"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "wakelab"]
    command += ["run", "--config", "fsdp.yaml", "--no-progress"]
    nodes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED"
    assert_same_losses(losses_of(run.info.run_id), reference["losses"])
    assert_same_rows(tmp_path / "out", reference["out"])


def test_fsdp_with_a_4bit_base(tiny_model, texts, tmp_path):
    """A 4-bit nf4 base (bitsandbytes' CPU path) sharded the same way: each rank holds half the packed weights.

    The new rows are bf16 here (the 4-bit base's compute dtype): tolerance one bf16 step for them, 1e-4 relative for
    the loss."""
    from wakelab.config import build_config
    from wakelab.run import engine

    pytest.importorskip("bitsandbytes")
    common = {"model.load_in_4bit": True, "train.max_steps": 4, "train.logging_steps": 1, "plugins": ["spherical"]}
    single = engine.run(
        build_config(None, None, tiny_overrides(tiny_model, texts, **common, **{"train.batch_size": 4,
                                                                                "output_dir": "single"})),
        progress=False,
    )  # fmt: skip
    values = tiny_overrides(tiny_model, texts, **common, **{"train.batch_size": 2, "train.distributed": "fsdp"})
    write_config_file(tmp_path / "fsdp.yaml", values)
    proc, seconds = torchrun(tmp_path, ["run", "--config", "fsdp.yaml", "--no-progress"])
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    assert "FSDP2: 2 decoder layers" in proc.stderr
    sharded = next(r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                   if r.info.run_id != single.run_id)  # fmt: skip
    want = losses_of(single.run_id)
    got = losses_of(sharded.info.run_id)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got[step], want[step])
    rows = [load_file(str(tmp_path / d / "final" / "new_rows.safetensors"))["rows"] for d in ("out", "single")]
    assert rows[0].dtype == torch.bfloat16
    torch.testing.assert_close(rows[0].float(), rows[1].float(), rtol=8e-3, atol=1e-3)
    print(f"2-rank FSDP, 4-bit base: {seconds:.0f} s")


RANK1_FAILS = """
import os
if os.environ.get("RANK") == "1":
    raise RuntimeError("the dataset disk is not mounted on this node")
import wakelab
"""


def test_fsdp_rank_failing_at_start_up_is_every_ranks_line(tiny_model, texts, tmp_path):
    (tmp_path / "rank_plugin.py").write_text(RANK1_FAILS)
    values = tiny_overrides(tiny_model, texts, **FSDP, plugins=[str(tmp_path / "rank_plugin.py")])
    write_config_file(tmp_path / "fsdp.yaml", values)
    proc, seconds = torchrun(tmp_path, ["run", "--config", "fsdp.yaml", "--no-progress"])
    assert proc.returncode != 0
    line = (
        f"wakelab: error: plugin file {tmp_path / 'rank_plugin.py'} failed to import: RuntimeError: the dataset "
        "disk is not mounted on this node"
    )
    assert proc.stderr.count(line) == 2, proc.stderr[-4000:]
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert seconds < 120, seconds
