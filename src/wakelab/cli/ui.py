"""``wakelab ui``: the MLflow UI for the store ``wakelab run`` writes to, started lean and on loopback.

The store is ``MLFLOW_TRACKING_URI`` when it is set, else MLflow 3's default, ``sqlite:///mlflow.db`` in the working
directory (the one ``wakelab run`` used there). The server runs with one worker (MLflow's default four take about
1.5 GB), listens on 127.0.0.1 unless ``--host`` says otherwise, and once it answers the command prints the URL of the
training-runs view of the most recent wakelab experiment (MLflow 3 opens on its GenAI view otherwise). When the
tracking URI already names a server, there is nothing to start: the command prints that server's URL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import click

from ..errors import WakelabError
from ..logs import warn
from ..tracking.runs import ui_page

LOOPBACK = ("127.0.0.1", "localhost", "::1")
READY_TIMEOUT_S = 120


def store_uri() -> str:
    """The store ``wakelab run`` writes to from this directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def latest_wakelab_experiment(uri: str) -> str | None:
    """The experiment of the most recent run that wakelab made (tag ``wakelab.version``), or None."""
    from ..tracking.runs import mlflow_client

    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        return None  # no store yet: do not create one just to look
    client = mlflow_client(uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    if not experiment_ids:
        return None
    runs = client.search_runs(
        experiment_ids,
        filter_string="tags.`wakelab.version` ILIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.experiment_id if runs else None


def runs_view_url(base: str, experiment_id: str | None) -> str:
    base = base.rstrip("/")
    return f"{base}/{ui_page(experiment_id)}" if experiment_id else f"{base}/"


def check_port_free(host: str, port: int) -> None:
    """One clear line, before starting anything, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise WakelabError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another MLflow UI running there? "
                "Choose another port with --port"
            ) from None


def wait_until_ready(url: str, proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WakelabError(
                f"the MLflow server exited with status {proc.returncode} before it answered; see its messages above"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise WakelabError(f"the MLflow server did not answer at {url} within {timeout:.0f} s")


@click.command("ui", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on. Only loopback by default; --host 0.0.0.0 opens it to the network.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="Port to listen on.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Server worker processes (each takes a few hundred MB).",
)
@click.option(
    "--backend-store-uri",
    default=None,
    metavar="URI",
    help="The store to show (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).",
)
def ui(host: str, port: int, workers: int, backend_store_uri: str | None) -> None:
    """Start the MLflow UI for the runs `wakelab run` tracked here, and print the runs view's URL.

    The store is MLFLOW_TRACKING_URI when set, else sqlite:///mlflow.db in this directory. The server listens on
    127.0.0.1 only, unless --host says otherwise. Ctrl-C stops it.

    \b
    Example:
      wakelab run && wakelab ui                   # then open the printed URL
      wakelab ui --port 5001                      # another port
      wakelab ui --host 0.0.0.0                   # reachable from other machines: only on a trusted network
    """
    uri = backend_store_uri or store_uri()
    if is_server_uri(uri):
        # A tracking server already serves the UI: nothing to start.
        click.echo(f"runs are tracked on the MLflow server {uri}; its UI is already there:")
        click.echo(f"  {runs_view_url(uri, _quiet_latest(uri))}")
        return
    check_port_free(host, port)
    experiment_id = _quiet_latest(uri)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if host not in LOOPBACK:
        warn(f"listening on {host}: anyone who can reach this machine on port {port} can read and change these runs")
    click.echo(f"starting the MLflow UI for {uri} (one moment) ...", err=True)
    # Its own process group, so stopping it stops uvicorn's worker with it; no GenAI job runner (a dozen processes).
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    local = f"http://{shown}:{port}"
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the server too, as Ctrl-C does
    try:
        wait_until_ready(local, proc)
        click.echo(f"MLflow UI: {runs_view_url(local, experiment_id)}")
        if experiment_id is None:
            click.echo("  (no wakelab runs in this store yet: `wakelab run` here, then reload)")
        click.echo("  Ctrl-C to stop", err=True)
        sys.stdout.flush()
        code = proc.wait()
    except KeyboardInterrupt:
        return
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(proc)
    if code != 0:
        raise WakelabError(f"the MLflow server stopped by itself with status {code}; see its messages above")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _quiet_latest(uri: str) -> str | None:
    from ..tracking.runs import quiet_retries

    try:
        with quiet_retries():
            return latest_wakelab_experiment(uri)
    except Exception:  # noqa: BLE001 - the URL without an experiment is still useful
        return None


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group: politely, then for good."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; its workers may still be shutting down.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
