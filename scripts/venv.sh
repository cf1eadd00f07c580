#!/usr/bin/env bash
# Create or update the virtual environment for one supported vLLM version, with uv:
#   scripts/venv.sh 0.20.2            -> .venvs/vllm-0.20.2: vLLM (envs/vllm-0.20.2.txt) + diaglib[dev], editable
#   scripts/venv.sh --remove 0.24.0   -> delete it and empty uv's cache (the matrix does this as it goes)
# Dependencies resolve as of the date in the file's "# exclude-newer:" line (a week after that release), so an
# old vLLM gets the libraries it was released with; a "# python: X.Y" line picks the interpreter (uv finds or
# fetches it). uv hard-links from its cache: a second environment with
# the same torch costs seconds and little disk. A rerun does nothing unless envs/ or pyproject.toml changed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
UV=${UV:-$(command -v uv || echo "$ROOT/.venvs/tools/bin/uv")}
# uv's cache beside the environments, so its hard links always work (a cache on another file system makes uv
# copy every file: twice the disk)
export UV_CACHE_DIR=${UV_CACHE_DIR:-$ROOT/.venvs/.uv-cache} UV_LINK_MODE=${UV_LINK_MODE:-hardlink}
if [ "${1:-}" = "--remove" ]; then
  rm -rf "$ROOT/.venvs/vllm-${2:?usage: scripts/venv.sh --remove VLLM_VERSION}"
  "$UV" cache clean >/dev/null 2>&1 || true  # the files live on in the other environments (hard links)
  exit 0
fi
VERSION=${1:?usage: scripts/venv.sh [--remove] VLLM_VERSION}
REQ="$ROOT/envs/vllm-$VERSION.txt"
[ -f "$REQ" ] || { echo "venv: vLLM $VERSION is not supported (no envs/vllm-$VERSION.txt)" >&2; exit 2; }
[ -x "$UV" ] || { echo "venv: uv not found (make tools installs it into .venvs/tools)" >&2; exit 2; }
VENV="$ROOT/.venvs/vllm-$VERSION"
STAMP="$VENV/.diaglib-stamp"
WANT=$(cat "$REQ" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then exit 0; fi
start=$(date +%s)
DATE=$(sed -n 's/^# exclude-newer: *//p' "$REQ")
WANT_PY=$(sed -n 's/^# python: *//p' "$REQ")  # a release that needs a newer Python than python3 names it
[ -x "$VENV/bin/python" ] || "$UV" venv -q --python "${PYTHON:-${WANT_PY:-python3}}" "$VENV"
LOG="$VENV/install.log"
if ! VIRTUAL_ENV="$VENV" "$UV" pip install ${DATE:+--exclude-newer "$DATE"} -r "$REQ" -e "$ROOT[dev]" >"$LOG" 2>&1; then
  tail -40 "$LOG" >&2; echo "venv: uv failed (full log: $LOG)" >&2; exit 1
fi
"$VENV/bin/python" -c "import vllm, diaglib" >/dev/null 2>&1 || { echo "venv: vLLM $VERSION does not import" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "venv: vLLM $VERSION ready in $(( $(date +%s) - start )) s at $VENV"
