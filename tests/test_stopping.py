"""Stop signals (SIGTERM, SIGINT, SIGHUP), sent for real to this process: the step in flight finishes, a checkpoint is
written, the run ends KILLED with tags, and resuming continues bit-exactly; a second signal stops at once. Plus the
honest-metrics rule: the last step is always logged, and Trainer's end-of-training summary too."""

from __future__ import annotations

import os
import signal
import time

import mlflow
import numpy as np
import pytest
from conftest import tiny_overrides
from safetensors.numpy import load_file

from wakelab.config import build_config
from wakelab.run import engine, stopping
from wakelab.run.stopping import GracefulStop, Stopped
from wakelab.storage.checkpoints import list_checkpoints, verify


def deliver(signum: int) -> None:
    """Send ``signum`` to this process and give Python the moment it needs to run the handler."""
    os.kill(os.getpid(), signum)
    for _ in range(100):
        time.sleep(0.01)


@pytest.fixture
def stop():
    state = GracefulStop()
    state.install()
    yield state
    state.restore()


def test_first_signal_in_training_waits_for_the_step_and_a_second_stops_at_once(stop, tmp_path):
    stop.start_training(tmp_path)
    deliver(signal.SIGTERM)  # no exception: the step in flight goes on
    assert stop.signum == signal.SIGTERM and stop.agreed_signal() == signal.SIGTERM
    with pytest.raises(Stopped, match="stopped at once by a second signal \\(SIGHUP\\)") as info:
        deliver(signal.SIGHUP)
    assert info.value.exit_code == 128 + signal.SIGHUP
    assert isinstance(info.value, KeyboardInterrupt)  # what already closes runs KILLED


def test_signal_outside_training_stops_at_once(stop):
    with pytest.raises(Stopped, match="stopped by SIGINT; the MLflow run is marked KILLED") as info:
        deliver(signal.SIGINT)
    assert info.value.exit_code == 130


def test_signal_while_closing_is_ignored_and_the_run_is_tagged(stop, tmp_path):
    stop.start_training(tmp_path)
    deliver(signal.SIGTERM)
    stop.stopped_at = 4
    with pytest.raises(Stopped, match="after step 4"):
        stop.raise_if_requested()
    tags: dict[str, str] = {}
    stop.closing(tags.update)
    deliver(signal.SIGTERM)  # no exception: the MLflow run is being closed
    assert tags == {stopping.SIGNAL_TAG: "SIGTERM", stopping.STEP_TAG: "4"}


def test_signal_while_a_finished_run_closes_says_it_closes_finished(stop, tmp_path, capfd):
    stop.start_training(tmp_path)
    stop.raise_if_requested()  # training ended with no signal: the run finishes
    stop.closing(status="FINISHED")
    deliver(signal.SIGTERM)  # no exception: ignored while closing
    said = capfd.readouterr().err
    assert "SIGTERM received while the MLflow run is being closed: ignored; it closes FINISHED" in said
    assert "KILLED" not in said


def test_after_the_last_step_the_first_signal_lets_the_run_finish(stop, tmp_path):
    stop.start_training(tmp_path)
    stop.raise_if_requested()  # training returned with no signal: the run finishes its last work
    deliver(signal.SIGTERM)  # no exception: final rows and held-out perplexity go on
    assert stop.signum == signal.SIGTERM
    tags: dict[str, str] = {}
    stop.closing(tags.update)
    assert tags == {}  # the run finished: no stop tags
    stop.phase = "finishing"
    with pytest.raises(Stopped, match="second signal"):
        deliver(signal.SIGTERM)


def test_handlers_are_restored_after_the_run():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    @stopping.handles_signals
    def job():
        seen.append(signal.getsignal(signal.SIGTERM))

    job()
    assert seen[0] != before and callable(seen[0])
    assert signal.getsignal(signal.SIGTERM) == before


def plugin(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.py"
    path.write_text("import os, signal, time\nimport wakelab\n" + body)
    return path


SIGTERM_AT_3 = """
@wakelab.hookimpl
def on_step_end(state):
    if state.step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
"""


def rows(output_dir) -> np.ndarray:
    return load_file(str(output_dir / "final" / "new_rows.safetensors"))["rows"]


def test_sigterm_mid_run_checkpoints_mirrors_ends_killed_and_resumes_bit_exactly(tiny_model, texts, tmp_path):
    term = plugin(tmp_path, "term_at_3", SIGTERM_AT_3)
    mirrors = tmp_path / "mirrors"
    # save_steps beyond max_steps: no scheduled checkpoint, so the one found is the stop's (sentry needs save_steps).
    values = {"train.max_steps": 6, "train.save_steps": 100, "sentry.target": str(mirrors), "train.logging_steps": 5}
    config = build_config(None, None, {**tiny_overrides(tiny_model, texts, **values), "plugins": ["sentry", str(term)]})
    with pytest.raises(
        Stopped,
        match=r"stopped by SIGTERM after step 3; the MLflow run is marked KILLED; checkpoint "
        r"out/checkpoint-3 is complete; continue with: wakelab resume out",
    ) as info:
        engine.run(config, progress=False)
    assert info.value.exit_code == 143

    out = tmp_path / "out"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert verify(out / "checkpoint-3")["step"] == 3
    assert not (out / "final").exists()
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED"
    assert run.data.tags[stopping.SIGNAL_TAG] == "SIGTERM" and run.data.tags[stopping.STEP_TAG] == "3"
    assert run.data.tags[stopping.CHECKPOINT_TAG] == str((out / "checkpoint-3").resolve())
    assert (mirrors / run.info.run_id / "checkpoint-3" / "manifest.json").is_file()  # on_save ran: Sentry mirrored it
    # The stop step's loss was logged, though logging_steps is 5.
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")] == [3]

    plain = {k: v for k, v in values.items() if k != "sentry.target"}  # the resume and reference need no mirror
    resumed = engine.run(
        build_config(None, None, tiny_overrides(tiny_model, texts, **plain)),
        progress=False,
        resume_from=str(out / "checkpoint-3"),
    )
    assert resumed.status == "FINISHED" and resumed.run_id == run.info.run_id
    metrics = mlflow.get_run(run.info.run_id).data.metrics  # the run's record is whole after the stop
    assert {"heldout_perplexity_before", "heldout_perplexity_after", "train_runtime"} <= set(metrics)
    reference = engine.run(
        build_config(None, None, tiny_overrides(tiny_model, texts, **plain, output_dir="ref")), progress=False
    )
    assert reference.status == "FINISHED"
    assert np.array_equal(rows(out).view(np.uint8), rows(tmp_path / "ref").view(np.uint8))


def test_second_signal_during_the_graceful_stop_ends_killed_at_once(tiny_model, texts, tmp_path):
    twice = plugin(
        tmp_path,
        "term_twice",
        SIGTERM_AT_3
        + """
@wakelab.hookimpl
def on_save(ctx):
    os.kill(os.getpid(), signal.SIGTERM)  # the second signal, while the stop's checkpoint is being mirrored
    time.sleep(60)
""",
    )
    config = build_config(
        None, None, {**tiny_overrides(tiny_model, texts, **{"train.max_steps": 6}), "plugins": [str(twice)]}
    )
    started = time.monotonic()
    with pytest.raises(Stopped, match=r"stopped at once by a second signal \(SIGTERM\)") as info:
        engine.run(config, progress=False)
    assert time.monotonic() - started < 50  # the plugin's 60 s sleep was cut short
    assert info.value.exit_code == 143
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED" and run.data.tags[stopping.SIGNAL_TAG] == "SIGTERM"
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-3"]


def test_last_step_and_trainer_summary_are_logged(tiny_model, texts):
    config = build_config(
        None, None, tiny_overrides(tiny_model, texts, **{"train.max_steps": 6, "train.logging_steps": 5})
    )
    result = engine.run(config, progress=False)
    client = mlflow.MlflowClient()
    for key in ("loss", "lr", "grad_norm"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [5, 6], key
    metrics = client.get_run(result.run_id).data.metrics
    for key in ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second"):
        assert key in metrics, sorted(metrics)
    assert metrics["train_runtime"] > 0 and np.isfinite(metrics["train_loss"])
