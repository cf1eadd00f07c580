"""`diaglib show` as a user runs it: cold (computed by vLLM: --no-cache) and cached (the kept answer), and what
the cached run imports (python -X importtime: no vLLM, torch or pandas).

    python benchmarks/bench_show.py [ARGS...]        (default: show of the seed scenario; any cacheable command)

Prints wall and CPU time of each run (a new process each, as from a shell).
"""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str, env: dict | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        sys.exit(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), r


def main() -> None:
    args = sys.argv[1:] or ["show"]
    print(f"diaglib {' '.join(args)}  (load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores)")
    cold = [run("-m", "diaglib", *args, "--no-cache")[:2] for _ in range(2)]
    for wall, cpu in cold:
        print(f"cold (computed by vLLM): {wall:.1f} s wall, {cpu:.1f} s CPU")
    warm = [run("-m", "diaglib", *args)[:2] for _ in range(5)]
    print(f"cached: median {statistics.median(w for w, _ in warm):.2f} s wall, "
          f"{statistics.median(c for _, c in warm):.2f} s CPU (of {len(warm)} runs)")
    _, _, r = run("-X", "importtime", "-c", f"import sys; from diaglib.cli import main; sys.exit(main({args!r}))")
    heavy = sorted({line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines()
                    if line.startswith("import time:")} & {"vllm", "torch", "pandas", "transformers"})
    print(f"cached run imports: {', '.join(heavy) or 'none'} of vllm, torch, pandas, transformers")


if __name__ == "__main__":
    main()
