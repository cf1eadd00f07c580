"""docs/compat.md from the version matrix's results (data/matrix/vllm-*.json, written by scripts/contract.py).

    python3 scripts/compat_md.py        # no vLLM needed
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["show", "dispatch", "trace", "sweep", "moe", "memory", "boundaries", "switches", "kernels", "report"]


def _key(v: str):
    return tuple(int(p) for p in v.split("."))


def load() -> list[dict]:
    rows = [json.loads(p.read_text()) for p in (ROOT / "data/matrix").glob("vllm-*.json")]
    return sorted(rows, key=lambda r: _key(r["vllm"]))


def _cell(text: str | None) -> str:
    if text is None:
        return "-"
    text = text.replace("|", "\\|").replace("\n", " ")
    return "verified" if text == "verified" else text if len(text) < 140 else text[:137] + "..."


def _ranges(r) -> str:
    return ", ".join(f"[{a}, {b}]" for a, b in r) or "none"


def render(results: list[dict]) -> str:
    supported = sorted((p.stem.removeprefix("vllm-") for p in (ROOT / "envs").glob("vllm-*.txt")), key=_key)
    have = {r["vllm"] for r in results}
    runs = sorted({(r["date"], r["commit"]) for r in results})
    partial = sorted({(p["date"], p["commit"], ", ".join(p["parts"]))
                      for r in results for p in r.get("partial_runs", [])})
    out = ["# vLLM release compatibility", "",
           "Written by `make matrix` (noxfile.py `contract` sessions: scripts/contract.py under each release's own "
           "environment, then scripts/compat_md.py). Do not edit by hand.", "",
           "Runs: " + "; ".join(f"{d} on commit {c}" for d, c in runs) + "."
           + (" Parts rerun alone (`contract.py --only`): "
              + "; ".join(f"{parts} {d} on commit {c}" for d, c, parts in partial) + "." if partial else ""),
           f"Releases covered: {len(have)} of {len(supported)}"
           + (f" (missing: {', '.join(v for v in supported if v not in have)})" if have != set(supported) else "")
           + ".", "",
           "## Commands", "",
           "Each command on the seed's scenario (GLM-4.6-FP8, TP 8, chunked prefill, 8192-token budget, 8x H20) and "
           "on a dense model (Llama-3.1-8B, TP 1, H200). *verified*: it answered and the contract tests of its "
           "topic (tests marked `contract`, which compare diaglib's answers with that release's own objects) "
           "passed; *answered*: it answered, no contract test covers it; *refused*: the one-line reason (vLLM's "
           "where vLLM refuses).", "",
           "| vLLM | torch | " + " | ".join(COMMANDS) + " |", "|---|---|" + "---|" * len(COMMANDS)]
    for r in results:
        out.append(f"| {r['vllm']} | {r['torch']} | " + " | ".join(_cell(r["verified"].get(c)) for c in COMMANDS) + " |")
    for gpu in ("NVIDIA H20", "NVIDIA H200"):
        out += ["", f"## What the seed's command resolves to on 8x {gpu.removeprefix('NVIDIA ')}", "",
                "| vLLM | compile mode | compile ranges | cudagraph mode | capture sizes (max) | scheduler | async "
                "| default budget | attention | MoE backend | experts |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            f = next((x for x in r["facts"] if x["gpu"] == gpu), None)
            if f is None or "error" in f:
                out.append(f"| {r['vllm']} | {_cell((f or {}).get('error', 'not run'))} |" + " |" * 10)
                continue
            out.append(f"| {r['vllm']} | {f['compile_mode']} | {_ranges(f['compile_ranges'])} | {f['cudagraph_mode']}"
                       f" | {f['capture_sizes']} ({f['max_capture_size']}) | {f['scheduler']} | "
                       f"{'on' if f['async_scheduling'] else 'off'} | {f['default_budget']} | "
                       f"{_cell(f['attention_backend'])} | {_cell(f['moe_backend'])} | {_cell(f['moe_experts'])} |")
    out += ["", "## The steps at the boundary (seed's command, 8x H200)", "",
            "A step of N tokens from one request: the padded size, the CUDA-graph mode it replays, the compiled "
            "graph it runs and the MoE experts vLLM selects for it.", "",
            "| vLLM | 8191 | 8192 | 8193 |", "|---|---|---|---|"]
    for r in results:
        f = next((x for x in r["facts"] if x["gpu"] == "NVIDIA H200" and "steps" in x), None)
        if f is None:
            continue
        cells = [s.get("note") or f"{s['cudagraph']}, padded {s['padded']}, {s['compiled']}, {s['moe_experts']}"
                 for s in f["steps"]]
        out.append(f"| {r['vllm']} | " + " | ".join(_cell(c) for c in cells) + " |")
    models = sorted({z["model"] for r in results for z in r.get("zoo", [])})
    if models:
        out += ["", "## `show` of every model folder (8x H200; TP 8, else the largest TP vLLM accepts)", "",
                "| vLLM | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for r in results:
            z = {x["model"]: x for x in r.get("zoo", [])}
            out.append(f"| {r['vllm']} | " + " | ".join(
                _cell(f"TP {z[m]['tp']}" if z.get(m, {}).get("status") == "ok" else
                      (z[m].get("reason") if m in z else None)) for m in models) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    target = ROOT / "docs/compat.md"
    target.write_text(render(load()))
    print(target)


if __name__ == "__main__":
    main()
