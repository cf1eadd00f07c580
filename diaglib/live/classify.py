"""Classify how a probe ended, from the child's exit, its report and the log lines it wrote meanwhile.

Outcomes: ok, illegal_memory_access, cuda_error, out_of_memory, compile_error, timeout, python_error,
killed (ended by a signal with no CUDA message: kill -9, the kernel's OOM killer, a segfault).
A CUDA fault is asynchronous: the Python frame that reports it is where it surfaced, not necessarily the
kernel that faulted (``surfaced_at`` vs ``kernel``).
"""
from __future__ import annotations

import re
import signal
from dataclasses import asdict, dataclass

from ..secrets import scrub

OUTCOMES = ("ok", "illegal_memory_access", "cuda_error", "out_of_memory", "compile_error", "timeout",
            "python_error", "killed")

# First match wins: an IMA inside an Inductor kernel is an IMA, not a compile error.
_PATTERNS = [
    ("illegal_memory_access", re.compile(
        r"illegal memory access|CUDA_ERROR_ILLEGAL_ADDRESS|cudaErrorIllegalAddress|"
        r"Invalid __global__ (?:write|read)|Invalid __shared__ (?:write|read)|illegal address", re.I)),
    ("out_of_memory", re.compile(
        r"CUDA out of memory|OutOfMemoryError|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY", re.I)),
    ("cuda_error", re.compile(
        r"CUDA error|CUDA_ERROR_\w+|cudaError\w+|device-side assert|AcceleratorError|CUBLAS_STATUS_\w+|"
        r"NCCL error|misaligned address|unspecified launch failure|"
        r"cutlass\w*[^\n]*Error Internal", re.I)),  # CUTLASS launch failing on an earlier, sticky fault
    ("compile_error", re.compile(
        r"torch\._dynamo\.exc\.\w+|torch\._inductor\.exc\.\w+|InductorError|BackendCompilerFailed|"
        r"triton\.compiler\.errors\.\w+|CompilationError|OutOfResources|ptxas (?:fatal|error)", re.I)),
]
_SANITIZER_KERNEL = re.compile(r"Invalid __\w+__ (?:write|read) of size \d+ bytes\s*\n=*\s*at (?:0x[0-9a-f]+ in )?"
                               r"(.+?)(?:\+0x[0-9a-f]+.*)?$", re.I | re.M)
_TRITON_KERNEL = re.compile(r"\b(triton_(?:poi|red|per|tem|for)_fused\w*)\b")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_RUNTIME = re.compile(r"/(?:torch|triton)/|^<")  # frames of the runtime that reports a fault, not of its caller


@dataclass
class Outcome:
    """One classified ending."""

    outcome: str
    detail: str
    kernel: str | None = None
    surfaced_at: str | None = None
    caller: str | None = None
    excerpt: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def outcome_of(text: str) -> str:
    """The outcome an error message reports by itself (the first pattern that matches), else python_error."""
    return next((name for name, rx in _PATTERNS if rx.search(text)), "python_error")


_GIB = {"B": 2**-30, "KiB": 2**-20, "MiB": 2**-10, "GiB": 1.0, "TiB": 2**10, "PiB": 2**20, "EiB": 2**30}
_ALLOC = {"asked": r"Tried to allocate ([\d.]+) ([KMGTPE]?i?B)", "total": r"total capacity of ([\d.]+) ([KMGTPE]?i?B)",
          "free": r"of which ([\d.]+) ([KMGTPE]?i?B) is free",
          "unallocated": r"([\d.]+) ([KMGTPE]?i?B) is reserved by PyTorch but unallocated"}


def allocation(text: str) -> dict[str, float]:
    """The sizes (GiB) PyTorch's out-of-memory message gives: asked, total, free, unallocated (those present)."""
    out = {}
    for key, rx in _ALLOC.items():
        m = re.search(rx, text)
        if m and m.group(2) in _GIB:
            out[key] = float(m.group(1)) * _GIB[m.group(2)]
    return out


def classify(log: str, *, returncode: int | None, timed_out: bool = False, report: dict | None = None,
             excerpt_lines: int = 30) -> Outcome:
    """Classify one probe.

    ``log``: what the child wrote while the probe ran; ``returncode``: None while the child still runs,
    negative for a signal; ``report``: the child's own result message, if it sent one
    (``{"status": "ok"}`` or ``{"status": "error", "exc_type", "message", "traceback"}``).
    """
    report = report or {}
    text = log + "\n" + report.get("traceback", "") + "\n" + report.get("message", "")
    if timed_out:
        return Outcome("timeout", "no answer within the time limit (hang or too slow)",
                       excerpt=_tail(log, excerpt_lines))
    if report.get("status") == "ok" and (returncode is None or returncode == 0):
        return Outcome("ok", "")  # the child synchronised the device before it reported
    for name, rx in _PATTERNS:
        m = rx.search(text)
        if m:
            return Outcome(name, _line_at(text, m.start()), kernel=faulting_kernel(text),
                           surfaced_at=surfaced_at(text), caller=caller(text),
                           excerpt=_around(text, m.start(), excerpt_lines))
    if report.get("status") == "error":
        detail = f"{report.get('exc_type', 'Exception')}: {report.get('message', '')}".strip()
        return Outcome("python_error", scrub(detail.splitlines()[0][:300]), surfaced_at=surfaced_at(text),
                       excerpt=_tail(text, excerpt_lines))
    if returncode is not None and returncode < 0:
        return Outcome("killed", _signal_name(-returncode), excerpt=_tail(log, excerpt_lines))
    if "Traceback (most recent call last)" in log:
        last = [ln for ln in log.strip().splitlines() if ln.strip()][-1]
        return Outcome("python_error", scrub(last[:300]), surfaced_at=surfaced_at(log),
                       excerpt=_tail(log, excerpt_lines))
    if returncode == 0 or returncode is None:
        return Outcome("python_error", "the child stopped answering without an error message",
                       excerpt=_tail(log, excerpt_lines))
    return Outcome("python_error", f"the child exited with status {returncode}", excerpt=_tail(log, excerpt_lines))


def faulting_kernel(text: str) -> str | None:
    """The kernel compute-sanitizer names, else the last Inductor-generated Triton kernel the log names."""
    m = _SANITIZER_KERNEL.search(text)
    if m:
        return _function_name(m.group(1).strip())
    names = _TRITON_KERNEL.findall(text)
    return names[-1] if names else None


def _function_name(demangled: str) -> str:
    """A demangled C++ function without its return type and parameter list: ``void ns::k<(int)2>(T::Params)``
    -> ``ns::k<(int)2>`` (template arguments kept: they name the instantiation)."""
    depth, cut = 0, len(demangled)
    for i, ch in enumerate(demangled):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and i:
            cut = i  # the parameter list starts at the first "(" outside template arguments
            break
    name = demangled[:cut].strip()
    head = re.match(r"[\w:]+ (?=[A-Za-z_])", name)  # a return type before the name (`void `)
    return name[head.end():] if head and "<" not in head.group(0) else name


def surfaced_at(text: str) -> str | None:
    """The innermost Python frame of the last traceback: where the error surfaced."""
    frames = _FRAME.findall(text)
    if not frames:
        return None
    path, line, func = frames[-1]
    return f"{func} ({path.rsplit('/', 1)[-1]}:{line})"


def caller(text: str) -> str | None:
    """The innermost frame of the last traceback outside torch and Triton: with CUDA_LAUNCH_BLOCKING=1,
    the code that launched the faulting kernel (vLLM's model, a custom op, a planted kernel)."""
    frames = [f for f in _FRAME.findall(text) if not _RUNTIME.search(f[0])]
    if not frames:
        return None
    path, line, func = frames[-1]
    return f"{func} ({path.rsplit('/', 1)[-1]}:{line})"


def _signal_name(num: int) -> str:
    try:
        name = signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
    hint = {"SIGKILL": " (kill -9 or the kernel's OOM killer)", "SIGSEGV": " (segmentation fault)",
            "SIGABRT": " (abort)", "SIGBUS": " (bus error)"}.get(name, "")
    return name + hint


def _line_at(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return scrub(text[start:end if end >= 0 else None].strip()[:300])


def _around(text: str, pos: int, n: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    before = text[:start].splitlines()[-(n // 2):]
    after = text[start:].splitlines()[: n - len(before)]
    return scrub("\n".join(before + after)[-6000:])


def _tail(text: str, n: int) -> str:
    return scrub("\n".join(text.rstrip().splitlines()[-n:])[-6000:])
