"""Named moments inside wakelab's crash-safe writes, where the SIGKILL tests stop a process on purpose.

A kill at a random time rarely lands inside a write that takes milliseconds, and nothing would say where it landed.
With ``WAKELAB_CRASH_AT=NAME[:N]`` set, the N-th time (default: the first) this process reaches the crash point
``NAME``, it writes ``NAME:N`` to the file named by ``WAKELAB_CRASH_MARKER`` and waits there; the test sees the marker
and sends SIGKILL, so it knows the exact moment the process died. Without a marker file to write it kills itself.
Outside the tests the variable is unset and a crash point costs one environment lookup.
Each point is also a place where ``WAKELAB_FAULT_AT`` injects a full disk or an I/O error
(:mod:`wakelab.storage.writepoint`).

The points, in the order a checkpoint passes them (``trainer`` and ``checkpoints``):
``rows-written`` (Trainer is writing the staged checkpoint), ``manifest-tmp`` (every file written, the manifest
not yet renamed in), ``staged`` (complete with manifest, not yet published), ``publish-aside`` (an existing folder of
the same name renamed aside, the new one not yet in), ``published`` (in place, older ones not yet rotated),
``remove-aside`` (a checkpoint to delete renamed aside, not yet deleted); and for a mirror (``sentry``):
``mirror-copying`` (half copied), ``mirror-published`` (in place, older mirrors not yet pruned).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from . import writepoint

ENV_AT = "WAKELAB_CRASH_AT"
ENV_MARKER = "WAKELAB_CRASH_MARKER"
WAIT_S = 300  # a test that forgot to kill the process: give up, exit with a status no run ever has

_reached: dict[str, int] = {}


def reached(name: str) -> None:
    """Stop here if the test asked for this point (see the module docstring); otherwise do nothing."""
    writepoint.maybe_fail(name)
    if not writepoint.arrived(ENV_AT, name, _reached):
        return
    marker = os.environ.get(ENV_MARKER)
    if not marker:
        os.kill(os.getpid(), signal.SIGKILL)
    tmp = Path(f"{marker}.tmp{os.getpid()}")
    tmp.write_text(f"{name}:{_reached[name]}")
    os.replace(tmp, marker)
    time.sleep(WAIT_S)
    os._exit(97)
