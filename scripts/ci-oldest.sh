#!/usr/bin/env bash
# The fast suite against the oldest transformers, mlflow and peft wakelab declares (constraints-oldest.txt), in a
# second environment (.venv-oldest) with the same torch as constraints.txt. Only torch 2.13.0's CPU wheel installs
# here, so torch's own lower bound is argued in docs/install.md rather than run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=.venv-oldest
if [ ! -f "$VENV/.installed" ] || [ constraints-oldest.txt -nt "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -c constraints-oldest.txt -e '.[test]'
    touch "$VENV/.installed"
fi
"$VENV/bin/python" -c 'import importlib.metadata as m; print("oldest supported:", ", ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "mlflow", "peft", "tokenizers")))'
WAKELAB_CACHE="$PWD/.wakelab-cache-oldest" "$VENV/bin/python" -m pytest -q -p no:cacheprovider
echo "ci-oldest: $(( $(date +%s) - start )) s"
