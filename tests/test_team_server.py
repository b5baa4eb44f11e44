"""A team tracking server: MLflow with a PostgreSQL backend store and a separate artifact root, on loopback.

The test starts a private PostgreSQL cluster (Debian's `postgresql` package; as root it runs the server as the
`postgres` user, which PostgreSQL requires) and `mlflow server` on it (psycopg2-binary from PyPI), then checks that
two concurrent `wakelab run`s into one experiment lose nothing, that an unreachable server stops a run before any
training with a message naming the URI, and that a server that goes away mid-run costs neither the training nor
the record of what was not logged (sent later by `wakelab sync`), and that a database restart mid-run costs
nothing. Without PostgreSQL it is skipped, except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_overrides, write_config_file

pytestmark = pytest.mark.slow

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERVER_START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _need(condition: bool, what: str) -> None:
    if condition:
        return
    message = f"team-server test needs {what}; `bash scripts/ci-system-deps.sh` installs it"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


class Postgres:
    """A throw-away cluster in a temp folder, on 127.0.0.1 only, trusting local connections (a test fixture)."""

    def __init__(self):
        self.bin = _postgres_bin()
        _need(self.bin is not None, "PostgreSQL (apt-get install postgresql)")
        # PostgreSQL refuses to run as root: run it as the `postgres` user, in a folder that user owns.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            _need(shutil.which("runuser") is not None, "runuser (util-linux)")
        self.dir = Path(tempfile.mkdtemp(prefix="wakelab-pg-"))
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self.data = self.dir / "data"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "wakelab", "-E", "UTF8", "--no-sync"
        )
        self.up()
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "wakelab", "mlflow")
        return f"postgresql+psycopg2://wakelab@127.0.0.1:{self.port}/mlflow"

    def up(self) -> None:
        options = f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "postgres.log"),
            "-w",
            "-o",
            options,
            "start",
        )

    def down(self) -> None:
        """The database goes away (its data stays): every open connection is cut."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    """`mlflow server` with one worker, in its own process group (so a kill takes its workers too)."""

    def __init__(self, backend_uri: str, artifacts: Path, log: Path):
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "mlflow server exited:\n" + self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError("mlflow server did not answer:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        """Gone at once, as when its machine dies: SIGKILL to the whole group."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        _wait_closed(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # any worker left behind
        except (ProcessLookupError, AttributeError):
            pass


def _wait_closed(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _need(False, "psycopg2-binary (pip install -e '.[test]')")
    pg = Postgres()
    folder = tmp_path_factory.mktemp("team-server")
    server = None
    try:
        backend = pg.start()
        server = MlflowServer(backend, folder / "artifact-root", folder / "mlflow-server.log")
        server.start()
        server.database = pg
        yield server
    finally:
        if server is not None:
            server.stop()
        pg.stop()


def write_config(tmp_path: Path, tiny_model, texts, name: str, **extra) -> Path:
    values = tiny_overrides(
        tiny_model,
        texts,
        **{"tracking.experiment": "team", "output_dir": f"out-{name}", "tracking.run_name": name, **extra},
    )
    return write_config_file(tmp_path / f"{name}.yaml", values)


def wakelab_run(tmp_path: Path, uri: str, config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "wakelab", "run", "--config", str(config), "--no-progress", *extra],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_concurrent_runs_into_one_experiment_lose_nothing(team, tiny_model, texts, tmp_path):
    from mlflow import MlflowClient

    from wakelab.config import build_config

    started = time.monotonic()
    configs = {name: write_config(tmp_path, tiny_model, texts, name) for name in ("a", "b")}
    procs = {name: wakelab_run(tmp_path, team.url, path) for name, path in configs.items()}
    outputs = {name: proc.communicate(timeout=RUN_TIMEOUT_S) for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, outputs[name][1][-4000:])
    seconds = time.monotonic() - started

    client = MlflowClient(team.url)
    experiment = client.get_experiment_by_name("team")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["a", "b"]
    expected_params = set(build_config(None, configs["a"], []).flat())
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert expected_params <= set(run.data.params), expected_params - set(run.data.params)
        assert {"added_tokens", "vocab_size", "plugins.active", "version.mlflow"} <= set(run.data.params)
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [2, 4, 6]
        for key in (
            "lr",
            "grad_norm",
            "new_row_norm",
            "heldout_perplexity_before",
            "heldout_perplexity_after",
            "train_seconds",
            "corpus_new_token_share",
        ):
            assert key in run.data.metrics, (name, key)
        # Every artifact, byte for byte, in the server's artifact root (not in this folder).
        local = tmp_path / f"out-{name}"
        for artifact, path in (
            ("config.yaml", local / "config.yaml"),
            ("vocab_report.json", local / "vocab_report.json"),
            ("final/new_rows.safetensors", local / "final" / "new_rows.safetensors"),
        ):
            fetched = Path(client.download_artifacts(run.info.run_id, artifact, str(tmp_path / f"dl-{name}")))
            assert fetched.read_bytes() == path.read_bytes(), (name, artifact)
        tokenizer_files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, "final/tokenizer")}
        assert tokenizer_files == {p.name for p in (local / "final" / "tokenizer").iterdir()}
        assert any(team.artifacts.rglob(f"*{run.info.run_id}*")), "artifacts are not in the server's artifact root"
    assert sorted(runs["a"].data.params) == sorted(runs["b"].data.params)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
    print(f"two concurrent runs on the team server: {seconds:.0f} s")


def test_unreachable_server_fails_fast_naming_the_uri(tiny_model, texts, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wakelab.cli.main import main
    from wakelab.tracking import runs as tracking

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    import mlflow

    mlflow.set_tracking_uri(dead)
    started = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=f"cannot reach the MLflow tracking store at {dead}"):
        tracking.check_reachable()
    assert time.monotonic() - started < 10, "check_reachable must answer quickly"

    config = write_config(tmp_path, tiny_model, texts, "dead")
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert f"cannot reach the MLflow tracking store at {dead}" in result.output
    assert "loading base model" not in result.output  # stopped before any training
    assert not (tmp_path / "out-dead" / "wakelab_run.json").exists()


GATE_PLUGIN = '''
"""Stops at step 3 until the test has killed the tracking server."""
import time
from pathlib import Path

import wakelab


@wakelab.hookimpl
def on_step_end(state):
    if state.step == 3:
        Path("at-step-3").write_text("")
        deadline = time.monotonic() + 300
        while not Path("server-gone").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
'''


def test_server_gone_mid_run_training_finishes_and_says_what_was_not_logged(team, tiny_model, texts, tmp_path):
    from mlflow import MlflowClient

    gate = tmp_path / "gate.py"
    gate.write_text(GATE_PLUGIN)
    config = write_config(tmp_path, tiny_model, texts, "gone")
    proc = wakelab_run(tmp_path, team.url, config, "--plugin", str(gate))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (tmp_path / "at-step-3").exists():
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.2)
    run_id = json.loads((tmp_path / "out-gone" / "wakelab_run.json").read_text())["run_id"]
    team.kill()
    killed = time.monotonic()
    (tmp_path / "server-gone").write_text("")
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    after_kill = time.monotonic() - killed

    # The run finished locally, said clearly what could not be logged, and did not hang on the dead server.
    assert proc.returncode == 3, (stdout[-2000:], stderr[-4000:])
    assert after_kill < 120, f"the run took {after_kill:.0f} s to end after the server went away"
    assert f"cannot reach the MLflow tracking store at {team.url}" in stderr  # the warning when it happened
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("wakelab: error: ") and "stopped answering" in last and "not logged" in last, last
    assert "metric values" in last and "the final status FINISHED" in last and "out-gone" in last, last
    out = tmp_path / "out-gone"
    assert (out / "final" / "new_rows.safetensors").is_file() and (out / "final" / "tokenizer").is_dir()
    unlogged = json.loads((out / "mlflow_unlogged.json").read_text())
    assert unlogged["run_id"] == run_id and unlogged["status"] == "FINISHED"
    assert {a["path"].rsplit("/", 1)[-1] for a in unlogged["artifacts"]} >= {"new_rows.safetensors", "tokenizer"}

    # Back up (same database, same artifact root): what was logged before is all there, and with what was kept
    # locally no metric is missing.
    team.start()
    client = MlflowClient(team.url)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # its end could not be recorded; the message says so
    assert {"train.lr", "added_tokens", "vocab_size", "plugins.active"} <= set(run.data.params)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "vocab_report.json"}
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    kept = {m["step"] for m in unlogged["metrics"] if m["key"] == "loss"}
    assert logged | kept == {2, 4, 6}, (logged, kept)
    assert 6 in kept  # logged after the server went away

    # `wakelab sync` (docs/tracking.md) sends what was kept: then the run is whole, and FINISHED; a second sync
    # sends nothing twice.
    for _ in range(2):
        synced = subprocess.run(
            [sys.executable, "-m", "wakelab", "sync", str(out)], capture_output=True, text=True, timeout=300
        )
        assert synced.returncode == 0, synced.stderr[-3000:]
    assert "nothing to sync" in synced.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [2, 4, 6]
    assert {a.path for a in client.list_artifacts(run_id, "final")} >= {"final/new_rows.safetensors", "final/tokenizer"}
    print(f"server gone mid-run: the run ended {after_kill:.0f} s after the kill; it said:")
    print("\n".join(line for line in stderr.splitlines() if line.startswith("wakelab: ")))


RESTART_GATE = '''
"""Holds the run while the database is down: at step 3 until it is down (and long enough for the next metrics to be
sent while it is), at step 5 until it is back."""
import time
from pathlib import Path

import wakelab


def _wait(name):
    deadline = time.monotonic() + 300
    while not Path(name).exists() and time.monotonic() < deadline:
        time.sleep(0.1)


@wakelab.hookimpl
def on_step_end(state):
    if state.step == 3:
        Path("at-step-3").write_text("")
        _wait("db-down")
        time.sleep(11)  # past the tracker's 10 s batching: step 4's metrics are sent while the database is down
    if state.step == 5:
        Path("at-step-5").write_text("")
        _wait("db-up")
'''


def test_database_restart_mid_run_finishes_with_every_metric_once(team, tiny_model, texts, tmp_path):
    from mlflow import MlflowClient

    gate = tmp_path / "restart_gate.py"
    gate.write_text(RESTART_GATE)
    config = write_config(tmp_path, tiny_model, texts, "restart", **{"train.logging_steps": 1})
    proc = wakelab_run(tmp_path, team.url, config, "--plugin", str(gate))
    for marker, action in (("at-step-3", team.database.down), ("at-step-5", team.database.up)):
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (tmp_path / marker).exists():
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, f"the run never reached {marker}"
            time.sleep(0.2)
        action()
        (tmp_path / ("db-down" if marker == "at-step-3" else "db-up")).write_text("")
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)

    assert proc.returncode == 0, (stdout[-2000:], stderr[-4000:])
    assert "while logging" in stderr and "answers again" in stderr, stderr[-4000:]  # a send failed, then went out
    run_id = json.loads((tmp_path / "out-restart" / "wakelab_run.json").read_text())["run_id"]
    client = MlflowClient(team.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "lr", "grad_norm"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3, 4, 5, 6], key
    assert not (tmp_path / "out-restart" / "mlflow_unlogged.json").exists()
    print("database restart mid-run: " + "; ".join(line for line in stderr.splitlines() if "MLflow" in line))
