#!/usr/bin/env bash
# Create or update the virtual environment for one supported vLLM version:
#   scripts/venv.sh 0.20.2      -> .venvs/vllm-0.20.2: vLLM (envs/vllm-0.20.2.txt) + diaglib[dev], editable
# A rerun does nothing unless envs/ or pyproject.toml changed; then it updates the environment in place.
set -euo pipefail
VERSION=${1:?usage: scripts/venv.sh VLLM_VERSION}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REQ="$ROOT/envs/vllm-$VERSION.txt"
[ -f "$REQ" ] || { echo "venv: vLLM $VERSION is not supported (no envs/vllm-$VERSION.txt)" >&2; exit 2; }
VENV="$ROOT/.venvs/vllm-$VERSION"
STAMP="$VENV/.diaglib-stamp"
WANT=$(cat "$REQ" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then exit 0; fi
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "venv: creating $VENV (vLLM $VERSION: several GB, a few minutes)"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
LOG="$VENV/pip-install.log"
if ! "$VENV/bin/python" -m pip install -q --upgrade pip -r "$REQ" -e "$ROOT[dev]" >"$LOG" 2>&1; then
  grep -v "^WARNING: Location" "$LOG" | tail -40 >&2; echo "venv: pip failed (full log: $LOG)" >&2; exit 1
fi
"$VENV/bin/python" -c "import vllm, diaglib" >/dev/null
echo "$WANT" > "$STAMP"
echo "venv: vLLM $VERSION ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1) at $VENV"
