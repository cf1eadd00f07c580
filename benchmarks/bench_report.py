"""The default report, built as `diaglib report -o DIR` builds it: with the committed live records, once more
(every answer kept), and with ten times as many records (synthetic copies of every store, runs renamed, with their
model folders, in a temporary folder: kept answers are keyed by what a record shows, so copies add reading only).

    python benchmarks/bench_report.py [--cold] [--copies 10] [--only NAME ...]

Prints the wall time and the CPU time of the report process and its kernels for each. --cold first empties
diaglib's kept answers (diaglib.cache.clear; compiled bytecode stays), so the first build makes every prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diaglib import cache  # noqa: E402
from diaglib.paths import DATA  # noqa: E402


def synthetic_records(dest: Path, copies: int) -> int:
    """Every committed store under data/live, ``copies`` times (runs renamed), beside a copy of everything else
    there (model folders, kernel tables, logs: what the records point to)."""
    live = DATA / "live"
    shutil.copytree(live, dest, ignore=shutil.ignore_patterns("*.jsonl"), dirs_exist_ok=True)
    n = 0
    for store in sorted(live.glob("**/*.jsonl")):
        records = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
        with open(dest / store.relative_to(live), "w") as f:
            for i in range(copies):
                for r in records:
                    if "run" in r:
                        r = {**r, "run": f"{r['run']}-copy{i}"}
                    f.write(json.dumps(r) + "\n")
                    n += 1
    return n


def build(out: Path, env: dict, only: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one `diaglib report`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "diaglib", "report", "-o", str(out), *(["--only", *only] if only else [])],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        sys.exit(f"report failed: {r.stderr.strip()}")
    print(r.stdout.strip())
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="empty the kept answers before the first build")
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--only", nargs="+", default=[], help="only notebooks whose name contains NAME")
    args = ap.parse_args()
    if args.cold:
        print(f"kept answers emptied: {cache.clear()['entries']}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="diaglib-bench-report-") as tmp:
        tmp = Path(tmp)
        results = {"committed records": build(tmp / "r1", env, args.only),
                   "committed records, again": build(tmp / "r2", env, args.only)}
        n = synthetic_records(tmp / "live", args.copies)
        results[f"{args.copies}x records ({n} lines)"] = build(tmp / "r10", {**env, "DIAGLIB_LIVE_DIR": str(tmp / "live")},
                                                             args.only)
    print(f"\nload average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores)")
    for what, (wall, cpu) in results.items():
        print(f"report with {what}: {wall:.1f} s wall, {cpu:.1f} s CPU (report process and kernels)")


if __name__ == "__main__":
    main()
