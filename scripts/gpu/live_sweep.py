"""The live runs for issue 6, in stages that each fit one 10-minute device call.

    python scripts/gpu/live_sweep.py STAGE --out DIR [--budget SECONDS] [--dry]

Stage ``a``: a small real FP8 checkpoint through vLLM's real loading path (8191..8193), then the
rank-equivalent GLM-4.6-FP8 stand-in (one rank of TP 8) with engine reuse: prompts 8180..8200 (8192
profiled), a planted Triton out-of-bounds write at M = 8192 in the middle, the 8 x 1001 + 184 batch, 16384.
Stage ``b``: a fresh engine per probe (2 probes), the same stand-in with --enforce-eager at 8191/8192,
and compute-sanitizer's memcheck on the planted kernel.
Stage ``c`` (issue 7): a planted fault inside the forward pass that fires only with CUDA graphs on and
only at exactly 8192 tokens, probed at 8191/8192 with graphs, --enforce-eager and cudagraph_mode NONE.
Records go to DIR/live.jsonl (append-only, fsynced per probe), engine logs to DIR/logs/RUN/.
``--dry`` builds the plans and probes and writes the small checkpoint, without starting engines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from diaglib.live import classify as C
from diaglib.live import probe as P
from diaglib.live import store
from diaglib.live.checkpoint import write_checkpoint
from diaglib.live.engine import plan
from diaglib.paths import DATA

SEED = "vllm serve zai-org/GLM-4.6-FP8 --enable-chunked-prefill --max-num-batched-tokens 8192 -tp 8"
MODELS = {"zai-org/GLM-4.6-FP8": str(DATA / "models" / "GLM-4.6-FP8")}
BATCH = [1001] * 8 + [184]


def _sweep() -> list:
    return (P.exact(range(8180, 8192)) + [P.Probe("p8192", [8192], profile=True)]
            + [P.planted_fault("oob_write", key="planted-oob-m8192", m=8192, threshold=8192)]
            + P.exact(range(8193, 8201)) + [P.batch(BATCH), P.Probe("p16384", [16384])])


def stage_a(out: Path, deadline: float, dry: bool) -> None:
    ckpt = write_checkpoint(Path("/tmp/diaglib-ckpt-fp8"), fp8=True)
    small = plan(f"vllm serve {ckpt} --enable-chunked-prefill --max-num-batched-tokens 8192 --enforce-eager",
                 weights="real")
    standin = plan(SEED, models=MODELS, gpus=1)
    print("small:", small.command, "\nstand-in:", standin.command, flush=True)
    if dry:
        return
    _run([P.Probe("p8191", [8191]), P.Probe("p8192", [8192]), P.batch(BATCH)], small, out, "ckpt-fp8",
         deadline, ready=300)
    _run(_sweep(), standin, out, "standin-sweep", deadline, ready=480)


def stage_b(out: Path, deadline: float, dry: bool) -> None:
    standin = plan(SEED, models=MODELS, gpus=1)
    eager = plan(SEED, models=MODELS, gpus=1, flags=["--enforce-eager"])
    print("eager:", eager.command, flush=True)
    if dry:
        return
    _run(_sweep(), standin, out, "standin-sweep", deadline, ready=480)  # resumes what stage a left
    _sanitizer(out)
    _run([P.Probe("p8192", [8192], fresh=True), P.Probe("p8191", [8191], fresh=True)], standin, out,
         "standin-fresh", deadline, ready=400)
    _run(P.exact([8191, 8192]) + [P.batch(BATCH)], eager, out, "standin-eager", deadline, ready=400)


def stage_c(out: Path, deadline: float, dry: bool) -> None:
    """Issue 7: a planted fault that fires only with CUDA graphs on and only at exactly 8192 tokens,
    probed at 8191/8192 with graphs (default), with --enforce-eager, and with cudagraph_mode NONE."""
    planted = {"fault": "oob_in_forward", "tokens": 8192}
    probes = [P.Probe(f"p{n}-planted", [n], planted=planted) for n in (8191, 8192)]
    runs = [("i7-graphs", []), ("i7-eager", ["--enforce-eager"]),
            ("i7-cudagraph-none", ["--compilation-config", '{"cudagraph_mode": "NONE"}'])]
    specs = [(name, plan(SEED, models=MODELS, gpus=1, flags=flags)) for name, flags in runs]
    for name, spec in specs:
        print(name, spec.command, flush=True)
    if dry:
        return
    for name, spec in specs:
        _run(probes, spec, out, name, deadline, ready=400)


def _run(probes, engine, out: Path, name: str, deadline: float, ready: float) -> None:
    if time.monotonic() > deadline:
        print(f"{name}: skipped, out of time", flush=True)
        return
    t0 = time.monotonic()
    df = P.run(probes, engine, store_path=out / "live.jsonl", run_name=name, gpus=None, probe_timeout_s=180,
               ready_timeout_s=ready, log_dir=out / "logs" / name, deadline=deadline)
    cols = ["key", "outcome", "engine_seq", "engine_ready_s", "probe_s", "observed_tokens", "kernel"]
    print(f"== {name} ({time.monotonic() - t0:.0f} s)\n{df[cols].to_string()}", flush=True)


def _sanitizer(out: Path) -> None:
    """compute-sanitizer memcheck on the planted kernel: the faulting kernel's name, read from the tool."""
    code = "from diaglib.live.planted import oob_write; oob_write(8192, 8192)"
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    t0 = time.monotonic()
    try:
        p = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--print-limit", "5", sys.executable,
                            "-c", code], capture_output=True, text=True, timeout=240, env=env)
        text, rc, timed_out = p.stdout + p.stderr, p.returncode, False
    except subprocess.TimeoutExpired as e:
        text, rc, timed_out = (e.stdout or b"").decode() + (e.stderr or b"").decode(), None, True
    except FileNotFoundError:
        text, rc, timed_out = "compute-sanitizer not found", 127, False
    (out / "sanitizer.txt").write_text(text[-200_000:])
    o = C.classify(text, returncode=rc, timed_out=timed_out)
    store.append(out / "live.jsonl", {"type": "sanitizer", "run": "sanitizer-planted", "key": "oob-m8192",
                                      "seconds": round(time.monotonic() - t0, 1), "returncode": rc, **o.as_dict()})
    print(f"== sanitizer: {o.outcome} kernel={o.kernel} ({time.monotonic() - t0:.0f} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["a", "b", "c"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget", type=float, default=540, help="seconds after which nothing new starts")
    ap.add_argument("--dry", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.budget
    {"a": stage_a, "b": stage_b, "c": stage_c}[a.stage](a.out, deadline, a.dry)
    print(json.dumps({"records": len(store.read(a.out / "live.jsonl"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
