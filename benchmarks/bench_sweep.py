"""Sweep throughput: prompt lengths 8100..8300 x 4 knob settings through vLLM's real scheduler.

    python benchmarks/bench_sweep.py [SCENARIO] [--profile] [--decoders N] [--repeat N]

Prints points per minute (one point = one prompt length under one knob setting, traced to completion)
for the whole sweep including per-setting setup (config resolution, KV config, scheduler construction),
excluding the one-off vLLM import and first scenario load; by wall time and by CPU time (this process and the
sweep's worker processes: what the sweep itself cost on a shared box). --workers 1 runs it in this process
alone; --profile (which implies it) adds the top functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's diaglib

from diaglib import compat  # noqa: E402
from diaglib.predict.schedule import sweep  # noqa: E402
from diaglib.scenario import load  # noqa: E402

LENGTHS = range(8100, 8301)
KNOBS = {"max_num_batched_tokens": [8191, 8192], "enforce_eager": ["off", "on"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", nargs="?", default="default")
    ap.add_argument("--profile", action="store_true", help="cProfile the sweep and print the top functions")
    ap.add_argument("--decoders", type=int, default=0, help="concurrent decoders with every prompt")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the sweep; the best is reported")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: the sweep's choice)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    sc = load(args.scenario)
    sweep(sc, [8100], progress=False)  # the KV guess (vLLM's model on the meta device) is kept from here on
    t_load = time.perf_counter() - t0
    points = len(LENGTHS) * len(KNOBS["max_num_batched_tokens"]) * len(KNOBS["enforce_eager"])
    print(f"vLLM {compat.installed()}, scenario {args.scenario} (first load {t_load:.1f} s, not counted)")
    best = None
    for _ in range(args.repeat):
        prof = cProfile.Profile() if args.profile else None
        w0, c0 = time.perf_counter(), _cpu()
        if prof:
            prof.enable()
        df = sweep(sc, LENGTHS, KNOBS, decoders=args.decoders, progress=False,
                   workers=1 if prof else args.workers)
        if prof:
            prof.disable()
        wall = time.perf_counter() - w0
        cpu = _cpu() - c0
        print(f"{points} points ({len(df)} step rows, decoders {args.decoders}) in {wall:.2f} s wall, "
              f"{cpu:.2f} s CPU: {points / wall * 60:,.0f} points/min by wall time, "
              f"{points / cpu * 60:,.0f} by CPU time")
        best = max(best or 0, points / wall * 60)
        if prof:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
            print(out.getvalue())
    print(f"best: {best:,.0f} points/min by wall time (load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} cores)")


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the sweep's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    main()
