"""`diaglib report --cmd` for every model folder under data/models, under the vLLM of this interpreter.

    .venvs/vllm-0.20.2/bin/python benchmarks/bench_zoo_reports.py [--gpu "NVIDIA H200"] [--models A,B] [--out DIR]

One report per folder (every notebook, headless; a new process each, as from a shell) at an 8192-token budget,
at the TP the zoo's tests use and with its publisher's flags where data/models/usual-tp.json names them (else TP 1,
no flags). Prints per model the exit status, the wall time and, where a cell failed, diaglib's one line naming it;
then the total. Exit 1 if any report failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "data" / "models"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="NVIDIA H200")
    ap.add_argument("--gpu-count", type=int, default=8)
    ap.add_argument("--models", type=lambda t: t.split(","), default=None, help="folder names (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="where the reports go (default: a temporary folder)")
    args = ap.parse_args()
    usual = json.loads((MODELS / "usual-tp.json").read_text())
    tp, flags = usual["tp"], usual.get("flags", {})
    folders = sorted(p.name for p in MODELS.iterdir() if (p / "config.json").is_file())
    unknown = sorted(set(args.models or []) - set(folders))
    if unknown:
        sys.exit(f"no model folder {', '.join(unknown)} under data/models")
    out = args.out or Path(tempfile.mkdtemp(prefix="diaglib-zoo-reports-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"diaglib report of {len(args.models or folders)} model folders on {args.gpu_count}x {args.gpu} "
          f"(load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores) -> {out}")
    failed, t_all = [], time.perf_counter()
    for name in args.models or folders:
        cmd = f"vllm serve data/models/{name} -tp {tp.get(name, 1)} --max-num-batched-tokens 8192 {flags.get(name, '')}"
        cmd = cmd.strip()
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "diaglib", "report", "--cmd", cmd, "--gpu", args.gpu,
                            "--gpu-count", str(args.gpu_count), "-o", str(out / name)],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        last = next((ln for ln in reversed(r.stderr.splitlines()) if ln.strip()), "")
        print(f"{name:32} TP {tp.get(name, 1)}  rc {r.returncode}  {wall:6.1f} s"
              + (f"  {last}" if r.returncode else ""), flush=True)
        if r.returncode:
            failed.append(name)
    print(f"total {time.perf_counter() - t_all:.0f} s; {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
