"""A plugin that shows what a run's memory is made of: ``p1_cli.py --probe benchmarks/memprobe_plugin.py``.

At run start, at each step's end and at run end it prints (to stderr) the process's RSS, its peak since the last
print (``VmHWM``, reset after each print), anonymous memory against mapped file pages, and every live tensor storage
of 40 MiB or more with its shape, dtype and kind. A step's end is seen before the hook bridge lets go of the step's
gradient, so the gradient is listed there. With ``P1_RSS_PROFILE=<folder>`` the benchmark keeps the whole output.
"""

from __future__ import annotations

import gc
import sys
import warnings

import torch

import wakelab

LIMIT_MIB = 40


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) // 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _big_tensors() -> list[tuple[float, tuple, str, str, bool]]:
    seen: dict[int, tuple[float, tuple, str, str, bool]] = {}
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # meta or sparse tensors
            continue
        size = storage.nbytes() / 2**20
        if size >= LIMIT_MIB and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (size, tuple(obj.shape), str(obj.dtype), type(obj).__name__, obj.requires_grad)
    return sorted(seen.values(), reverse=True)


def _report(where: str) -> None:
    print(f"[memprobe] {where}: {_status()} (MiB)", file=sys.stderr, flush=True)
    for size, shape, dtype, kind, grad in _big_tensors():
        print(f"[memprobe]   {size:8.0f} MiB {shape} {dtype} {kind} requires_grad={grad}", file=sys.stderr, flush=True)
    _reset_peak()


@wakelab.hookimpl
def on_run_start(run):
    _report("run start (peak so far: set-up)")


@wakelab.hookimpl
def on_step_end(state):
    _report(f"step {state.step} end (peak: this step)")


@wakelab.hookimpl
def on_run_end(run, status):
    _report(f"run end, {status}")
