"""Per zoo model, what the installed vLLM picks on what-if GPUs, and which kernels cross first as the budget grows.

    .venvs/vllm-X/bin/python scripts/zoo_table.py              # -> data/zoo/vllm-X.json, then docs/zoo.md
    python3 scripts/zoo_table.py --md                          # docs/zoo.md from the kept results only

Each model folder under data/models at its usual TP (scripts/check_zoo.py's table; 1 for a folder not in it),
through diaglib's own commands in-process (`show --json` per GPU, `kernels --json` once: the census's crossings do
not depend on the GPU): attention backend, MoE backend and experts, linear methods, compile ranges, CUDA-graph
mode and capture sizes, and the first three op sites whose tensors or grids pass their limit, with the formula.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from check_zoo import TP  # noqa: E402 - the usual TP per folder, one table for the zoo scripts

GPUS = ("NVIDIA H100", "NVIDIA B200")
BUDGET = 8192


def _ask(command: str, folder: Path, tp: int, gpu: str) -> dict:
    """One diaglib command on the folder at TP ``tp`` (contract.run_cli: in-process, status and JSON)."""
    from contract import run_cli

    cmd = f"vllm serve {folder} -tp {tp} --max-num-batched-tokens {BUDGET}"
    return run_cli([command, "--cmd", cmd, "--gpu", gpu, "--gpu-count", "8", "--json"])


def _facts(j: dict) -> dict:
    comp, moe, arch = j.get("compilation") or {}, j.get("moe") or {}, j.get("architecture") or {}
    sizes = comp.get("cudagraph_capture_sizes") or []
    return {"attention": j.get("attention_backend"), "moe": moe.get("backend"),
            "linear": sorted({m["method"] for m in arch.get("linear_methods") or []}),
            "compile_ranges": comp.get("compile_ranges"), "cudagraph_mode": comp.get("cudagraph_mode"),
            "capture_sizes": len(sizes), "max_capture_size": comp.get("max_cudagraph_capture_size")}


def _crossings(folder: Path, tp: int) -> dict:
    r = _ask("kernels", folder, tp, GPUS[0])
    if r["status"] != "ok":
        return {"status": r["status"], "reason": r.get("reason")}
    rows = sorted((c for c in r["json"].get("crossings") or [] if c.get("tokens")), key=lambda c: c["tokens"])
    first, seen = [], set()
    for c in rows:
        key = (c["module"], c["op"])
        if key not in seen:
            seen.add(key)
            first.append({k: c[k] for k in ("family", "module", "op", "role", "formula", "tokens", "runs_as")})
        if len(first) == 3:
            break
    gaps = [n.split(": inner kernels not traced (", 1)[0] + ": " +
            n.split(": inner kernels not traced (", 1)[1].rsplit("); the outputs", 1)[0][:120]
            for n in r["json"].get("notes") or [] if ": inner kernels not traced (" in n]
    return {"status": "ok", "first": first, "not_traced": gaps}


def collect() -> dict:
    from diaglib import compat
    from diaglib.progress import bar

    rows = []
    folders = sorted(p for p in (ROOT / "data/models").iterdir() if (p / "config.json").is_file())
    for folder in bar(folders, desc="zoo models", unit="model"):
        tp = TP.get(folder.name, 1)
        first = _ask("show", folder, tp, GPUS[0])
        row = {"model": folder.name, "tp": tp, "gpus": {}}
        for gpu in GPUS:
            r = first if gpu == GPUS[0] else _ask("show", folder, tp, gpu)
            row["gpus"][gpu] = (_facts(r["json"]) if r["status"] == "ok" else
                                {"status": r["status"], "reason": r.get("reason")})
        row["crossings"] = _crossings(folder, tp) if first["status"] == "ok" else None
        rows.append(row)
    return {"vllm": compat.installed(), "budget": BUDGET, "models": rows}


def _cell(x) -> str:
    return str(x).replace("|", "\\|") if x not in (None, [], "") else "-"


def render(results: list[dict]) -> str:
    out = ["# The model zoo under each CI release", "",
           f"Written by `scripts/zoo_table.py` (each model at its usual TP, `--max-num-batched-tokens {BUDGET}`, "
           "8 what-if GPUs); do not edit by hand.", "",
           "## What vLLM picks", "",
           "| model | TP | vLLM | GPU | attention | MoE | linear | compile ranges | graphs | capture sizes |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for m in res["models"]:
            for gpu, f in m["gpus"].items():
                if "status" in f:
                    out.append(f"| {m['model']} | {m['tp']} | {res['vllm']} | {gpu.removeprefix('NVIDIA ')} | "
                               f"{f['status']}: {_cell(f['reason'])} | | | | | |")
                    continue
                ranges = ", ".join(f"[{a}, {b}]" for a, b in f["compile_ranges"] or [])
                out.append(f"| {m['model']} | {m['tp']} | {res['vllm']} | {gpu.removeprefix('NVIDIA ')} | "
                           f"{_cell(f['attention'])} | {_cell(f['moe'])} | {_cell(', '.join(f['linear']))} | "
                           f"{_cell(ranges)} | {_cell(f['cudagraph_mode'])} | "
                           f"{f['capture_sizes']} (max {f['max_capture_size']}) |")
    out += ["", "## The first three op sites to cross a limit (census, per TP rank)", "",
            "| model | TP | vLLM | 1st | 2nd | 3rd | ops whose kernels the census could not trace |",
            "|---|---|---|---|---|---|---|"]
    for res in results:
        for m in res["models"]:
            c = m.get("crossings") or {}
            if c.get("status") != "ok":
                cells = [f"{c.get('status', 'not run')}: {_cell(c.get('reason'))}", "", "", ""]
            else:
                cells = [f"{x['tokens']:,}: {x['module'] or '(runner)'} {x['op']} {x['role']} [{x['formula']}]"
                         for x in c["first"]] + ["none"] * (3 - len(c["first"]))
                cells.append("; ".join(c.get("not_traced") or []) or "none")
            out.append(f"| {m['model']} | {m['tp']} | {res['vllm']} | " + " | ".join(_cell(x) for x in cells) + " |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md", action="store_true", help="only render docs/zoo.md from data/zoo/*.json")
    args = ap.parse_args()
    if not args.md:
        import os

        os.environ["DIAGLIB_NO_CACHE"] = "1"
        res = collect()
        path = ROOT / "data/zoo" / f"vllm-{res['vllm']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
    key = lambda r: tuple(int(p) for p in r["vllm"].split("."))  # noqa: E731
    results = sorted((json.loads(p.read_text()) for p in (ROOT / "data/zoo").glob("vllm-*.json")), key=key)
    (ROOT / "docs/zoo.md").write_text(render(results))
    print(f"docs/zoo.md: {sum(len(r['models']) for r in results)} rows from {len(results)} releases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
