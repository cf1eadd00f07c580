"""Evidence bundles: re-run a failing probe under debug aids and gather what they show into one folder.

Steps (each a fresh crash-isolated run through diaglib.live.probe): ``blocking`` (CUDA_LAUNCH_BLOCKING=1:
the fault surfaces at its kernel, except inside CUDA-graph replays), ``sanitizer`` (compute-sanitizer
memcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1: the first invalid access and its kernel), ``trace``
(TORCH_TRACE for tlparse, with a private vLLM cache so the Inductor sources of this run are at hand),
optionally ``debuglog`` (VLLM_LOGGING_LEVEL=DEBUG) and ``coredump`` (CUDA core dump on exception).
Raw outputs stay in a work folder; the bundle holds only scrubbed copies: no secret-named variable's
value, no token-like string, every string escaped in the summary page.
"""
from __future__ import annotations

import html
import inspect
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import DiagError
from .live.classify import faulting_kernel
from .secrets import REDACTED, SECRET_NAME, scrub, secret_values

INDUCTOR_KERNEL = re.compile(r"^triton_(?:poi|red|per|tem|for)_\w+$")
# An error header of compute-sanitizer: "========= Invalid __global__ write of size 4 bytes", "========= Program hit
# cudaErrorIllegalAddress ...", not its banner or closing summary; indented lines below it describe it.
_SANITIZER_ERROR = re.compile(r"^=+ (?!COMPUTE-SANITIZER|ERROR SUMMARY|LEAK SUMMARY|Target application)(\S[^\n]*)$",
                              re.M)
_DUMP = re.compile(r"Dumping (?:input data for V1 LLM engine|scheduler output for model execution|scheduler stats)")


@dataclass(frozen=True)
class Step:
    """One re-run of the failing probe: extra env vars, an optional launcher (argv prefix), what it shows."""

    name: str
    env: dict[str, str]
    launcher: tuple[str, ...] = ()
    shows: str = ""


def steps(work: Path) -> dict[str, Step]:
    """The debug-aid runs, their raw outputs under ``work/<step>/``."""
    san = work / "sanitizer"
    trace = work / "trace"
    return {
        "blocking": Step("blocking", {"CUDA_LAUNCH_BLOCKING": "1"},
                         shows="the kernel at which the fault surfaces, launches made synchronous "
                               "(a fault inside a CUDA-graph replay still surfaces at the replay)"),
        "sanitizer": Step("sanitizer", {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
                          ("compute-sanitizer", "--tool", "memcheck", "--target-processes", "all",
                           "--print-limit", "20", "--log-file", str(san / "sanitizer.txt")),
                          "the first invalid access, its kernel and address"),
        "trace": Step("trace", {"TORCH_TRACE": str(trace / "torch_trace"), "VLLM_CACHE_ROOT": str(trace / "vllm_cache"),
                                "TRITON_CACHE_DIR": str(trace / "triton_cache")},
                      shows="the Inductor source of the compiled graphs (tlparse input)"),
        "debuglog": Step("debuglog", {"VLLM_LOGGING_LEVEL": "DEBUG"}, shows="vLLM's debug log up to the fault"),
        "coredump": Step("coredump", {"CUDA_ENABLE_COREDUMP_ON_EXCEPTION": "1",
                                      "CUDA_COREDUMP_FILE": str(work / "coredump" / "core_%p.nvcudmp")},
                         shows="a GPU core dump for cuda-gdb"),
    }


DEFAULT_STEPS = ("blocking", "sanitizer", "trace")
TRACE_LIMIT = 200 << 20  # bytes of TORCH_TRACE logs copied into a bundle (larger ones stay in the work folder)


# --- secrets ----------------------------------------------------------------------------------------

def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment with secret-named variables and token-like values redacted."""
    return {k: REDACTED if SECRET_NAME.search(k) else scrub(str(v)) for k, v in sorted(env.items())}


def _env_name(key) -> bool:
    """An environment-variable-like key (HF_TOKEN), not a data field that happens to say "tokens"."""
    return isinstance(key, str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", key) is not None


def clean(obj, secrets: list[str]):
    """``obj`` (JSON-like) with secret-named variables' values redacted and secrets cut from every string."""
    if isinstance(obj, Mapping):
        return {k: REDACTED if _env_name(k) and SECRET_NAME.search(k) and isinstance(v, (str, int))
                else clean(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, REDACTED)
        return scrub(obj)
    return obj


# --- what the outputs say ---------------------------------------------------------------------------

def sanitizer_first_error(text: str) -> dict | None:
    """compute-sanitizer's first reported error: message, kernel, and the lines that describe it."""
    m = _SANITIZER_ERROR.search(text)
    if not m:
        return None
    block = [m.group(0)]
    for line in text[m.end() + 1:].splitlines()[:12]:
        if not re.match(r"^=+\s{2,}\S", line):
            break
        block.append(line)
    kernel = faulting_kernel("\n".join(block))
    return {"error": m.group(1), "kernel": kernel, "lines": "\n".join(block)}


def kernel_source(root: Path, kernel: str) -> tuple[str, str] | None:
    """(file, source) of the Triton kernel ``kernel`` in the generated code under ``root``, if any."""
    if not kernel or not root.is_dir():
        return None
    head = re.compile(rf"^(?P<indent>[ \t]*)def {re.escape(kernel)}\(", re.M)
    for path in sorted(root.rglob("*"), key=lambda p: (p.suffix != ".py", str(p))):
        if not path.is_file() or path.stat().st_size > 20_000_000:
            continue
        text = path.read_text(errors="replace")
        m = head.search(text)
        if not m:
            continue
        lines = text[:m.start()].splitlines()
        n = len(lines)
        while n and lines[n - 1].strip() and (lines[n - 1].lstrip().startswith(("@", ")"))
                                              or lines[n - 1][:1].isspace()):
            n -= 1  # the decorators above the def (Inductor's size hints and @triton.jit)
        start = len("\n".join(lines[:n])) + (1 if n else 0)
        indent = m.group("indent")
        body = text.find("\n", m.end())
        nxt = re.compile(rf"^{indent}\S", re.M).search(text, body + 1) if body >= 0 else None
        src = text[start:nxt.start() if nxt else len(text)]
        quote = src.find("'''")
        return str(path.relative_to(root)), (src[:quote] if quote > 0 else src).rstrip() + "\n"
    return None


def input_dump(log: str) -> str | None:
    """The engine's input dump on a crash (vLLM's dump_engine_exception log lines), if it wrote one."""
    lines = [ln[:20000] for ln in log.splitlines() if _DUMP.search(ln)]
    return "\n".join(lines) or None


# --- running the steps ------------------------------------------------------------------------------

@dataclass
class StepResult:
    """What one step produced: its probe record, its log, compute-sanitizer's report, or why it was skipped."""

    step: Step
    record: dict | None
    log: str
    skipped: str | None = None
    sanitizer: str | None = None


def _runner_takes_launcher() -> bool:
    from .live import probe

    return "launcher" in inspect.signature(probe.run).parameters


def run_steps(engine, failing_probe, work: str | Path, *, names=DEFAULT_STEPS, gpus=None,
              probe_timeout_s: float = 600, ready_timeout_s: float = 1800) -> list[StepResult]:
    """Re-run ``failing_probe`` (diaglib.live.probe.Probe) on ``engine`` once per step, each in a fresh child."""
    from .live import probe, store

    work = Path(work)
    table = steps(work)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise DiagError(f"unknown evidence step {unknown[0]!r}; known: {', '.join(table)}")
    results = []
    for name in names:
        step = table[name]
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        kw = {}
        if step.launcher:
            if not _runner_takes_launcher():
                results.append(StepResult(step, None, "", skipped="the probe runner cannot start a child under "
                                          "a launcher yet (diaglib.live.probe.run has no launcher argument)"))
                continue
            if shutil.which(step.launcher[0]) is None:
                results.append(StepResult(step, None, "", skipped=f"{step.launcher[0]} is not on PATH"))
                continue
            kw["launcher"] = list(step.launcher)
        for v in step.env.values():
            if v.startswith(str(work)):
                Path(v).parent.mkdir(parents=True, exist_ok=True)
        probe.run([failing_probe], engine, store_path=d / "records.jsonl", run_name=f"evidence-{name}",
                  gpus=gpus, probe_timeout_s=probe_timeout_s, ready_timeout_s=ready_timeout_s, log_dir=d / "logs",
                  env=step.env, **kw)
        recs = [r for r in store.read(d / "records.jsonl") if r.get("type") == "probe"]
        log = "\n".join(p.read_text(errors="replace") for p in sorted((d / "logs").glob("*.log")))
        san = work / "sanitizer" / "sanitizer.txt"
        results.append(StepResult(step, recs[-1] if recs else None, log,
                                  sanitizer=san.read_text(errors="replace") if name == "sanitizer" and san.exists()
                                  else None))
    return results


# --- the bundle -------------------------------------------------------------------------------------

def findings(results: list[StepResult], work: Path) -> dict:
    """The bundle's facts: per-step outcomes, faulting kernel, sanitizer error, Inductor source, input dump."""
    out: dict = {"steps": [], "kernel": None, "kernel_from": None, "sanitizer_error": None,
                 "inductor_source": None, "input_dump": None, "memory": None}
    for r in results:
        rec = r.record or {}
        row = {"step": r.step.name, "shows": r.step.shows, "env": r.step.env, "launcher": list(r.step.launcher),
               "skipped": r.skipped, "outcome": rec.get("outcome"), "detail": rec.get("detail"),
               "kernel": rec.get("kernel"), "surfaced_at": rec.get("surfaced_at")}
        if r.skipped is None and not rec:
            row["detail"] = "the runner recorded no probe"
        if r.sanitizer or r.step.name == "sanitizer":
            first = sanitizer_first_error((r.sanitizer or "") + "\n" + r.log)
            row["sanitizer_error"] = first
            if first and out["sanitizer_error"] is None:
                out["sanitizer_error"] = first
        out["steps"].append(row)
        out["input_dump"] = out["input_dump"] or input_dump(r.log)
        out["memory"] = out["memory"] or rec.get("memory")
    san = out["sanitizer_error"]
    if san and san.get("kernel"):
        out["kernel"], out["kernel_from"] = san["kernel"], "compute-sanitizer"
    else:
        for name in ("blocking", "trace", "debuglog", "coredump"):
            k = next((s["kernel"] for s in out["steps"] if s["step"] == name and s["kernel"]), None)
            if k:
                out["kernel"], out["kernel_from"] = k, f"the {name} run's log (where the fault surfaced)"
                break
    k = out["kernel"]
    if k and INDUCTOR_KERNEL.match(k):
        found = kernel_source(work / "trace", k)
        out["inductor_source"] = {"file": found[0], "source": found[1]} if found else None
    out["inductor_kernel"] = bool(k and INDUCTOR_KERNEL.match(k))
    return out


def assemble(out: str | Path, results: list[StepResult], work: str | Path, *, about: dict,
             env: Mapping[str, str] | None = None, classes=None) -> Path:
    """Write the bundle folder: summary.html, summary.json, environment.json, steps/<step>/ (scrubbed).

    ``about``: what was re-run (scenario command, tokens, switches, bisection result...), shown as given.
    ``env``: the environment the runs inherited (default: this process's), redacted.
    ``classes``: diaglib.observed.fit's frame, shown as the known classes that fit.
    """
    out, work = Path(out), Path(work)
    if out.resolve() == work.resolve() or work.resolve() in out.resolve().parents:
        raise DiagError("the bundle folder must not lie inside the raw work folder")
    env = dict(os.environ if env is None else env)
    for r in results:
        env.update(r.step.env)
    secrets = secret_values(env)
    facts = clean(findings(results, work), secrets)
    about = clean(dict(about), secrets)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        d = out / "steps" / r.step.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "log.txt").write_text(clean(r.log, secrets))
        (d / "record.json").write_text(json.dumps(clean(r.record, secrets), indent=2, default=str) + "\n")
        if r.sanitizer:
            (d / "sanitizer.txt").write_text(clean(r.sanitizer, secrets))
    trace = work / "trace" / "torch_trace"
    logs = sorted(p for p in trace.rglob("*") if p.is_file()) if trace.is_dir() else []
    if logs and sum(p.stat().st_size for p in logs) <= TRACE_LIMIT:
        for p in logs:  # tlparse input: `tlparse <bundle>/torch_trace/<file>`
            dest = out / "torch_trace" / p.relative_to(trace)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(clean(p.read_text(errors="replace"), secrets))
    if facts["inductor_source"]:
        (out / "inductor_kernel.py").write_text(facts["inductor_source"]["source"])
    if facts["input_dump"]:
        (out / "input_dump.txt").write_text(facts["input_dump"])
    data = {"about": about, **facts,
            "classes": [] if classes is None else clean(json.loads(classes.to_json(orient="records")), secrets)}
    (out / "summary.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / "environment.json").write_text(json.dumps(redact_env(env), indent=2) + "\n")
    (out / "summary.html").write_text(summary_html(data))
    return out


def _classes_html(classes: list[dict]) -> str:
    if not classes:
        return "<p>not compared</p>"
    rows = "".join("<tr>" + "".join(f"<td>{_e(c.get(k))}</td>" for k in ("id", "verdict", "why")) + "</tr>"
                   for c in classes)
    return f"<table><tr><th>class</th><th>verdict</th><th>why</th></tr>{rows}</table>"


def _e(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def summary_html(data: dict) -> str:
    """The summary page: every embedded string escaped, no scripts."""
    about = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v if isinstance(v, str) else json.dumps(v, default=str))}</td></tr>"
                    for k, v in data["about"].items())
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(s.get(c))}</td>" for c in ("step", "outcome", "kernel", "surfaced_at", "detail"))
        + f"<td>{_e(s['skipped'] or s['shows'])}</td></tr>" for s in data["steps"])
    san = data["sanitizer_error"]
    src = data["inductor_source"]
    kernel = data["kernel"]
    if kernel and data["inductor_kernel"]:
        src_html = (f"<p>From {_e(src['file'])}:</p><pre>{_e(src['source'])}</pre>" if src
                    else "<p>An Inductor kernel, but its source was not found in the trace run's cache.</p>")
    else:
        src_html = "<p>Not an Inductor kernel (or none named): no Inductor source applies.</p>"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>diaglib evidence</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{border:1px solid #ccc;"
        "padding:3px 6px;text-align:left;vertical-align:top}table{border-collapse:collapse}"
        "pre{background:#f6f6f6;padding:8px;overflow-x:auto}</style></head><body>",
        "<h1>Evidence: why the probe faults</h1>", f"<table>{about}</table>",
        f"<h2>Faulting kernel</h2><p><b>{_e(kernel or 'not identified')}</b>"
        + (f" (from {_e(data['kernel_from'])})" if kernel else "") + "</p>",
        "<h2>Runs</h2><table><tr><th>step</th><th>outcome</th><th>kernel</th><th>surfaced at</th><th>detail</th>"
        f"<th>shows / skipped</th></tr>{rows}</table>",
        "<h2>compute-sanitizer: first error</h2>"
        + (f"<pre>{_e(san['lines'])}</pre>" if san else "<p>none recorded</p>"),
        f"<h2>Inductor source</h2>{src_html}",
        "<h2>Engine input dump</h2>"
        + (f"<pre>{_e(data['input_dump'])}</pre>" if data["input_dump"] else "<p>none in the logs</p>"),
        "<h2>Known bug classes</h2>" + _classes_html(data.get("classes") or []),
        "<h2>Memory</h2>"
        + (f"<pre>{_e(json.dumps(data['memory'], indent=1))}</pre>" if data["memory"] else "<p>none recorded</p>"),
        "<p>Files: summary.json, environment.json (redacted), steps/&lt;step&gt;/log.txt, record.json"
        "</p></body></html>",
    ]
    return "\n".join(parts) + "\n"
