"""The crash a log records: which traceback is the root, what failed, where, in which kernel, and when.

Several processes report one fault (the worker raises it, the engine core passes it on as ``Worker failed
with error ...``, the API server as ``EngineDeadError``). The root is the traceback whose error is the most
specific (illegal memory access > other CUDA error > out of memory > compile error > Python error; a
passed-on error counts last, and before it one vLLM logged as a warning and survived, such as a failed kernel
warm-up), earliest first. Its innermost frame is where the error *surfaced*: for an
asynchronous CUDA fault that is a later launch or synchronisation, not necessarily the faulting kernel.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from . import tracebacks
from .parse import LogFacts, sanitizer_kernel

SEVERITY = ("illegal_memory_access", "cuda_error", "out_of_memory", "compile_error", "python_error")
_CUDA_TEXT = re.compile(r"(?:CUDA (?:driver )?error|Triton Error \[CUDA\]|CUDA_ERROR_\w+|cudaError\w+|"
                        r"an illegal memory access|device-side assert|misaligned address|"
                        r"unspecified launch failure|CUDA out of memory)[^\n]*", re.IGNORECASE)
# Frames that run only while the engine starts (profile/dummy runs, graph capture, warm-up, loading).
_STARTUP = re.compile(r"^(?:profile_run|_dummy_run|_dummy_sampler_run|determine_available_memory|"
                      r"determine_num_available_blocks|capture_model|compile_or_warm_up_model|load_model|"
                      r"initialize_from_config|_initialize_kv_caches|init_device|_warmup\w*)$")
_SERVING = re.compile(r"^(?:execute_model|step|step_with_batch_queue|sample_tokens|_model_forward)$")


@dataclass
class Crash:
    outcome: str
    exc_type: str
    message: str
    cuda_error: str | None
    stream: str
    line: int
    surfaced_at: str | None
    surfaced_code: str | None
    surfaced_kind: str  # sync, launch or other
    surfaced_why: str
    caller: str | None
    kernel: str | None
    kernel_kind: str | None
    kernel_from: str | None
    during: str  # serving step, start-up or unknown
    async_hint: bool  # the message itself warns that the report may be asynchronous
    reported_by: list[str]
    traceback: str

    def as_dict(self) -> dict:
        return asdict(self)


def _rank(tb: tracebacks.Traceback) -> tuple:
    return (tb.propagated, tb.survived, SEVERITY.index(tb.outcome), tb.line)


def root(facts: LogFacts) -> tracebacks.Traceback | None:
    """The traceback that reports the fault first-hand (see the module docstring)."""
    return min(facts.tracebacks, key=_rank) if facts.tracebacks else None


def crash(facts: LogFacts) -> Crash | None:
    """The crash, or None when the log holds no traceback and no CUDA error line."""
    tb = root(facts)
    san = sanitizer_kernel(facts)
    if tb is None:
        line = next(((n, t) for n, t in facts.errors if _CUDA_TEXT.search(t)), None)
        if line is None and not san:
            return None
        text = line[1] if line else "compute-sanitizer reported an invalid access"
        m = _CUDA_TEXT.search(text)
        return Crash(_outcome(text), "", text, m.group(0) if m else None, "", line[0] if line else 0, None, None,
                     "other", "no traceback in the log", None, san, "GPU kernel" if san else None,
                     "compute-sanitizer" if san else None, "serving step" if facts.dumps else "unknown",
                     "asynchronously reported" in text, [], "")
    full = f"{tb.exc_type}: {tb.message}"
    m = _CUDA_TEXT.search(full)
    kernel, kind = tracebacks.kernel(tb)
    kernel_from = "the traceback's launching frame" if kernel else None
    if san:
        kernel, kind, kernel_from = san, "GPU kernel", "compute-sanitizer memcheck"
    skind, swhy = tracebacks.surfaced_kind(tb)
    inner = tb.innermost
    callers = [f for f in tb.frames if not re.search(r"/(?:torch|triton)/|^<", f.path)]
    reporters = sorted({t.stream or "(no process prefix)" for t in facts.tracebacks
                        if t.outcome == tb.outcome or t.propagated})
    return Crash(tb.outcome, tb.exc_type, tb.message, m.group(0).strip() if m else None, tb.stream, tb.line,
                 inner.where if inner else None, inner.code if inner else None, skind, swhy,
                 callers[-1].where if callers else None, kernel, kind, kernel_from, _during(facts, tb),
                 "asynchronously reported" in tb.message or "CUDA_LAUNCH_BLOCKING" in tb.message, reporters, tb.text)


def _outcome(text: str) -> str:
    t = tracebacks.Traceback("", 0, exc_type="", message=text)
    return t.outcome


def _during(facts: LogFacts, tb: tracebacks.Traceback) -> str:
    funcs = [f.func for f in tb.frames]
    if any(_STARTUP.match(f) for f in funcs):
        return "start-up"
    if facts.dumps or any(_SERVING.match(f) for f in funcs):
        return "serving step"
    return "unknown"
