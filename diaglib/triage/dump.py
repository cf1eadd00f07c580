"""vLLM's dump of the step that crashed (logging_utils.dump_input, every V1 release) read back as a step.

``dump_engine_exception`` logs, at ERROR, the engine config, then ``Dumping scheduler output for model
execution: SchedulerOutput(...)`` (printed by ``prepare_object_to_dump``: NewRequestData and, from 0.11,
CachedRequestData through their ``anon_repr``), then ``Dumping scheduler stats: SchedulerStats(...)``.
From it: tokens per request, new vs cached requests, and each request's phase. A new request's phase is
exact (its prompt length and computed tokens are printed); a cached one's is exact where the release prints
``num_output_tokens`` (0.11+) and inferred from its token count otherwise (0.10: one token = a decode).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from . import values

DUMP = re.compile(r"Dumping scheduler output for model execution: (?P<obj>.*)")
STATS = re.compile(r"Dumping scheduler stats: (?P<obj>.*)")
HEAD = re.compile(r"Dumping input data for V1 LLM engine \(v(?P<version>[^)\s]+)\) with config: (?P<config>.*)")


@dataclass
class Request:
    req_id: str
    tokens: int
    new: bool
    computed_before: int | None
    prompt_len: int | None
    phase: str  # prefill-chunk, last-prefill-chunk, decode, or prefill (a chunk whose position is unknown)
    phase_from: str
    spec_tokens: int = 0
    resumed: bool = False


@dataclass
class StepDump:
    """The crashed step as vLLM dumped it."""

    line: int
    total_tokens: int
    requests: list[Request] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return len(self.requests)

    @property
    def max_query_len(self) -> int:
        return max((r.tokens for r in self.requests), default=0)

    def count(self, *phases: str) -> int:
        return sum(r.phase in phases for r in self.requests)

    @property
    def mix(self) -> str:
        """prefill, decode or mixed."""
        dec = self.count("decode")
        return "decode" if dec == self.num_reqs else "prefill" if dec == 0 else "mixed"

    def summary(self) -> str:
        """'8,192 tokens, 1 request (1 new): r0 8192 last-prefill-chunk (prompt 8192, 0 computed before)'."""
        new = sum(r.new for r in self.requests)
        head = (f"{self.total_tokens:,} tokens, {self.num_reqs} request{'s' * (self.num_reqs != 1)} "
                f"({new} new, {self.num_reqs - new} cached); {self.count('prefill-chunk', 'last-prefill-chunk', 'prefill')}"
                f" prefill, {self.count('decode')} decode")
        return head

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(num_reqs=self.num_reqs, max_query_len=self.max_query_len, mix=self.mix,
                 num_new=sum(r.new for r in self.requests), num_cached=sum(not r.new for r in self.requests),
                 num_prefill=self.count("prefill-chunk", "last-prefill-chunk", "prefill"),
                 num_decode=self.count("decode"), summary=self.summary())
        return d


def read(text: str, line: int = 0) -> StepDump | None:
    """The step from one ``Dumping scheduler output ...: SchedulerOutput(...)`` message (None if it is not one)."""
    m = DUMP.search(text)
    obj = values.value(m.group("obj") if m else text)
    if not isinstance(obj, values.Call) or obj.name != "SchedulerOutput":
        return None
    counts = {str(k): _int(v) for k, v in _dict(obj.get("num_scheduled_tokens")).items()}
    total = _int(obj.get("total_num_scheduled_tokens"))
    spec = {str(k): len(v) if isinstance(v, list) else 0 for k, v in _dict(obj.get("scheduled_spec_decode_tokens")).items()}
    step = StepDump(line, total if total is not None else sum(v or 0 for v in counts.values()))
    seen = set()
    for r in obj.get("scheduled_new_reqs") or []:
        if not isinstance(r, values.Call):
            continue
        rid = str(r.get("req_id"))
        seen.add(rid)
        plen = _int(r.get("prompt_token_ids_len"))
        if plen is None and isinstance(r.get("prompt_token_ids"), list):
            plen = len(r["prompt_token_ids"])
        before = _int(r.get("num_computed_tokens"))
        n = counts.get(rid) or 0
        if plen is None or before is None:
            phase, why = "prefill", "new request, prompt length not printed"
        else:
            phase = "last-prefill-chunk" if before + n >= plen else "prefill-chunk"
            why = f"new request: {before} of {plen} prompt tokens computed before, {n} now"
        step.requests.append(Request(rid, n, True, before, plen, phase, why))
    cached = obj.get("scheduled_cached_reqs")
    if isinstance(cached, values.Call):
        ids = [str(x) for x in cached.get("req_ids") or []]
        computed = cached.get("num_computed_tokens") or []
        outputs = cached.get("num_output_tokens")
        resumed = _resumed(cached, ids)
        for i, rid in enumerate(ids):
            seen.add(rid)
            n = counts.get(rid) or 0
            s = spec.get(rid, 0)
            before = _int(computed[i]) if i < len(computed) else None
            if isinstance(outputs, list) and i < len(outputs) and _int(outputs[i]) is not None:
                out = _int(outputs[i])
                phase, why = ("decode", f"{out} output tokens so far") if out else (
                    "prefill", "no output token yet: a later prefill chunk (its prompt length is not printed)")
            elif n == 1 + s:
                phase, why = "decode", f"inferred: {n} token{'s' * (n != 1)} for a running request (this vLLM prints no output count)"
            else:
                phase, why = "prefill", f"inferred: {n} tokens for a running request, a later prefill chunk"
            step.requests.append(Request(rid, n, False, before, None, phase, why, s, resumed[i]))
    for rid in counts:
        if rid not in seen:
            step.requests.append(Request(rid, counts[rid] or 0, False, None, None, "prefill", "only in num_scheduled_tokens"))
            step.notes.append(f"request {rid} is scheduled but not listed as new or cached")
    step.finished = [str(x) for x in _list(obj.get("finished_req_ids"))]
    step.preempted = [str(x) for x in _list(obj.get("preempted_req_ids"))]
    listed = sum(r.tokens for r in step.requests)
    if total is not None and listed != total:
        step.notes.append(f"per-request tokens add up to {listed:,}, the dump's total is {total:,}"
                          + (" (the dump line is cut off)" if not text.rstrip().endswith(")") else ""))
    return step


def read_stats(text: str) -> dict:
    """``Dumping scheduler stats: SchedulerStats(...)`` -> its fields (numbers and flags only)."""
    m = STATS.search(text)
    obj = values.value(m.group("obj")) if m else None
    if not isinstance(obj, values.Call):
        return {}
    return {k: v for k, v in obj.items() if isinstance(v, (int, float, bool))}


def _resumed(cached: values.Call, ids: list[str]) -> list[bool]:
    flags = cached.get("resumed_from_preemption")  # 0.10
    if isinstance(flags, list):
        return [bool(f) for f in flags] + [False] * (len(ids) - len(flags))
    ids_set = {str(x) for x in _list(cached.get("resumed_req_ids"))}
    return [rid in ids_set for rid in ids]


def _list(v) -> list:
    if isinstance(v, values.Call):  # set() / set([...])
        return list(v.args[0]) if v.args and isinstance(v.args[0], list) else []
    if isinstance(v, dict):
        return list(v)
    return list(v) if isinstance(v, (list, tuple)) else []


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None
