"""The version contract of the vLLM release installed here (run by `nox -s contract`, one release per session).

    .venvs/vllm-X/bin/python scripts/contract.py --out data/matrix/vllm-X.json [--no-report] [--no-tests]
    .venvs/vllm-X/bin/python scripts/contract.py --out data/matrix/vllm-X.json --only zoo,tests   (merged)

1. Every command on the seed's scenario and on a dense model, in-process through `diaglib.cli.main` with the
   answer cache off: exit status and, where diaglib or vLLM refuses, the one-line reason.
2. The facts that change across releases for the seed's command on H20 and H200 (compile mode and ranges, graph
   mode, capture sizes, scheduler class and async, MoE backend and experts, attention backend, the default
   budget) and what the steps of 8191, 8192 and 8193 tokens run (compiled range, graph mode, padding, MoE path).
3. `show` of every model folder under data/models (TP 8 on 8x H200, else the largest TP vLLM accepts).
4. The tests marked `contract` (they compare diaglib's answers with this vLLM's own objects).
A command counts as verified when it answered and the contract tests of its topic passed. --only reruns some of
the parts (commands, facts, zoo, tests) into an existing result, which then lists them under "partial_runs".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["DIAGLIB_NO_CACHE"] = "1"

SEED = "vllm serve {model} --enable-chunked-prefill --max-num-batched-tokens 8192 -tp 8"
SEED_MODEL = str(ROOT / "data/models/GLM-4.6-FP8")
DENSE = str(ROOT / "data/models/Llama-3.1-8B-Instruct")
# Which test files hold the contract tests of each command's topic.
TOPICS = {"show": ["test_scenario", "test_summarize", "test_zoo", "test_architectures", "test_compat_config"],
          "dispatch": ["test_dispatch"], "trace": ["test_schedule"], "sweep": ["test_schedule"],
          "moe": ["test_moe", "test_layers"], "memory": ["test_memory"], "boundaries": ["test_boundaries"],
          "switches": ["test_switches"], "kernels": ["test_census"], "report": ["test_report", "test_notebooks"]}
PARTS = ("commands", "facts", "zoo", "tests")


def run_cli(argv: list[str]) -> dict:
    """One diaglib command in-process: status ok / refused (exit 2, one line) / failed (anything else)."""
    from diaglib.cli import main

    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001 - the contract records the failure, it does not stop at it
        rc, tb = -1, traceback.format_exc()
        err.write(tb)
    lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
    last = (lines[-1] if lines else "").replace(f"{ROOT}{os.sep}", "")  # the checkout's paths, relative
    status = "ok" if rc == 0 else "refused" if rc == 2 and last.startswith("diaglib: error: ") else "failed"
    row = {"argv": argv, "rc": rc, "status": status, "seconds": round(time.perf_counter() - t0, 2)}
    if status == "refused":
        row["reason"] = last.removeprefix("diaglib: error: ")
    elif status == "failed":
        row["reason"] = last[:300]
        row["stderr_tail"] = err.getvalue()[-2000:]
    if status == "ok" and "--json" in argv:
        with contextlib.suppress(json.JSONDecodeError):
            row["json"] = json.loads(out.getvalue())
    return row


def commands(model: str, tp: int, gpu: str, *, report_dir: str | None) -> dict[str, list[str]]:
    from diaglib.cli import build_parser

    cmd = SEED.format(model=model).replace("-tp 8", f"-tp {tp}")
    base = ["--cmd", cmd, "--gpu", gpu, "--gpu-count", "8", "--json"]
    subs = {a.dest: a for a in build_parser()._subparsers._group_actions}["command"].choices
    out = {"show": ["show", *base], "dispatch": ["dispatch", *base, "--tokens", "1", "7", "513", "8191", "8192"],
           "trace": ["trace", *base, "--prompt", "8192", "--prompt", "8193"],
           "sweep": ["sweep", *base, "--lengths", "8190:8194"], "moe": ["moe", *base, "--tokens", "8192"],
           "memory": ["memory", *base], "boundaries": ["boundaries", *base], "switches": ["switches", *base]}
    if "kernels" in subs:
        out["kernels"] = ["kernels", *base, "--tokens", "8192"]
    if report_dir and "report" in subs:
        out["report"] = ["report", "--cmd", cmd, "--gpu", gpu, "--gpu-count", "8", "-o", report_dir, "-j", "1"]
    return out


def facts(gpu: str) -> dict:
    """The seed's command on one GPU: what changes across releases, read off vLLM's objects."""
    from diaglib import compat
    from diaglib.gpus import gpu_spec
    from diaglib.predict import layers, moe
    from diaglib.predict.dispatch import dispatch
    from diaglib.scenario import from_command

    g = gpu_spec(gpu, 8)
    sc = from_command(SEED.format(model=SEED_MODEL), gpu=g)
    comp, sched = compat.compilation_summary(sc.vllm_config), compat.scheduler_summary(sc.vllm_config)
    default = from_command(SEED.format(model=SEED_MODEL).replace(" --max-num-batched-tokens 8192", ""), gpu=g)
    b = layers.moe_backend(sc)
    steps = []
    for n in (8191, 8192, 8193):
        if n > sched["max_num_batched_tokens"]:
            steps.append({"tokens": n, "note": "over the budget: split by the scheduler"})
            continue
        d = dispatch(sc, n)
        steps.append({"tokens": n, "padded": d["padded_tokens"], "cudagraph": d["cudagraph_mode"],
                      "compiled": f"{d['compile_kind']} {d['compile_range']}",
                      "moe_experts": moe.selected(sc, n)[0] if b else None})
    return {"gpu": gpu, "compile_mode": comp["compile_mode"], "compile_ranges": comp["compile_ranges"],
            "cudagraph_mode": comp["cudagraph_mode"], "capture_sizes": len(comp["cudagraph_capture_sizes"]),
            "max_capture_size": comp["max_cudagraph_capture_size"],
            "scheduler": sched["scheduler_cls"].rsplit(".", 1)[-1], "async_scheduling": sched["async_scheduling"],
            "moe_backend": b["backend"] if b else None, "moe_experts": b["experts"] if b else None,
            "attention_backend": compat.attention_backend(sc.vllm_config),
            "default_budget": default.vllm_config.scheduler_config.max_num_batched_tokens, "steps": steps}


def zoo() -> list[dict]:
    rows = []
    for folder in sorted(p for p in (ROOT / "data/models").iterdir() if (p / "config.json").is_file()):
        for tp in (8, 4, 2, 1):
            r = run_cli(["show", "--cmd", f"vllm serve {folder} -tp {tp}", "--gpu", "NVIDIA H200",
                         "--gpu-count", "8", "--json"])
            if r["status"] != "refused":
                break
        j = r.pop("json", None) or {}
        rows.append({"model": folder.name, "tp": tp, **{k: v for k, v in r.items() if k != "argv"},
                     "architecture": (j.get("model") or {}).get("architecture"),
                     "attention": j.get("attention_backend"), "moe": (j.get("moe") or {}).get("backend")})
    return rows


def contract_tests(junit: Path) -> dict[str, dict[str, int]]:
    """Run the tests marked `contract`; per test file: passed / failed / skipped."""
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "contract", "-p", "no:cacheprovider",
                    "-n", str(min(os.cpu_count() or 1, 4)), "--dist", "loadfile", f"--junitxml={junit}"],
                   cwd=ROOT, capture_output=True, text=True, timeout=3600)
    out: dict[str, dict[str, int]] = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).iter("testcase"):
        name = case.get("classname", "").rsplit(".", 1)[-1]
        kind = ("failed" if case.find("failure") is not None or case.find("error") is not None else
                "skipped" if case.find("skipped") is not None else "passed")
        out.setdefault(name, {"passed": 0, "failed": 0, "skipped": 0})[kind] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-report", action="store_true", help="skip building the report")
    ap.add_argument("--no-tests", action="store_true", help="skip the contract-marked tests")
    ap.add_argument("--only", type=lambda t: t.split(","), default=None, metavar="PART[,PART]",
                    help=f"rerun only these parts ({', '.join(PARTS)}) into the existing --out")
    args = ap.parse_args()
    from diaglib import compat

    t0 = time.time()
    stamp = {"date": datetime.date.today().isoformat(),
             "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip()}
    out = Path(args.out)
    parts = set(args.only or PARTS)
    if parts - set(PARTS):
        ap.error(f"--only: unknown part(s) {', '.join(sorted(parts - set(PARTS)))}; the parts: {', '.join(PARTS)}")
    if args.only:
        try:
            result = json.loads(out.read_text())
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"--only merges into an existing contract: cannot read {out}: {e}")
        if result.get("vllm") != compat.installed():
            ap.error(f"{out} holds vLLM {result.get('vllm')}'s contract, this environment has {compat.installed()}")
    else:
        import importlib.metadata as md

        result = {"vllm": compat.installed(), **stamp, "python": sys.version.split()[0], "torch": md.version("torch")}
    if "commands" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            result["seed"] = {name: run_cli(argv) for name, argv in commands(
                SEED_MODEL, 8, "NVIDIA H20", report_dir=None if args.no_report else tmp).items()}
            result["dense"] = {name: run_cli(argv) for name, argv in
                               commands(DENSE, 1, "NVIDIA H200", report_dir=None).items()}
        for part in ("seed", "dense"):
            for row in result[part].values():
                row.pop("json", None)
    if "facts" in parts:
        result["facts"] = []
        for gpu in ("NVIDIA H20", "NVIDIA H200"):
            try:
                result["facts"].append(facts(gpu))
            except Exception as e:  # noqa: BLE001 - recorded, one line
                result["facts"].append({"gpu": gpu, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    if "zoo" in parts:
        result["zoo"] = zoo()
    if "tests" in parts:
        result["tests"] = {} if args.no_tests else contract_tests(Path(tempfile.gettempdir()) / "contract-junit.xml")
    result["verified"] = {name: verdict(result, name) for name in {**result["seed"], **result["dense"]}}
    if args.only:
        result.setdefault("partial_runs", []).append({**stamp, "parts": sorted(parts),
                                                      "seconds": round(time.time() - t0)})
    else:
        result["seconds"] = round(time.time() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    bad = [n for n, v in result["verified"].items() if v.startswith("FAILED")]
    print(f"vLLM {result['vllm']}: {len(result['verified']) - len(bad)} commands answered or refused cleanly, "
          f"{len(bad)} failed ({', '.join(bad) or 'none'}); {round(time.time() - t0)} s -> {args.out}")


def verdict(result: dict, name: str) -> str:
    """verified / refused: reason / FAILED: reason / answered (no contract tests ran) for one command."""
    rows = [result[p][name] for p in ("seed", "dense") if name in result[p]]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        return f"FAILED: {failed[0]['reason']}"
    tests = [result["tests"].get(t) for t in TOPICS.get(name, [])]
    tests = [t for t in tests if t]
    if any(t["failed"] for t in tests):
        return "FAILED: contract tests " + ", ".join(f for f, t in zip(TOPICS[name], tests) if t and t["failed"])
    refused = [r for r in rows if r["status"] == "refused"]
    seed_ok = rows and rows[0]["status"] == "ok"
    if not seed_ok and refused:
        return f"refused: {refused[0]['reason']}"
    return "verified" if any(t["passed"] for t in tests) else "answered"


if __name__ == "__main__":
    main()
