#!/usr/bin/env bash
# Issue 7 on one H200, through the CLI: the rehearsal scenario (data/scenarios/rehearsal.toml) with a fault
# planted to fire only with CUDA graphs on and only in a forward pass of exactly 8192 tokens.
#   bash scripts/gpu/rehearsal.sh BUDGET_S [STAGE ...]      (default stages: bisect evidence sweep hunt)
# (evidence-quick: blocking and trace only; a later `evidence` reuses their records and adds the sanitizer)
# Stages run in order until BUDGET_S is spent; a finished stage leaves /tmp/i7/done-STAGE and is skipped on
# the next call, an interrupted one resumes from the record store. Everything lands in $OUT on each call.
#   bisect    diaglib bisect rehearsal --planted 8192 --tokens 8192 (default candidates of this vLLM)
#   evidence  diaglib evidence rehearsal --planted 8192 --tokens 8192 (blocking, sanitizer, trace)
#   sweep     diaglib sweep rehearsal --live --planted 8192: 8191..8193 x {none, cudagraph-off, enforce-eager}
#   hunt      a real-fault hunt: the GLM-4.6-FP8 stand-in (one TP-8 rank, eager) at a 65536-token budget, where
#             the boundary map puts the int32 element-offset threshold of the MoE workspaces at 52429 tokens
set -uo pipefail
BUDGET=${1:?budget seconds}; shift
STAGES=${*:-bisect evidence sweep hunt}
OUT=${OUT:?set OUT}
END=$(( $(date +%s) + BUDGET ))
if [ ! -f /tmp/site/env.sh ]; then bash /tmp/bundle/install-bundle.sh > "$OUT/install.txt" 2>&1 || { tail -5 "$OUT/install.txt"; exit 2; }; fi
. /tmp/site/env.sh
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 VLLM_LOGGING_LEVEL=WARNING
W=/tmp/i7; mkdir -p $W
[ -f data/models/tiny-glm-fp8/model.safetensors ] || python3 -m diaglib.live.checkpoint data/models/tiny-glm-fp8 > $W/checkpoint.txt 2>&1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv > $W/gpu.txt 2>&1
command -v compute-sanitizer >> $W/gpu.txt 2>&1

cleanup() {  # children of a run cut short (a launcher's target outlives its killed parent)
  pkill -9 -f diaglib.live.child 2>/dev/null; pkill -9 -f compute-sanitizer 2>/dev/null; sleep 2
}

stage() {  # stage NAME CMD...: run until done or out of budget
  local name=$1; shift
  [ -f $W/done-$name ] && return 0
  local left=$(( END - $(date +%s) ))
  if [ $left -lt 60 ]; then echo "$name: not started, ${left}s left" >> $W/progress.txt; return 0; fi
  echo "== $name ($(date -u +%T), ${left}s left): $*" >> $W/progress.txt
  local t0=$(date +%s)
  timeout -s KILL $left "$@" >> $W/$name.txt 2>&1
  local rc=$?
  echo "   exit $rc after $(( $(date +%s) - t0 ))s" >> $W/progress.txt
  [ $rc -eq 0 ] && touch $W/done-$name
  cleanup
}

for s in $STAGES; do
  case $s in
    bisect) stage bisect python3 -m diaglib bisect rehearsal --planted 8192 --tokens 8192 --store $W/live.jsonl \
              --gpus 0 --timeout 240 ;;
    evidence-quick|evidence) steps=blocking,trace; [ $s = evidence ] && steps=blocking,trace,sanitizer
          stage $s python3 -m diaglib evidence rehearsal --planted 8192 --tokens 8192 -o $W/evidence \
              --work $W/evidence.work --steps $steps --gpus 0 --timeout 420 ;;
    sweep) stage sweep python3 -m diaglib sweep rehearsal --live --planted 8192 --lengths 8191:8193 \
              --knob switches=none,cudagraph-off,enforce-eager --store $W/live.jsonl --gpus 0 ;;
    hunt) for moe in cutlass triton; do
            flags="--enable-chunked-prefill --max-num-batched-tokens 65536 -tp 8 --enforce-eager"
            [ $moe = triton ] && flags="$flags --moe-backend triton"
            stage hunt-$moe python3 -m diaglib probe --cmd "vllm serve zai-org/GLM-4.6-FP8 $flags" --weights standin \
              --lengths 52428-52429,65536 --store $W/hunt.jsonl --run hunt-$moe --gpus 0 --timeout 240 --ready-timeout 420
          done ;;
    *) echo "unknown stage $s" >> $W/progress.txt ;;
  esac
done
cleanup
cp $W/progress.txt $W/live.jsonl $W/hunt.jsonl "$OUT/" 2>/dev/null
tar czf "$OUT/i7.tgz" -C $W \
  --exclude=vllm_cache --exclude=triton_cache $(cd $W && ls -d *.txt logs evidence evidence.work 2>/dev/null)
ls -la "$OUT" | tail -n +2
tail -c 6000 $W/progress.txt; for f in $W/bisect.txt $W/evidence.txt $W/sweep.txt $W/hunt-*.txt; do [ -f $f ] && { echo "--- $f"; tail -c 2500 $f; }; done
