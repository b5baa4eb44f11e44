#!/usr/bin/env bash
# The GPU check, ready for when a device is lent (<= 8 minutes on one GPU):
#   1. P1 at real depth: tokens/s and peak GPU memory of `tokens`, `mask` and PEFT TrainableTokens, nf4 and bf16
#      (target: tokens <= 0.5x mask's memory);
#   2. Wordybird with every field recorded: steps/s against the notebook's 7.1 (target >= 5x, or disk-bound, with
#      the disk's write rate shown);
#   3. the CUDA-only tests (tests whose name says cuda; skipped without a GPU).
# benchmarks/gpu_check.py says how each figure is taken. `--tiny` runs the same code on the CPU at toy sizes (CI,
# through tests/test_gpu_check_slow.py): it checks the script, its figures mean nothing.
#
#   bash benchmarks/gpu_check.sh            # on a machine with CUDA
#   bash benchmarks/gpu_check.sh --tiny     # anywhere, about a minute on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
started=$(date +%s)
status=0
limit=420  # of the 8 minutes on a GPU; --tiny on a busy CPU may take longer
case " $* " in *" --tiny "*) limit=1700 ;; esac
(cd benchmarks && timeout "$limit" "$PY" gpu_check.py "$@") || status=$?
echo "3. CUDA-only tests"
timeout 120 "$PY" -m pytest -q -m "slow or not slow" -k cuda -rs tests/test_recording.py || status=$?
echo "gpu_check: $(( $(date +%s) - started )) s, exit $status"
exit $status
