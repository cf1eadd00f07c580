#!/usr/bin/env bash
# One device call of issue 17 (run from the repo root on the GPU host; results land in $OUT).
#   bash scripts/gpu/i17.sh BUDGET_S STAGE [ARGS...]     (STAGE: kernels, deepseek, hybrid, window, hunt, bisect; ARGS go to i17.py)
# Installs the offline vLLM bundle gathered in /tmp/bundle (once per machine), runs scripts/gpu/i17.py STAGE with
# its records in /tmp/i17 (kept between calls on a warm machine: a re-run resumes from the store), then packs the
# stage's records, kernel tables, logs and raw traces (in 15 MB parts) into $OUT. The driver is killed outright at
# BUDGET_S + 40 s: every record is on disk by then, and its children die with it (PR_SET_PDEATHSIG).
set -uo pipefail
BUDGET=${1:?budget seconds}; STAGE=${2:?stage}; shift 2
OUT=${OUT:?set OUT}
T0=$(date +%s)
if [ ! -f /tmp/site/env.sh ]; then
  bash /tmp/bundle/install-bundle.sh > "$OUT/install.txt" 2>&1 || { tail -5 "$OUT/install.txt"; exit 2; }
fi
. /tmp/site/env.sh
# DeepGEMM is not in the bundle: vLLM must not pick it for block-FP8 linears or MoE
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 VLLM_USE_DEEP_GEMM=0 VLLM_MOE_USE_DEEP_GEMM=0 \
  DIAGLIB_TRACE_DIR=/tmp/i17/traces/$STAGE
W=/tmp/i17; mkdir -p $W
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv > $W/gpu.txt 2>&1
echo "install+setup $(( $(date +%s) - T0 ))s" > $W/$STAGE.time
timeout -s KILL $(( BUDGET + 40 )) python3 scripts/gpu/i17.py "$STAGE" --out $W --budget "$BUDGET" "$@" \
  > $W/$STAGE.txt 2>&1
echo "stage $STAGE exit $? after $(( $(date +%s) - T0 ))s" >> $W/$STAGE.time
cat $W/$STAGE.time >> $W/$STAGE.txt
cp $W/$STAGE.jsonl $W/$STAGE.txt $W/gpu.txt "$OUT/" 2>/dev/null
tar czf "$OUT/$STAGE.tgz" -C $W $(cd $W && ls -d logs kernels 2>/dev/null)
[ -d $W/traces/$STAGE ] && (cd $W/traces && tar cf - $STAGE | split -b 15m - "$OUT/traces-$STAGE.tar.")
ls -la "$OUT" | tail -n +2
tail -c 7000 $W/$STAGE.txt
