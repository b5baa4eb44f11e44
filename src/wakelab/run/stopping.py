"""Stopping a run the way schedulers ask: SIGTERM, SIGINT or SIGHUP, then a grace period, then SIGKILL.

Slurm, Kubernetes, Docker and systemd stop a job with SIGTERM and kill it a grace period later; a terminal sends
SIGINT (Ctrl-C) or SIGHUP. Python's defaults for these either end the process on the spot (the MLflow run then stays
RUNNING for ever and every step since the last checkpoint is lost) or raise ``KeyboardInterrupt`` wherever the main
thread happens to be. Here, while Trainer trains, the first such signal only raises a flag: the optimizer step in
flight finishes, :class:`StopCallback` asks Trainer for a checkpoint (its ordinary, complete-or-absent one, so
``on_save`` plugins such as Sentry mirror it) and for the end of training, and the run ends KILLED with tags naming
the signal and the checkpoint; the process exits with 128 + the signal number, as a shell reports a killed job.
A second signal stops at once (still KILLED). Before training (loading, pre-flight) there is nothing worth waiting
for, so a signal stops at once. After the last step (final rows, held-out perplexity) the first signal lets the run
finish, since it is complete but for that; a second stops at once. While the MLflow run is being closed a signal is
noted and ignored, so the run is never left RUNNING.

Under torchrun every rank gets the signal, not necessarily in the same step: the flag is all-reduced at each step's
end, so every rank stops after the same step and one checkpoint is written.

:func:`handles_signals` wraps an entry point (``engine.run``, ``run_sweep``); the innermost one active receives the
signals (a sweep's child run handles them while it trains, the sweep between children).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..logs import is_main_process

#: The signals that mean "please stop": schedulers and containers (TERM), a terminal (INT, HUP).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Tags on the MLflow run of a stopped run.
SIGNAL_TAG = "wakelab.stop.signal"
STEP_TAG = "wakelab.stop.step"
CHECKPOINT_TAG = "wakelab.stop.checkpoint"


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal: MLflow status KILLED (as for Ctrl-C), exit status 128 + signal number.

    A ``KeyboardInterrupt`` so that everything that already closes runs KILLED on Ctrl-C treats it alike.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class GracefulStop:
    """The signal state of one run (or sweep): which phase it is in, and the first signal received.

    Phases: ``setup`` (a signal stops at once), ``training`` (the first signal is deferred to the step's end),
    ``finishing`` (after the last step: the first signal lets the run finish), ``closing`` (signals are ignored
    while the MLflow run is closed).
    """

    def __init__(self):
        self.phase = "setup"
        self.signum: int | None = None
        self.stopped_at: int | None = None  # the step after which training stopped
        self.stopped = False  # a Stopped was raised: the run ends KILLED
        self.output_dir: Path | None = None
        self.closing_as: str | None = None  # the status the run closes as, once closing (said if a signal comes)
        self._previous: dict[int, Any] = {}

    # -- installing ------------------------------------------------------------------------------------------
    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread can handle signals; a run in a worker thread keeps Python's defaults
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    # -- the handler -----------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame) -> None:
        name = signal_name(signum)
        if self.phase == "closing":
            ending = f"; it closes {self.closing_as}" if self.closing_as else ""
            _say(f"{name} received while the MLflow run is being closed: ignored{ending}")
            self.signum = self.signum or signum
            return
        if self.phase in ("training", "finishing") and self.signum is None:
            self.signum = signum
            if self.phase == "training":
                _say(
                    f"{name} received: stopping after the current step with a checkpoint; send it again to stop at once"
                )
            else:
                _say(
                    f"{name} received after the last step: finishing the run first (final rows, held-out "
                    "perplexity); send it again to stop at once"
                )
            return
        first = self.signum
        self.signum = first or signum
        if first is not None:
            raise self._stopped(signum, f"stopped at once by a second signal ({name})")
        raise self._stopped(signum, f"stopped by {name}")

    # -- the run's side ----------------------------------------------------------------------------------------
    def start_training(self, output_dir: Path | None = None) -> None:
        if output_dir is not None:
            self.output_dir = output_dir
        if self.phase == "setup":
            self.phase = "training"

    def raise_if_requested(self) -> None:
        """After Trainer returned: if a signal stopped training, end the run KILLED (the checkpoint is written).

        A signal that came after the last step's end stopped nothing: the run goes on to finish."""
        if self.signum is not None and self.stopped_at is not None:
            self.phase = "setup"
            raise self._stopped(self.signum, f"stopped by {signal_name(self.signum)} after step {self.stopped_at}")
        self.phase = "finishing"

    def raise_if_signalled(self, what: str) -> None:
        """Between units of work (a sweep's children): stop now if a signal came during the last one."""
        if self.signum is not None:
            self.stopped = True
            raise Stopped(self.signum, f"stopped by {signal_name(self.signum)} {what}")

    def closing(self, set_tags: Callable[[dict[str, str]], None] | None = None, status: str | None = None) -> None:
        """The MLflow run is being closed: ignore further signals; tag the run with the signal that stopped it.

        ``status``: what the run closes as (a signal now changes nothing, and its message says so)."""
        self.phase = "closing"
        self.closing_as = status or ("KILLED" if self.stopped else None)
        if not self.stopped or set_tags is None:
            return
        tags = {SIGNAL_TAG: signal_name(self.signum)}
        if self.stopped_at is not None:
            tags[STEP_TAG] = str(self.stopped_at)
        checkpoint = self.latest_checkpoint()
        if checkpoint is not None:
            tags[CHECKPOINT_TAG] = str(checkpoint.resolve())
        try:
            set_tags(tags)
        except Exception:  # noqa: BLE001 - a tag must not keep the run from closing
            pass

    def latest_checkpoint(self) -> Path | None:
        if self.output_dir is None:
            return None
        from ..storage.checkpoints import list_checkpoints

        found = list_checkpoints(self.output_dir)
        return found[-1] if found else None

    def _stopped(self, signum: int, what: str) -> Stopped:
        """The exception that ends the run KILLED, its message saying how to go on."""
        self.stopped = True
        return Stopped(signum, what + self._resume_text())

    def _resume_text(self) -> str:
        text = "; the MLflow run is marked KILLED"
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            return f"{text}; no checkpoint was written, so it cannot be resumed"
        return f"{text}; checkpoint {checkpoint} is complete; continue with: wakelab resume {self.output_dir}"

    # -- several processes ---------------------------------------------------------------------------------------
    def agreed_signal(self) -> int:
        """The signal any rank received (0: none); a collective under torchrun, so every rank stops at one step."""
        import torch

        local = self.signum or 0
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return local
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([local], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed and self.signum is None:
            self.signum = agreed  # another rank got it first: this rank stops at the same step
        return agreed


_active: list[GracefulStop] = []


def current() -> GracefulStop:
    """The innermost active stop state (a fresh, uninstalled one outside any :func:`handles_signals`)."""
    return _active[-1] if _active else GracefulStop()


def handles_signals(fn):
    """Run ``fn`` with the stop signals handled as this module describes; the previous handlers come back after."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stop = GracefulStop()
        stop.install()
        _active.append(stop)
        try:
            result = fn(*args, **kwargs)
        finally:
            _active.remove(stop)
            stop.restore()
        if stop.signum is not None and _active:
            # A signal let this run finish (it came after its last step); the caller (a sweep) still has to stop.
            _active[-1].signum = _active[-1].signum or stop.signum
        return result

    return wrapper


class StopCallback(TrainerCallback):
    """At each step's end: if a stop signal came (on any rank), checkpoint now and end training after this step."""

    def __init__(self, stop: GracefulStop, output_dir: Path):
        self.stop = stop
        self.output_dir = output_dir

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.start_training(self.output_dir)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.agreed_signal():
            self.stop.stopped_at = state.global_step
            control.should_save = True  # Trainer saves when asked, whatever train.save_steps says
            control.should_log = True
            control.should_training_stop = True


def _say(message: str) -> None:
    """From a signal handler: one write, no buffered print (which a signal can interrupt mid-call)."""
    if not is_main_process():
        return
    try:
        os.write(2, f"\nwakelab: {message}\n".encode())
    except OSError:
        pass
