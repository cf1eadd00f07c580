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
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import DiagError
from ..secrets import REDACTED, SECRET_NAME, scrub, secret_values
from .classify import caller, faulting_kernel

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


def steps(work: Path, sanitizer: str = "compute-sanitizer") -> dict[str, Step]:
    """The debug-aid runs, their raw outputs under ``work/<step>/`` (``sanitizer``: the tool's path)."""
    trace = work / "trace"

    def memcheck(name: str) -> tuple[str, ...]:
        # --launch-timeout 0: the child imports vLLM for longer than the default 10 s before its first CUDA call
        return (sanitizer, "--tool", "memcheck", "--target-processes", "application-only", "--launch-timeout", "0",
                "--print-limit", "20", "--log-file", str(work / name / "sanitizer.txt"))

    return {
        "blocking": Step("blocking", {"CUDA_LAUNCH_BLOCKING": "1",
                                      "DIAGLIB_MEMORY_SNAPSHOT": str(work / "blocking" / "memory_snapshot.pickle")},
                         shows="the kernel at which the fault surfaces, launches made synchronous "
                               "(a fault inside a CUDA-graph replay still surfaces at the replay); "
                               "the caching allocator's history up to the fault"),
        "sanitizer": Step("sanitizer", {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, memcheck("sanitizer"),
                          "the first invalid access, its kernel and address (caching allocator off)"),
        "sanitizer-cached": Step("sanitizer-cached", {}, memcheck("sanitizer-cached"),
                                 "memcheck with the caching allocator on, run when it found nothing with it off "
                                 "(PyTorch's CUDA graphs need the allocator): accesses outside every cached "
                                 "block are still caught, stray ones inside a cached block are not"),
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


def clean(obj, secrets: list[str], _done: dict | None = None):
    """``obj`` (JSON-like) with secret-named variables' values redacted and secrets cut from every string.

    Shared objects stay shared (equal strings become one), so a re-pickled memory snapshot stays as
    small as the original.
    """
    done = {} if _done is None else _done
    key = obj if isinstance(obj, str) else id(obj)
    if key in done:
        return done[key][1]
    if isinstance(obj, Mapping):
        out = {k: REDACTED if _env_name(k) and SECRET_NAME.search(k) and isinstance(v, (str, int))
               else clean(v, secrets, done) for k, v in obj.items()}
    elif isinstance(obj, (list, tuple)):
        out = [clean(v, secrets, done) for v in obj]
    elif isinstance(obj, str):
        out = obj
        for s in secrets:
            out = out.replace(s, REDACTED)
        out = scrub(out)
    else:
        return obj
    done[key] = (obj, out)  # the original is kept alive so its id is not reused
    return out


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


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers only (what torch's allocator snapshot holds); refuses any class."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a memory snapshot holds plain data only")


def read_snapshot(path: Path) -> dict | None:
    """torch's caching-allocator snapshot (``_dump_snapshot``) as plain data, or None if absent or unreadable."""
    try:
        with open(path, "rb") as f:
            data = _PlainUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError):
        return None
    return data if isinstance(data, dict) and "segments" in data else None


def snapshot_summary(snap: dict, last: int = 12) -> dict:
    """Reserved and allocated bytes, the largest live blocks and the last allocator events before the dump."""
    def frame(frames):
        f = next((f for f in frames or [] if "site-packages/torch" not in str(f.get("filename", ""))), None)
        return f"{f.get('name')} ({Path(str(f.get('filename'))).name}:{f.get('line')})" if f else None

    blocks = [b for seg in snap["segments"] for b in seg.get("blocks", []) if b.get("state") == "active_allocated"]
    largest = sorted(blocks, key=lambda b: -int(b.get("size", 0)))[:8]
    events = [e for trace in snap.get("device_traces", []) for e in trace]
    return {
        "segments": len(snap["segments"]),
        "reserved_bytes": sum(int(s.get("total_size", 0)) for s in snap["segments"]),
        "allocated_bytes": sum(int(b.get("size", 0)) for b in blocks),
        "largest_blocks": [{"bytes": int(b.get("size", 0)), "address": hex(int(b.get("address", 0))),
                            "allocated_in": frame(b.get("frames"))} for b in largest],
        "events": len(events),
        "last_events": [{"action": e.get("action"), "bytes": int(e.get("size", 0)),
                         "address": hex(int(e.get("addr", 0))), "in": frame(e.get("frames"))}
                        for e in events[-last:]],
    }


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


def run_steps(engine, failing_probe, work: str | Path, *, names=DEFAULT_STEPS, gpus=None,
              probe_timeout_s: float = 600, ready_timeout_s: float = 1800,
              sanitizer: str = "compute-sanitizer") -> list[StepResult]:
    """Re-run ``failing_probe`` (diaglib.live.probe.Probe) on ``engine`` once per step, each in a fresh child.

    When memcheck names no kernel with the caching allocator off (say the engine could not capture its CUDA
    graphs without it), ``sanitizer-cached`` runs next.
    """
    work = Path(work)
    table = steps(work, sanitizer)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise DiagError(f"unknown evidence step {unknown[0]!r}; known: {', '.join(table)}")
    results = []
    queue = list(names)
    while queue:
        step = table[queue.pop(0)]
        result = _run_step(step, engine, failing_probe, work, gpus, probe_timeout_s, ready_timeout_s)
        results.append(result)
        if (step.name == "sanitizer" and result.skipped is None and "sanitizer-cached" not in names
                and not _named_access(result)):
            queue.insert(0, "sanitizer-cached")
    return results


def stored(work: str | Path, step: str, key: str) -> bool:
    """Whether ``work`` already holds the result of ``step`` for probe ``key`` (re-runs reuse it)."""
    from . import store

    return key in store.done_keys(Path(work) / step / "records.jsonl", f"evidence-{step}")


def engine_record(work: str | Path, steps) -> dict | None:
    """The first engine record of the steps' runs: the engine that was actually built."""
    from . import store

    return next((r for s in steps for r in store.read(Path(work) / s / "records.jsonl")
                 if r.get("type") == "engine"), None)


def _named_access(result: StepResult) -> bool:
    """Whether a memcheck run reached the probe and named the kernel of an invalid access."""
    first = sanitizer_first_error((result.sanitizer or "") + "\n" + result.log)
    return (result.skipped is None and (result.record or {}).get("phase") == "probe"
            and first is not None and first["kernel"] is not None)


def _run_step(step: Step, engine, failing_probe, work: Path, gpus, probe_timeout_s, ready_timeout_s) -> StepResult:
    from . import probe, store

    d = work / step.name
    d.mkdir(parents=True, exist_ok=True)
    if not stored(work, step.name, failing_probe.key):  # a step already run in this work folder is read back
        if step.launcher and shutil.which(step.launcher[0]) is None:
            return StepResult(step, None, "", skipped=f"{step.launcher[0]} is not on PATH")
        for v in step.env.values():
            if v.startswith(str(work)):
                Path(v).parent.mkdir(parents=True, exist_ok=True)
        probe.run([failing_probe], engine, store_path=d / "records.jsonl", run_name=f"evidence-{step.name}",
                  gpus=gpus, probe_timeout_s=probe_timeout_s, ready_timeout_s=ready_timeout_s, log_dir=d / "logs",
                  env=step.env, launcher=list(step.launcher))
    recs = store.read(d / "records.jsonl")
    probes = [r for r in recs if r.get("type") == "probe"]
    log = "\n".join(p.read_text(errors="replace") for p in sorted((d / "logs").glob("*.log")))
    report = d / "sanitizer.txt"
    return StepResult(step, probes[-1] if probes else None, log,
                      sanitizer=report.read_text(errors="replace") if step.launcher and report.exists() else None)


# --- the bundle -------------------------------------------------------------------------------------

def findings(results: list[StepResult], work: Path) -> dict:
    """The bundle's facts: per-step outcomes, faulting kernel, sanitizer error, Inductor source, input dump."""
    out: dict = {"steps": [], "kernel": None, "kernel_from": None, "sanitizer_error": None,
                 "inductor_source": None, "input_dump": None, "memory": None, "memory_snapshot": None}
    sanitizer_step = None
    for r in results:
        rec = r.record or {}
        row = {"step": r.step.name, "shows": r.step.shows, "env": r.step.env, "launcher": list(r.step.launcher),
               "skipped": r.skipped, "outcome": rec.get("outcome"), "detail": rec.get("detail"),
               "kernel": rec.get("kernel"), "surfaced_at": rec.get("surfaced_at"),
               "caller": rec.get("caller") or (caller(r.log) if rec.get("outcome") not in (None, "ok") else None)}
        if r.skipped is None and not rec:
            row["detail"] = "the runner recorded no probe"
        if r.step.launcher:
            first = sanitizer_first_error((r.sanitizer or "") + "\n" + r.log)
            row["sanitizer_error"] = first
            named = bool(first and first["kernel"])  # an invalid access in a kernel beats an API error
            if first and (out["sanitizer_error"] is None or (named and not out["sanitizer_error"]["kernel"])):
                out["sanitizer_error"], sanitizer_step = first, r.step.name
        out["steps"].append(row)
        out["input_dump"] = out["input_dump"] or input_dump(r.log)
        out["memory"] = out["memory"] or rec.get("memory")
        snap = read_snapshot(Path(rec["memory_snapshot"])) if rec.get("memory_snapshot") else None
        if snap and out["memory_snapshot"] is None:
            out["memory_snapshot"] = {"step": r.step.name, **snapshot_summary(snap)}
    san = out["sanitizer_error"]
    if san and san.get("kernel"):
        cached = " with the caching allocator on" if sanitizer_step == "sanitizer-cached" else ""
        out["kernel"], out["kernel_from"] = san["kernel"], f"compute-sanitizer memcheck{cached}"
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
             env: Mapping[str, str] | None = None, classes=None, facts: dict | None = None) -> Path:
    """Write the bundle folder: summary.html, summary.json, environment.json, steps/<step>/ (scrubbed).

    ``about``: what was re-run (scenario command, tokens, switches, bisection result...), shown as given.
    ``env``: the environment the runs inherited (default: this process's), redacted.
    ``classes``: diaglib.live.observed.fit's frame, shown as the known classes that fit.
    ``facts``: ``findings(results, work)`` when the caller has it already (it is not worked out twice).
    """
    out, work = Path(out), Path(work)
    if out.resolve() == work.resolve() or work.resolve() in out.resolve().parents:
        raise DiagError("the bundle folder must not lie inside the raw work folder")
    env = dict(os.environ if env is None else env)
    for r in results:
        env.update(r.step.env)
    secrets = secret_values(env)
    facts = clean(facts if facts is not None else findings(results, work), secrets)
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
    snap_step = (facts["memory_snapshot"] or {}).get("step")
    rec = next((r.record for r in results if r.step.name == snap_step), None)
    snap = read_snapshot(Path(rec["memory_snapshot"])) if rec else None
    if snap:  # rewritten from plain data with secrets cut: https://pytorch.org/memory_viz opens it
        (out / "memory_snapshot.pickle").write_bytes(pickle.dumps(clean(snap, secrets)))
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


def _snapshot_html(snap: dict | None) -> str:
    if not snap:
        return "<p>none recorded</p>"
    gib = 1 << 30
    head = (f"<p>From the {_e(snap['step'])} run: {snap['segments']} segments, "
            f"{snap['reserved_bytes'] / gib:.2f} GiB reserved, {snap['allocated_bytes'] / gib:.2f} GiB allocated, "
            f"{snap['events']} allocator events recorded.</p>")
    rows = "".join(f"<tr><td>{_e(e['action'])}</td><td>{e['bytes']:,}</td><td>{_e(e['address'])}</td>"
                   f"<td>{_e(e['in'])}</td></tr>" for e in snap["last_events"])
    return head + ("<p>Last events before the dump:</p><table><tr><th>action</th><th>bytes</th><th>address</th>"
                   f"<th>in</th></tr>{rows}</table>" if rows else "")


def _e(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def summary_html(data: dict) -> str:
    """The summary page: every embedded string escaped, no scripts."""
    about = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v if isinstance(v, str) else json.dumps(v, default=str))}</td></tr>"
                    for k, v in data["about"].items())
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(s.get(c))}</td>"
                         for c in ("step", "outcome", "kernel", "surfaced_at", "caller", "detail"))
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
        "<h2>Runs</h2><table><tr><th>step</th><th>outcome</th><th>kernel</th><th>surfaced at</th>"
        "<th>called from (outside torch/Triton)</th><th>detail</th>"
        f"<th>shows / skipped</th></tr>{rows}</table>",
        "<h2>compute-sanitizer: first error</h2>"
        + (f"<pre>{_e(san['lines'])}</pre>" if san else "<p>none recorded</p>"),
        f"<h2>Inductor source</h2>{src_html}",
        "<h2>Engine input dump</h2>"
        + (f"<pre>{_e(data['input_dump'])}</pre>" if data["input_dump"] else "<p>none in the logs</p>"),
        "<h2>Known bug classes</h2>" + _classes_html(data.get("classes") or []),
        "<h2>Memory</h2>"
        + (f"<pre>{_e(json.dumps(data['memory'], indent=1))}</pre>" if data["memory"] else "<p>none recorded</p>"),
        "<h2>Caching-allocator snapshot</h2>" + _snapshot_html(data.get("memory_snapshot")),
        "<p>Files: summary.json, environment.json (redacted), steps/&lt;step&gt;/log.txt, record.json, "
        "sanitizer.txt; memory_snapshot.pickle (plain data, open it in https://pytorch.org/memory_viz); "
        "torch_trace/ (tlparse input)</p></body></html>",
    ]
    return "\n".join(parts) + "\n"
