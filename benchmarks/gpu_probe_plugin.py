"""A measuring plugin for ``gpu_check.py`` (``--plugin benchmarks/gpu_probe_plugin.py``): steps/s after the first
step, the device, and the peak GPU memory, written as JSON to the file ``WAKELAB_GPU_PROBE`` names at the run's end.

It uses only the public API (hooks), as any outside plugin would, so it measures a plain ``wakelab run``.
"""

from __future__ import annotations

import json
import os
import time

import torch

import wakelab

_times: list[float] = []


@wakelab.hookimpl
def on_run_start(run):
    _times.clear()
    _times.append(time.perf_counter())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@wakelab.hookimpl
def on_step_end(state):
    _sync()
    _times.append(time.perf_counter())


@wakelab.hookimpl
def on_run_end(run, status):
    path = os.environ.get("WAKELAB_GPU_PROBE")
    if not path or len(_times) < 3:
        return
    timed = _times[2:]  # from the end of step 1: the first step pays for warm-up
    cuda = torch.cuda.is_available()
    device = next(run.model.parameters()).device
    stats = {
        "status": status,
        "steps": len(_times) - 1,
        "steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else (1 / (timed[0] - _times[1])),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stats, f)
