#!/usr/bin/env bash
# llama-cpp-python (the pin in constraints.txt) for the GGUF test (tests/test_gguf_llama_cpp_slow.py): PyPI has only
# its source, and building llama.cpp from it takes minutes of C++ (cmake and g++ are on the machine). The wheel is
# built once into a cache folder outside the clone, ${WAKELAB_WHEELS:-~/.cache/wakelab/wheels}, and later set-ups and
# CI runs install that wheel in seconds. The build runs niced, two jobs, without llava (the tests need no images).
# Usage: bash scripts/llama-cpp-python.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
WHEELS="${WAKELAB_WHEELS:-$HOME/.cache/wakelab/wheels}"
PIN="$(grep -E '^llama-cpp-python==' constraints.txt)"
VERSION="${PIN#*==}"
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python: $VERSION already installed"
    exit 0
fi
mkdir -p "$WHEELS"
WHEEL="$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$WHEEL" ]; then
    echo "llama-cpp-python: building $VERSION from source into $WHEELS (once: about 8 CPU-minutes of C++)"
    started=$(date +%s)
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        nice -n 10 "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python -w "$WHEELS" "$PIN"
    echo "llama-cpp-python: built in $(( $(date +%s) - started )) s"
    WHEEL="$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)"
fi
"$PY" -m pip install -q -c constraints.txt "$WHEEL"
echo "llama-cpp-python: installed $WHEEL"
