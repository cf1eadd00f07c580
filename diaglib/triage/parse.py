"""What a vLLM server log says, in one pass: :func:`parse` -> :class:`LogFacts`.

Read (each from the logging call that writes it, 0.10.0 .. 0.33.0): the version (``vLLM API server version
X``, 0.10-0.14; ``vLLM server version X, serving model M`` or the logo's ``version X``, 0.15+; the engine
line's ``(vX)``; ``collect_env``'s ``vLLM Version: X``), ``non-default args: {...}`` (entrypoints utils /
startup), the engine config line ``Initializing a V1 LLM engine (vX) with config: model=..., ...``
(``VllmConfig.__str__``: its compilation_config is pydantic JSON in 0.10, a Python dict from 0.11), the
scheduler's ``Chunked prefill is enabled with max_num_batched_tokens=N``, ``Using max model len N``,
``GPU KV cache size: N tokens``, request logs (prompt token ids where printed), the GPU where the log names
one from diaglib's catalog, every traceback (diaglib.triage.tracebacks), compute-sanitizer's report, and
the crash input dump (diaglib.triage.dump). The last engine start before the crash is the one that counts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import DiagError
from ..gpus import catalog
from ..live import classify
from . import dump, lines, tracebacks, values

ENGINE = re.compile(r"Initializing a V1 LLM engine \(v(?P<version>[^)\s]+)\) with config: (?P<config>.*)")
VERSION_LINES = [
    ("engine config line", ENGINE),
    ("API server line", re.compile(r"vLLM (?:API )?server version (?P<version>\d[\w.+\-]*)")),
    ("start-up logo", re.compile(r"█\s+version\s+(?P<version>\d[\w.+\-]*)")),
    ("collect_env", re.compile(r"^vLLM Version\s*:\s*(?P<version>\d[\w.+\-]*)")),
    ("pip", re.compile(r"^vllm(?:==|\s+)(?P<version>\d+\.\d+[\w.+\-]*)\s*$")),
]
SERVED = re.compile(r"vLLM server version \S+, serving model (?P<model>\S+)")
LOGO_MODEL = re.compile(r"█\s+model\s+(?P<model>\S+)")
NON_DEFAULT = re.compile(r"non-default args: (?P<args>\{.*)")
BUDGET = re.compile(r"Chunked prefill is enabled with max_num_batched_tokens=(?P<n>\d+)")
MAX_MODEL_LEN = re.compile(r"Using max model len (?P<n>\d+)")
KV_TOKENS = re.compile(r"GPU KV cache size: (?P<n>[\d,]+) tokens")
REQUEST = re.compile(r"(?:Received request|Request) (?P<id>\S+?):? .*?prompt_token_ids: (?P<ids>\[[^\]]*\]?)")
SANITIZER = re.compile(r"^=+ ")
# a line is looked at closer only if it holds one of these (substring tests: 50 MB logs stay fast)
_KEYS = ("rror", "LLM engine (v", "Dumping ", "non-default args", "ersion", "█", "max_num_batched_tokens=",
         "max model len", "KV cache size", "prompt_token_ids: [", "NVIDIA", "xception", "illegal", "CUDA", "fatal")
IMPORTANT = re.compile(r"illegal memory access|CUDA error|CUDA driver error|Triton Error|AcceleratorError|"
                       r"device-side assert|out of memory|EngineDeadError|Worker failed|fatal error", re.IGNORECASE)


@dataclass
class EngineStart:
    line: int
    version: str
    config: dict  # VllmConfig.__str__ fields (diaglib.triage.values.fields)

    @property
    def compilation(self) -> dict:
        c = self.config.get("compilation_config")
        return c if isinstance(c, dict) else {}


@dataclass
class LogFacts:
    """Everything :func:`parse` found; absent facts are None / empty."""

    lines: int = 0
    version: str | None = None
    version_from: str | None = None
    model: str | None = None
    non_default_args: dict | None = None
    engines: list[EngineStart] = field(default_factory=list)
    budget: int | None = None
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    gpus: dict[str, int] = field(default_factory=dict)
    prompts: list[dict] = field(default_factory=list)
    tracebacks: list[tracebacks.Traceback] = field(default_factory=list)
    dumps: list[dump.StepDump] = field(default_factory=list)
    sanitizer: list[str] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    processes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def engine(self) -> EngineStart | None:
        """The engine start that crashed: the last one before the first crash dump / fatal traceback."""
        if not self.engines:
            return None
        crash = self.crash_line
        before = [e for e in self.engines if crash is None or e.line <= crash]
        return (before or self.engines)[-1]

    @property
    def crash_line(self) -> int | None:
        if self.dumps:
            return self.dumps[0].line
        fatal = [t for t in self.tracebacks if not t.survived] or self.tracebacks
        bad = [t.line for t in fatal if t.outcome != "python_error"]
        return bad[0] if bad else (fatal[0].line if fatal else None)

    @property
    def dump(self) -> dump.StepDump | None:
        return self.dumps[0] if self.dumps else None

    @property
    def gpu(self) -> str | None:
        """The catalog GPU the log names most often."""
        return max(self.gpus, key=self.gpus.get) if self.gpus else None

    @property
    def found(self) -> list[str]:
        """What kinds of facts the log held (for 'nothing recognised' and the report's header)."""
        out = [name for name, ok in (
            ("version", self.version), ("non-default args", self.non_default_args is not None),
            ("engine config", self.engines), ("traceback", self.tracebacks), ("input dump", self.dumps),
            ("compute-sanitizer", self.sanitizer), ("budget", self.budget), ("GPU", self.gpus),
            ("requests", self.prompts)) if ok]
        return out


def _gpu_pattern() -> tuple[re.Pattern, dict[str, str]]:
    """One pattern for every catalog GPU name (spaces may be underscores, as in vLLM's config file names)."""
    names = sorted(catalog(), key=len, reverse=True)
    norm = {n.replace(" ", "_"): n for n in names}
    body = "|".join(re.escape(n).replace(r"\ ", "[ _]") for n in names)
    return re.compile(rf"(?<![\w-])(?:{body})(?![\w-])"), norm


def parse(text: str) -> LogFacts:
    """Read a log (see the module docstring). A DiagError when nothing in it is recognisable."""
    facts = LogFacts()
    gpu_rx, gpu_names = _gpu_pattern()
    pending_stats: list[str] = []
    heads: list[EngineStart] = []

    procs = facts.processes

    def scan(recs):
        ln = None
        for ln in recs:
            key = ln.stream
            procs[key] = procs.get(key, 0) + 1
            t = ln.text
            if not (t.startswith("=") or any(map(t.__contains__, _KEYS))) and ln.level not in ("ERROR", "CRITICAL",
                                                                                               "FATAL"):
                yield ln
                continue
            if ln.level in ("ERROR", "CRITICAL", "FATAL") or ("rror" in t and IMPORTANT.search(t)):
                if len(facts.errors) < 200:
                    facts.errors.append((ln.n, t[:500]))
            if "LLM engine (v" in t:
                m = ENGINE.search(t)
                if m:
                    facts.engines.append(EngineStart(ln.n, m.group("version"), {"_raw": m.group("config")}))
                    _version(facts, m.group("version"), "engine config line")
                elif m := dump.HEAD.search(t):
                    heads.append(EngineStart(ln.n, m.group("version"), {"_raw": m.group("config")}))
                    _version(facts, m.group("version"), "crash dump")
            elif "Dumping scheduler output" in t:
                step = dump.read(t, ln.n)
                if step is not None:
                    facts.dumps.append(step)
            elif "Dumping scheduler stats" in t:
                if facts.dumps and not facts.dumps[-1].stats:
                    facts.dumps[-1].stats = dump.read_stats(t)
                else:
                    pending_stats.append(t)
            elif "non-default args: " in t:
                m = NON_DEFAULT.search(t)
                v = values.value(m.group("args")) if m else None
                if isinstance(v, dict):
                    facts.non_default_args = {str(k): a for k, a in v.items()}
            elif "version" in t or "Version" in t:
                for name, rx in VERSION_LINES[1:]:
                    m = rx.search(t)
                    if m:
                        _version(facts, m.group("version"), name)
                        break
                m = SERVED.search(t) or LOGO_MODEL.search(t)
                if m:
                    facts.model = m.group("model")
            elif "model " in t and "█" in t:
                m = LOGO_MODEL.search(t)
                if m:
                    facts.model = m.group("model")
            if "max_num_batched_tokens=" in t:
                m = BUDGET.search(t)
                if m:
                    facts.budget = int(m.group("n"))
            elif "max model len" in t:
                m = MAX_MODEL_LEN.search(t)
                if m:
                    facts.max_model_len = int(m.group("n"))
            elif "KV cache size" in t:
                m = KV_TOKENS.search(t)
                if m:
                    facts.kv_cache_tokens = int(m.group("n").replace(",", ""))
            elif "prompt_token_ids: [" in t:
                m = REQUEST.search(t)
                if m:
                    ids = m.group("ids")
                    complete = ids.endswith("]")
                    n = ids.count(",") + 1 if ids.strip("[]").strip() else 0
                    facts.prompts.append({"line": ln.n, "request": m.group("id"), "tokens": n,
                                          "exact": complete})
            if "NVIDIA" in t:
                m = gpu_rx.search(t)
                if m:
                    name = gpu_names[m.group(0).replace(" ", "_")]
                    facts.gpus[name] = facts.gpus.get(name, 0) + 1
            if t.startswith("=") and SANITIZER.match(t) and len(facts.sanitizer) < 400:
                facts.sanitizer.append(t)
            yield ln
        facts.lines = ln.n if ln is not None else 0

    facts.tracebacks = tracebacks.extract(scan(lines.records(text)))
    if not facts.engines and heads:
        facts.engines = heads[:1]
        facts.notes.append("no engine start in the log: the engine config is read from the crash dump")
    if facts.dumps and not facts.dumps[0].stats and pending_stats:
        facts.dumps[0].stats = dump.read_stats(pending_stats[0])
    for e in facts.engines:
        e.config = values.fields(e.config["_raw"]) if e is facts.engine else {"_raw": e.config["_raw"]}
    if len(facts.engines) > 1:
        facts.notes.append(f"{len(facts.engines)} engine starts in the log; the one at line {facts.engine.line} "
                           "(the last before the crash) is used")
    if len(facts.dumps) > 1:
        facts.notes.append(f"{len(facts.dumps)} crash input dumps; the first (line {facts.dumps[0].line}) is used")
    if not facts.found and not facts.errors:
        raise DiagError("nothing in this log is recognisable as vLLM's (no version, arguments, engine config, "
                        "traceback or input dump)")
    return facts


def _version(facts: LogFacts, v: str, source: str) -> None:
    """Keep the most authoritative version seen (the engine line over the others), first seen first."""
    rank = [n for n, _ in VERSION_LINES] + ["crash dump"]
    if facts.version is None or rank.index(source) < rank.index(facts.version_from):
        facts.version, facts.version_from = v, source


def sanitizer_kernel(facts: LogFacts) -> str | None:
    """The kernel compute-sanitizer names in the log, if it ran."""
    return classify.faulting_kernel("\n".join(facts.sanitizer)) if facts.sanitizer else None
