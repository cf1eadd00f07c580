"""The live runs of issue 17 on one H200, in stages that each fit one device call.

    python scripts/gpu/i17.py STAGE --out DIR [--budget SECONDS] [--dry]

``kernels``: the GLM-4.6-FP8 rank stand-in (one rank of TP 8), every probe profiled: the profile run again,
8191 / 8192 / 8193-token prompts and a decode batch (32 prompts of 128 tokens, 3 output tokens each).
``deepseek``: the DeepSeek-V3-architecture rank stand-in (DeepSeek-R1's config, one rank of TP 8, 61 layers,
dummy weights) at an 8192-token budget: 8191 / 8192 / 8193, the decode batch and the profile run (the last
three profiled).
``hybrid``: a hybrid-attention rank stand-in (Qwen3-Next's config: gated DeltaNet and full attention layers, MoE;
one rank of TP 4, dummy weights) at an 8192-token budget: 8191 / 8192 / 8193, the decode batch and the profile run.
``window``: gemma-3-27b (interleaved sliding-window and global attention; its language model only, dummy weights,
one H200) at an 8192-token budget: 8191 / 8192 / 8193, the decode batch and the profile run; the KV cache vLLM
sizes over its sliding-window and full-attention groups against diaglib's.
``hunt``: candidate real faults picked from diaglib's boundary map and census (HUNT): one engine each, its
probes on both sides of the predicted threshold and at the budget.
``bisect``: `diaglib bisect` of the hybrid stand-in's fault (scenario hybrid-gdn, 8191 tokens, the GDN prefill
switch, counts 8190..8193), its store started from the ``hybrid`` stage's records: it runs only what they lack.
Records go to DIR/<stage>.jsonl (append-only, fsynced per probe; per-step kernel tables in DIR/kernels/),
engine logs to DIR/logs/RUN/. ``--dry`` plans every engine and probe without starting one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from diaglib.live import probe as P
from diaglib.live import store
from diaglib.live.engine import plan
from diaglib.paths import DATA

MODELS = {"zai-org/GLM-4.6-FP8": str(DATA / "models" / "GLM-4.6-FP8"),
          "deepseek-ai/DeepSeek-R1": str(DATA / "models" / "DeepSeek-R1"),
          "meta-llama/Llama-3.1-8B-Instruct": str(DATA / "models" / "Llama-3.1-8B-Instruct"),
          "Qwen/Qwen2.5-72B-Instruct-AWQ": str(DATA / "models" / "Qwen2.5-72B-Instruct-ko-AWQ"),
          "Qwen/Qwen3-Next-80B-A3B-Thinking": str(DATA / "models" / "Qwen3-Next-80B-A3B-Thinking"),
          "google/gemma-3-27b-it": str(DATA / "models" / "gemma-3-27b-it")}
GLM = "vllm serve zai-org/GLM-4.6-FP8 --enable-chunked-prefill --max-num-batched-tokens 8192 -tp 8"
DEEPSEEK = "vllm serve deepseek-ai/DeepSeek-R1 -tp 8 --max-num-batched-tokens 8192"
HYBRID = "vllm serve Qwen/Qwen3-Next-80B-A3B-Thinking -tp 4 --max-num-batched-tokens 8192"
WINDOW = "vllm serve google/gemma-3-27b-it --language-model-only --max-num-batched-tokens 8192"
AWQ = "vllm serve Qwen/Qwen2.5-72B-Instruct-AWQ --max-num-batched-tokens 65536 --enforce-eager"
DECODE = {"lengths": [128] * 32, "max_tokens": 3}

# one H100's KV memory holds a 49,933-token prompt of gemma-3-27b only in fp8 at 0.97 of the GPU's memory
HUNT_GEMMA = ("vllm serve google/gemma-3-27b-it --language-model-only --max-num-batched-tokens 65536 "
              "--max-model-len 50000 --kv-cache-dtype fp8 --gpu-memory-utilization 0.97")
# (run, serve command, probes, what the boundary map / census predicts there)
HUNT = [
    ("hunt-deepseek-moe", "vllm serve deepseek-ai/DeepSeek-R1 -tp 8 --max-num-batched-tokens 65536 --enforce-eager",
     [37449, 37450, 65536],
     "census int32: fused_moe_kernel c_ptr / moe_sum input [N x 8 x 7168] passes INT32_MAX from 37,450 tokens"),
    ("hunt-llama-int32", "vllm serve meta-llama/Llama-3.1-8B-Instruct --max-num-batched-tokens 131072",
     [74898, 74899, 131071],
     "census int32: gate_up_proj out [N x 28672] (cuBLAS) and Inductor's silu over it pass INT32_MAX from 74,899"),
    ("hunt-full-graph", ("vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 256 --max-num-seqs 256 "
                         "-cc.cudagraph_mode=FULL"),
     [],
     "FULL graphs up to 512 tokens > max_model_len 256: captured with seq_lens 512 over 16-block block-table rows"),
    ("hunt-awq-machete", AWQ, [],
     "census int32: gate_up_proj out [N x 59136] (Machete on sm90) and silu_and_mul over it pass INT32_MAX from "
     "36,315 tokens; down_proj A [N x 29568] from 72,629; the profile run at start-up is 65,536"),
    ("hunt-awq-marlin", AWQ, [],
     "the same crossings through Marlin (MacheteLinearKernel disabled: vLLM's next int4 kernel on sm90)"),
    ("hunt-gemma-int32", HUNT_GEMMA,
     [49932, 49933],
     "census int32: gate_up_proj out [N x 43008] (cuBLAS) and Inductor's gelu and mul over [N x 21504] pass "
     "INT32_MAX from 49,933 tokens; the profile run at start-up is 65,536"),
    ("hunt-gemma-order", HUNT_GEMMA, [49933, 49932, 49934],
     "the first run's 49,933 out of memory: the crossing first on a fresh engine, then 49,932 and 49,934"),
]
# a prompt is at most max_model_len - 1 (32,767) tokens: steps past it are two prompts scheduled together
_AWQ_BATCHES = [{"lengths": [18157, 18157], "max_tokens": 1}, {"lengths": [18158, 18158], "max_tokens": 1},
                {"lengths": [32767, 32767], "max_tokens": 1}]
HUNT_ENV = {"hunt-awq-marlin": {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}}
HUNT_BATCHES = {"hunt-full-graph": [{"lengths": [255, 255], "max_tokens": 1}, {"lengths": [2] * 200, "max_tokens": 2}],
                "hunt-awq-machete": _AWQ_BATCHES, "hunt-awq-marlin": _AWQ_BATCHES}


def _glm_probes() -> list:
    return [P.Probe("profile-run", profile=True, profile_run=True),
            *[P.Probe(f"p{n}", [n], profile=True) for n in (8191, 8192, 8193)],
            P.batch(DECODE["lengths"], max_tokens=DECODE["max_tokens"], profile=True)]


def _deepseek_probes() -> list:
    return [P.Probe("p8191", [8191]), P.Probe("p8192", [8192], profile=True), P.Probe("p8193", [8193]),
            P.batch(DECODE["lengths"], max_tokens=DECODE["max_tokens"], profile=True),
            P.Probe("profile-run", profile=True, profile_run=True)]


def _hybrid_probes() -> list:
    return [*P.exact([8191, 8192, 8193]), P.batch(DECODE["lengths"], max_tokens=DECODE["max_tokens"]),
            P.Probe("profile-run", profile_run=True)]


def _hunt_probes(run: str, lengths: list[int]) -> list:
    return [*P.exact(lengths)] + [P.batch(b["lengths"], max_tokens=b["max_tokens"]) for b in HUNT_BATCHES.get(run, [])]


def _with_env(spec, env: dict):
    return dataclasses.replace(spec, env={**spec.env, **env})


def _run(probes, spec, out: Path, stage: str, name: str, deadline: float, ready: float) -> None:
    if time.monotonic() > deadline:
        print(f"{name}: skipped, out of time", flush=True)
        return
    t0 = time.monotonic()
    df = P.run(probes, spec, store_path=out / f"{stage}.jsonl", run_name=name, gpus=None, probe_timeout_s=240,
               ready_timeout_s=ready, log_dir=out / "logs" / name, deadline=deadline)
    cols = ["key", "outcome", "detail", "engine_ready_s", "probe_s", "observed_tokens", "kernel"]
    print(f"== {name} ({time.monotonic() - t0:.0f} s)\n{df[cols].to_string()}", flush=True)


def _bisect(store_path: Path, dry: bool) -> int:
    from diaglib.cli import main as diaglib

    if not store_path.exists():
        shutil.copy(DATA / "live" / "h200-vllm-0.20.2-i17" / "hybrid" / "live.jsonl", store_path)
    argv = ["bisect", "hybrid-gdn", "--tokens", "8191", "--switches", "gdn-prefill-triton", "--range", "8190:8193",
            "--store", str(store_path), "--timeout", "240"]
    print("diaglib", " ".join(argv), flush=True)
    return 0 if dry else diaglib(argv)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["kernels", "deepseek", "hybrid", "window", "hunt", "bisect"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget", type=float, default=540, help="seconds after which nothing new starts")
    ap.add_argument("--only", help="hunt, hybrid: the runs to do, comma-separated (default: all)")
    ap.add_argument("--dry", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.budget
    if a.stage == "bisect":
        return _bisect(a.out / "bisect.jsonl", a.dry)
    if a.stage == "kernels":
        jobs = [("i17-kernels", plan(GLM, models=MODELS, gpus=1), _glm_probes(), 480)]
    elif a.stage == "deepseek":
        jobs = [("i17-deepseek", plan(DEEPSEEK, models=MODELS, gpus=1), _deepseek_probes(), 540)]
    elif a.stage == "hybrid":
        jobs = [(name, plan(cmd, models=MODELS, gpus=1), _hybrid_probes(), 540) for name, cmd in
                (("i17-hybrid", HYBRID), ("i17-hybrid-triton-gdn", HYBRID + " --gdn-prefill-backend triton"))
                if not a.only or name in a.only.split(",")]
    elif a.stage == "window":
        jobs = [("i17-window", plan(WINDOW, models=MODELS, gpus=1), _hybrid_probes(), 540)]
    else:
        only = set(a.only.split(",")) if a.only else None
        jobs = [(run, _with_env(plan(cmd, models=MODELS, gpus=1), HUNT_ENV.get(run, {})), _hunt_probes(run, lengths),
                 480) for run, cmd, lengths, _ in HUNT if only is None or run in only]
    for name, spec, probes, ready in jobs:
        print(name, spec.command, [p.key for p in probes], flush=True)
        if not a.dry:
            _run(probes, spec, a.out, a.stage, name, deadline, ready)
    print(json.dumps({"records": len(store.read(a.out / f"{a.stage}.jsonl"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
