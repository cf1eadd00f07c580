#!/usr/bin/env bash
# One device visit for issue 6 (run from the repo root on the GPU host; results land in $OUT).
#   bash scripts/gpu/live_run.sh STAGE [KILL_AFTER_S] [BUDGET_S]
# Installs the offline vLLM bundle gathered in /tmp/bundle (once per machine), then runs
# scripts/gpu/live_sweep.py STAGE with its records in /tmp/live (kept between calls on a warm machine,
# so stage b resumes what stage a left), and copies records, logs and output to $OUT.
set -uo pipefail
STAGE=$1; KILL_AFTER=${2:-560}; BUDGET=${3:-470}
OUT=${OUT:?set OUT}
if [ ! -f /tmp/site/env.sh ]; then bash /tmp/bundle/install-bundle.sh > "$OUT/install-$STAGE.txt" 2>&1 || { tail -5 "$OUT/install-$STAGE.txt"; exit 2; }; fi
. /tmp/site/env.sh
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
mkdir -p /tmp/live
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv > "$OUT/gpu-$STAGE.txt" 2>&1
# the driver is killed outright at KILL_AFTER: its children die with it, every record is already on disk
timeout -s KILL "$KILL_AFTER" python3 scripts/gpu/live_sweep.py "$STAGE" --out /tmp/live --budget "$BUDGET" \
  > "$OUT/stage-$STAGE.txt" 2>&1
echo "stage $STAGE exit $?" >> "$OUT/stage-$STAGE.txt"
cp /tmp/live/live.jsonl "$OUT/live-$STAGE.jsonl" 2>/dev/null
tar czf "$OUT/logs-$STAGE.tgz" -C /tmp/live logs $(cd /tmp/live && ls sanitizer.txt 2>/dev/null)
tail -c 9000 "$OUT/stage-$STAGE.txt"
