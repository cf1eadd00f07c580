#!/usr/bin/env bash
# Issue 17's FULL-capture fault under compute-sanitizer, in one device call (repo root on the GPU host; $OUT back).
#   bash scripts/gpu/i17_sanitizer.sh [DEADLINE_S] [STEPS]
# STEPS (default "plain,sanitizer,fa3,fa3-sanitizer"; "sanitizer-all" = memcheck with no kernel filter):
#   plain          the failing engine (scripts/gpu/i17_sanitizer.py engine) with CUDA_LAUNCH_BLOCKING=1
#   sanitizer      the same engine under compute-sanitizer memcheck, only kernels named *flash* instrumented
#   fa3            the stand-alone FA3 calls (i17_sanitizer.py fa3): seq 512 over 16-block rows, and controls
#   fa3-sanitizer  the first faulting (else the first) stand-alone call under memcheck
# The offline vLLM bundle must be gathered in /tmp/bundle (p1..p4, install-bundle.sh, SHA256SUMS); it is
# installed into /tmp/site once per machine. Each step has its own timeout, all inside DEADLINE_S (default 540).
# ENGINE_ARGS go to every engine step (default: capture size 512 only, 4 GiB KV cache). That default did NOT fault
# on the visit recorded in data/live/h200-vllm-0.20.2-i17/hunt/ (sanitizer3.jsonl): the fault needed vLLM's full
# capture list and a large KV cache, e.g. ENGINE_ARGS="--sizes= --kv 85899345920" (80 GiB), where memcheck then
# runs out of device memory (hunt/README.md).
set -uo pipefail
DL=${1:-540}; STEPS=${2:-plain,sanitizer,fa3,fa3-sanitizer}
OUT=${OUT:?set OUT}
T0=$(date +%s); W=/tmp/i17s; mkdir -p $W; S=$W/summary.txt
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DL - $(el) )); }
note() { echo "[$(el)s] $*" | tee -a $S; }
has() { [[ ",$STEPS," == *",$1,"* ]]; }
# step NAME CAP CMD...: CMD with its output in $W/NAME.log, killed (its process group too) after CAP seconds
step() { local name=$1 cap=$2; shift 2
  [ "$cap" -lt 20 ] && { note "$name: skipped, ${cap}s left"; return 99; }
  local t=$(date +%s); timeout -k 5 -s KILL "$cap" "$@" > $W/$name.log 2>&1; local rc=$?
  note "$name: rc=$rc in $(( $(date +%s) - t ))s (cap ${cap}s)"; return $rc; }
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }

if [ ! -f /tmp/site/env.sh ]; then
  bash /tmp/bundle/install-bundle.sh > $W/install.txt 2>&1 || { cat $W/install.txt; exit 2; }
fi
note "$(tail -1 $W/install.txt 2>/dev/null)"
. /tmp/site/env.sh
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 VLLM_USE_DEEP_GEMM=0 VLLM_MOE_USE_DEEP_GEMM=0 \
  VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=0 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader >> $S 2>&1
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
     /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
note "compute-sanitizer: ${CS:-none} $($CS --version 2>&1 | grep -i version | head -1)"
$CS --help > $W/cs-help.txt 2>&1
if grep -q -- '--kernel-name ' $W/cs-help.txt; then FILT=(--kernel-name kns=flash); else FILT=(--kernel-regex kns=flash); fi
MEMCHECK=("$CS" --tool memcheck --target-processes application-only --launch-timeout 0 --print-limit 20)
PY=python3

has plain && CUDA_LAUNCH_BLOCKING=1 step engine-plain $(min 150 $(( $(left) - 200 ))) $PY scripts/gpu/i17_sanitizer.py engine ${ENGINE_ARGS:-}
if has sanitizer; then
  note "sanitizer: ${MEMCHECK[*]} ${FILT[*]} --log-file sanitizer-engine.txt $PY scripts/gpu/i17_sanitizer.py engine ${ENGINE_ARGS:-}"
  step engine-sanitizer $(min 330 $(( $(left) - 100 ))) "${MEMCHECK[@]}" "${FILT[@]}" --log-file $W/sanitizer-engine.txt \
    $PY scripts/gpu/i17_sanitizer.py engine ${ENGINE_ARGS:-}
  grep -m3 -E "Invalid|Program hit|ERROR SUMMARY" $W/sanitizer-engine.txt | tee -a $S
fi
if has sanitizer-all; then
  step engine-sanitizer-all $(min 540 $(( $(left) - 20 ))) "${MEMCHECK[@]}" --log-file $W/sanitizer-engine-all.txt \
    $PY scripts/gpu/i17_sanitizer.py engine ${ENGINE_ARGS:-}
  grep -m3 -E "Invalid|Program hit|ERROR SUMMARY" $W/sanitizer-engine-all.txt | tee -a $S
fi
FIRST_FAULT=""
if has fa3; then
  : > $W/fa3.log; i=0
  for v in "--seq 512 --width 16 --tail zero" "--seq 512 --width 16 --tail poison" "--seq 512 --width 32 --tail poison" \
           "--seq 256 --width 16 --tail poison" "--seq 512 --width 16 --tail zero --no-sched"; do
    i=$((i + 1)); step fa3-$i $(min 45 $(( $(left) - 60 ))) $PY scripts/gpu/i17_sanitizer.py fa3 $v; rc=$?
    { echo "== fa3 $v: rc=$rc"; grep -E "^FA3|Error|error" $W/fa3-$i.log | head -5; } >> $W/fa3.log
    [ $rc -ne 0 ] && [ $rc -ne 99 ] && [ -z "$FIRST_FAULT" ] && FIRST_FAULT="$v"
  done
  cat $W/fa3.log >> $S
fi
if has fa3-sanitizer; then
  v=${FIRST_FAULT:-"--seq 512 --width 16 --tail zero"}
  note "fa3-sanitizer on: $v"
  step fa3-sanitizer $(min 90 $(( $(left) - 5 ))) "${MEMCHECK[@]}" --log-file $W/sanitizer-fa3.txt \
    $PY scripts/gpu/i17_sanitizer.py fa3 $v
  grep -m3 -E "Invalid|Program hit|ERROR SUMMARY" $W/sanitizer-fa3.txt | tee -a $S
fi
note "done"
cp $S $W/sanitizer-engine*.txt $W/sanitizer-fa3.txt $W/engine-plain.log $W/engine-sanitizer.log $W/fa3.log "$OUT/" 2>/dev/null
tar czf "$OUT/all.tgz" -C $W . 2>/dev/null
ls -la "$OUT" | tail -n +2
for f in $W/sanitizer-engine*.txt $W/sanitizer-fa3.txt; do [ -f $f ] && { echo "== $f"; head -c 2500 $f; echo; }; done
tail -c 1500 $W/engine-sanitizer.log 2>/dev/null
cat $S
