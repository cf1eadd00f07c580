"""Probes per minute with engine reuse against a fresh engine per probe, from a live record store.

    python benchmarks/bench_live_throughput.py [STORE]     (default: the committed H200 records)

Engine reuse: probe time alone (one engine serves the sweep); fresh engine: engine-ready time plus probe
time for every probe (the ``standin-fresh`` run starts one engine per probe).
"""
from __future__ import annotations

import sys

from diaglib.live import compare
from diaglib.paths import DATA


def main(path: str) -> None:
    t = compare.throughput(path).set_index("run")
    print(t.to_string())
    if {"standin-sweep", "standin-fresh"} <= set(t.index):
        reuse = t.loc["standin-sweep", "probes_per_min_reuse"]
        fresh = t.loc["standin-fresh", "probes_per_min"]
        print(f"\nengine reuse {reuse} probes/min, fresh engine per probe {fresh} probes/min: ratio {reuse / fresh:.0f}x")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(DATA / "live" / "h200-vllm-0.20.2" / "live.jsonl"))
