#!/usr/bin/env bash
# Create (or reuse) the virtual environment for one supported vLLM version:
#   scripts/venv.sh 0.20.2      -> .venvs/vllm-0.20.2 with vLLM, diaglib (editable) and its tools
# Reruns are cheap: the environment is rebuilt only when its requirements file changed.
set -euo pipefail
VERSION=${1:?usage: scripts/venv.sh VLLM_VERSION}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REQ="$ROOT/envs/vllm-$VERSION.txt"
[ -f "$REQ" ] || { echo "venv: vLLM $VERSION is not supported (no $REQ)" >&2; exit 2; }
VENV="$ROOT/.venvs/vllm-$VERSION"
STAMP="$VENV/.diaglib-stamp"
WANT=$(cat "$REQ" "$ROOT/envs/common.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then exit 0; fi
PY=${PYTHON:-python3}
start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$REQ"
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
echo "$WANT" > "$STAMP"
echo "venv: vLLM $VERSION ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1) at $VENV"
