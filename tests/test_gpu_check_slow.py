"""benchmarks/gpu_check.sh stays correct without a GPU: ``--tiny`` runs every part of it on the CPU at toy sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_part_on_the_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--cache", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,  # about 2 min on a quiet 2-core runner; far more on a machine shared by many jobs
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for variant in ("tokens", "mask", "peft"):
        for precision in ("bf16", "nf4"):
            assert any(
                line.split()[:2] == [variant, f"{precision}:"] and "tokens/s" in line for line in out.splitlines()
            ), (variant, precision, out)
    assert "tokens / mask peak memory" in out
    assert "steps/s on CPU" in out and "disk writes" in out and "disk-bound rate" in out
    assert "3. CUDA-only tests" in out and "needs CUDA" in out  # the CUDA-only test is found, and skipped here
