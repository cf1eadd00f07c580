"""Sweep throughput: prompt lengths 8100..8300 x 4 knob settings through vLLM's real scheduler.

    python benchmarks/bench_sweep.py [SCENARIO] [--profile] [--decoders N]

Prints points per minute (one point = one prompt length under one knob setting, traced to completion)
for the whole sweep including per-setting setup (config resolution, KV config, scheduler construction),
excluding the one-off vLLM import and first scenario load. --profile adds the top functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from diaglib import compat
from diaglib.predict.schedule import sweep
from diaglib.scenario import load

LENGTHS = range(8100, 8301)
KNOBS = {"max_num_batched_tokens": [8191, 8192], "enforce_eager": ["off", "on"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", nargs="?", default="default")
    ap.add_argument("--profile", action="store_true", help="cProfile the sweep and print the top functions")
    ap.add_argument("--decoders", type=int, default=0, help="concurrent decoders with every prompt")
    args = ap.parse_args()

    t0 = time.perf_counter()
    sc = load(args.scenario)
    t_load = time.perf_counter() - t0
    prof = cProfile.Profile() if args.profile else None
    t1 = time.perf_counter()
    if prof:
        prof.enable()
    df = sweep(sc, LENGTHS, KNOBS, decoders=args.decoders, progress=False)
    if prof:
        prof.disable()
    dt = time.perf_counter() - t1
    points = len(LENGTHS) * len(KNOBS["max_num_batched_tokens"]) * len(KNOBS["enforce_eager"])
    print(f"vLLM {compat.installed()}, scenario {args.scenario} (first load {t_load:.1f} s, not counted)")
    print(f"{points} points ({len(df)} step rows, decoders {args.decoders}) in {dt:.2f} s: "
          f"{points / dt * 60:,.0f} points/min")
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue())


if __name__ == "__main__":
    main()
