"""Python tracebacks out of a log, per writing process, and what each says about a crash.

Each process's lines are read on their own (workers interleave), with the logger header taken off
(vLLM's ``logger.exception`` prefixes every traceback line with it). A traceback yields its frames, the
exception and its message (several lines for CUDA errors), the kernel it names, and whether its innermost
frame launched a kernel or merely synchronised with the GPU (where an asynchronous fault surfaces).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..live import classify

_START = "Traceback (most recent call last):"
_FRAME = re.compile(r'\s*File "(?P<path>[^"]*)", line (?P<line>\d+), in (?P<func>\S+)')
_EXC = re.compile(r"(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Fault|Dead\w*)|"
                  r"[a-z_][\w]*(?:\.[\w]+)+)(?::\s?(?P<msg>.*))?$")
_CHAIN = ("The above exception was the direct cause of the following exception:",
          "During handling of the above exception, another exception occurred:")
_MARKER = re.compile(r"^\s*[~^]+\s*$")
_RANK = re.compile(r"^\[rank\d+\]:\s?")  # torch.distributed's prefix on a rank's stderr
MAX_MESSAGE_LINES = 12

# What a frame's code line launches: an Inductor kernel, a Triton JIT kernel, a custom op of vLLM's
# extensions (torch.ops._C / _moe_C / ...), a cuBLAS-backed aten op.
_LAUNCHES = [
    ("inductor triton kernel", re.compile(r"\b(triton_(?:poi|red|per|tem|for)_\w+)\.run\(")),
    ("triton kernel", re.compile(r"\b([A-Za-z_]\w*)\[\s*(?:grid|\(|lambda)")),
    ("vLLM custom op", re.compile(r"torch\.ops\.(_\w+)\.(\w+)")),
]
_RUNTIME = re.compile(r"/(?:torch|triton)/|^<")  # frames of the runtime under a launch
# Frames that wait for the GPU (an asynchronous fault surfaces there, whatever kernel made it).
_SYNC = re.compile(r"\.item\(\)|\.tolist\(\)|\.cpu\(\)|\.numpy\(\)|synchronize\(|\.wait\(|_to_list\(|"
                   r"get_output\(|\.to\([^)]*['\"]cpu|non_blocking|copy_\(|all_reduce|all_gather|broadcast\(|"
                   r"\bbarrier\(|torch\.cuda\.empty_cache|record_stream")
_SYNC_FUNCS = re.compile(r"synchronize|_to_list|tolist|item|wait|_bookkeeping_sync|_sample|get_output|"
                         r"all_reduce|all_gather|_sync")
_PROPAGATED = re.compile(r"Worker failed with error|please check the stack trace above|EngineCore encountered "
                         r"an issue|EngineDeadError|EngineGenerateError|WorkerProc hit an exception", re.IGNORECASE)


@dataclass
class Frame:
    path: str
    line: int
    func: str
    code: str = ""

    @property
    def where(self) -> str:
        return f"{self.func} ({self.path.rsplit('/', 1)[-1]}:{self.line})"


@dataclass
class Traceback:
    """One traceback: where in the log, which process, its frames and exception."""

    stream: str
    line: int
    frames: list[Frame] = field(default_factory=list)
    exc_type: str = ""
    message: str = ""
    cause_of_next: bool = False  # "The above exception was the direct cause of the following exception"
    level_src: str | None = None
    level: str | None = None  # the log level of the line it starts on, where it has one

    @property
    def innermost(self) -> Frame | None:
        return self.frames[-1] if self.frames else None

    @property
    def text(self) -> str:
        lines = [_START]
        for f in self.frames:
            lines.append(f'  File "{f.path}", line {f.line}, in {f.func}')
            if f.code:
                lines.append("    " + f.code)
        return "\n".join(lines + [f"{self.exc_type}: {self.message}" if self.message else self.exc_type])

    @property
    def outcome(self) -> str:
        """live.classify's name for what this traceback reports (illegal_memory_access, cuda_error, ...)."""
        return classify.outcome_of(f"{self.exc_type}: {self.message}")

    @property
    def survived(self) -> bool:
        """Whether vLLM logged it as a warning (or lower) and went on: caught, not what ended the process."""
        return self.level in ("DEBUG", "INFO", "WARNING")

    @property
    def propagated(self) -> bool:
        """Whether it only passes on an error raised elsewhere (a worker's, the engine core's)."""
        return bool(_PROPAGATED.search(self.message) or _PROPAGATED.search(self.exc_type))

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(outcome=self.outcome, propagated=self.propagated, survived=self.survived,
                 innermost=self.innermost.where if self.innermost else None)
        return d


def extract(lines) -> list[Traceback]:
    """Every traceback in ``lines`` (diaglib.triage.lines.Line records), in log order."""
    state: dict[str, dict] = {}
    done: list[Traceback] = []

    def close(key):
        st = state.pop(key, None)
        if st and st["tb"].frames:
            done.append(st["tb"])

    for ln in lines:
        key = ln.stream
        text = ln.text
        st = state.get(key)
        if st is None and "Traceback (most" not in text and "above exception" not in text:
            continue  # most lines: no traceback open in this process, none starting
        if text.startswith("[rank"):
            text = _RANK.sub("", text, count=1)
        stripped = text.strip()
        if stripped == _START or stripped.endswith(_START):
            chained = bool(st and st.get("chain"))
            close(key)
            if done and chained and done[-1].stream == key:
                done[-1].cause_of_next = True
            state[key] = {"tb": Traceback(key, ln.n, level_src=ln.src, level=ln.level), "phase": "frames", "msg": 0}
            continue
        if st is None:
            if stripped in _CHAIN and done and done[-1].stream == key:
                state[key] = {"tb": Traceback(key, ln.n), "phase": "chain", "chain": True}
            continue
        tb, phase = st["tb"], st["phase"]
        if phase == "chain":
            if stripped in _CHAIN or not stripped:
                continue
            state.pop(key)
            continue
        if phase == "frames":
            m = _FRAME.match(text)
            if m:
                tb.frames.append(Frame(m.group("path"), int(m.group("line")), m.group("func")))
                continue
            if text.startswith((" ", "\t")) and tb.frames:
                if not _MARKER.match(text) and not tb.frames[-1].code:
                    tb.frames[-1].code = stripped
                continue
            if not stripped:
                continue
            m = _EXC.match(stripped)
            if m:
                tb.exc_type, tb.message = m.group("type"), (m.group("msg") or "").strip()
                st["phase"] = "message"
                continue
            tb.exc_type, tb.message = "", stripped
            st["phase"] = "message"
            continue
        # phase == "message": continuation lines of the exception message, up to a blank line or a chain
        if stripped in _CHAIN:
            close(key)
            state[key] = {"tb": Traceback(key, ln.n), "phase": "chain", "chain": True}
            continue
        if not stripped or st["msg"] >= MAX_MESSAGE_LINES or (ln.src and ln.src != tb.level_src):
            close(key)
            continue
        tb.message = f"{tb.message}\n{stripped}" if tb.message else stripped
        st["msg"] += 1
    for key in list(state):
        close(key)
    done.sort(key=lambda t: t.line)
    return done


# --- what a traceback says --------------------------------------------------------------------------

def kernel(tb: Traceback) -> tuple[str | None, str | None]:
    """(kernel, kind) named by the innermost frame that launches one, else by the exception text."""
    for f in reversed(tb.frames):
        for kind, rx in _LAUNCHES:
            m = rx.search(f.code)
            if m:
                name = ".".join(g for g in m.groups() if g)
                if kind == "vLLM custom op" and m.group(1) == "vllm":
                    continue  # torch.ops.vllm.* are vLLM's Python-side wrappers, not kernels
                return name, kind
    named = classify.faulting_kernel(tb.text)
    return (named, "inductor triton kernel") if named else (None, None)


def surfaced_kind(tb: Traceback) -> tuple[str, str]:
    """How the innermost frame met the error: 'sync' (it waited for the GPU), 'launch' (a kernel launch
    reported it: a sticky earlier fault surfaces there too) or 'other' (a host-side error is raised where it is
    reported), with the reason in words."""
    f = tb.innermost
    if f is None:
        return "other", "no frame"
    if tb.outcome in ("python_error", "compile_error"):  # raised on the host, where it is reported
        return "other", f"{f.where} raised it" + (f" ({f.code})" if f.code else "")
    if _SYNC.search(f.code) or _SYNC_FUNCS.search(f.func):
        return "sync", f"{f.where} waits for the GPU ({f.code or f.func})"
    at = next((i for i in range(len(tb.frames) - 1, -1, -1)
               if any(rx.search(tb.frames[i].code) for _, rx in _LAUNCHES)), None)
    launching = tb.frames[at] if at is not None else None
    after = tb.frames[at + 1:] if at is not None else []
    # below the launching line only the launch itself: what it called, then the runtime's launcher frames
    only_launch = len(after) <= 4 and all(k == 0 or _RUNTIME.search(g.path) for k, g in enumerate(after))
    if launching is not None and only_launch:
        name, _ = kernel(tb)
        return "launch", f"the launch of {name or 'a kernel'} in {launching.where} reported it"
    for g in reversed(tb.frames[:-1]):
        if _SYNC.search(g.code):
            return "sync", f"{g.where} waits for the GPU ({g.code})"
    return "other", f"{f.where}" + (f" ({f.code})" if f.code else "")
