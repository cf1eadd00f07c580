"""Triage a crash from its log: :func:`triage` runs parse -> crash -> rebuild -> replay -> suspects.

The answer is a :class:`Triage`; :func:`format_text` and :func:`as_dict` present it (diaglib.present.
triage_page the HTML page). Everything that leaves the process goes through diaglib.secrets.redact.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from .. import compat
from ..errors import DiagError
from ..secrets import redact
from . import crash as crash_mod
from . import lines, parse, rebuild, replay, suspects

MAX_CANDIDATES_REPLAYED = 4


@dataclass
class Triage:
    source: str
    facts: parse.LogFacts
    version: dict
    crash: crash_mod.Crash | None
    rebuilt: rebuild.Rebuilt
    step: replay.Step | None
    candidates: list[replay.Step] = field(default_factory=list)
    replays: list[dict] = field(default_factory=list)
    suspects: list[suspects.Suspect] = field(default_factory=list)
    explained: bool = False
    next: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def release_of(version: str | None) -> str | None:
    """The supported release a logged version belongs to: itself, its patch release (0.10.1 -> 0.10.1.1),
    or the newest patch of its minor line (0.11.0 -> 0.11.2); None when diaglib supports none of its line."""
    m = re.match(r"\d+(?:\.\d+)*", version or "")
    if not m:
        return None
    base, sup = m.group(0), compat.supported()
    if base in sup:
        return base
    same = [r for r in sup if r.startswith(base + ".")] or [r for r in sup if r.split(".")[:2] == base.split(".")[:2]]
    return same[-1] if same else None


def version_info(facts: parse.LogFacts) -> dict:
    """The log's vLLM, the release it maps to, and the installed one that answers."""
    have = compat.installed()
    rel = release_of(facts.version)
    info = {"log": facts.version, "log_from": facts.version_from, "log_release": rel, "installed": have,
            "answered_by": have, "same": rel is not None and rel == have}
    if facts.version is None:
        info["note"] = f"the log names no vLLM version; answered by the installed vLLM {have}"
    elif rel is None:
        info["note"] = f"the log's vLLM {facts.version} is not a release diaglib supports; answered by {have}"
    elif rel != have:
        info["note"] = (f"the log is from vLLM {facts.version}; answered by the installed vLLM {have} "
                        f"(run `diaglib --vllm {rel} triage ...`, or let triage hand over, for {rel}'s answer)")
    else:
        info["note"] = f"the log's vLLM {facts.version} is the installed one"
    return info


def triage(data: bytes | str, *, source: str = "log", model_dir: str | None = None, gpu: str | None = None,
           gpu_count: int | None = None, prompts: list[int] | None = None, resolve: bool = True) -> Triage:
    """Everything the log says about its crash, and what the installed vLLM makes of the step that died.

    ``resolve=False`` stops after reading the log (no vLLM import: parse, crash and the rebuilt command).
    """
    facts = parse.parse(lines.decode(data))
    cr = crash_mod.crash(facts)
    ver = version_info(facts)
    rb = rebuild.command(facts, model_dir=model_dir, gpu=gpu, gpu_count=gpu_count, flags=resolve)
    d = facts.dump
    step = replay.from_dump(d) if d and d.total_tokens > 0 else None
    t = Triage(source, facts, ver, cr, rb, step, notes=list(facts.notes))
    if step is not None:
        t.notes += [f"input dump: {n}" for n in d.notes]
    elif d is not None:
        t.notes.append(f"the input dump (log line {d.line}) schedules no tokens (cut short?): the step is not "
                       "known; candidate steps come from the prompts it lists")
    if not resolve:
        t.notes.append("read only (--no-replay): the command was not rebuilt through vLLM, the step not replayed")
        return t
    rebuild.resolve(rb, facts, same_release=ver["same"])
    sc = rb.scenario
    if sc is None:
        t.notes.append(f"the scenario could not be rebuilt ({rb.error}): no replay; the suspects are judged from "
                       "the log alone")
    lengths = prompts or [p["tokens"] for p in facts.prompts if p["exact"]] or \
        [r.prompt_len for r in (d.requests if d else ()) if r.new and r.prompt_len]
    if sc is not None and step is None:
        if lengths:
            try:
                t.candidates, notes = replay.candidates(sc, lengths)
            except (DiagError, *replay.COMPAT_GAPS) as e:  # the scheduler replay of this vLLM failed
                notes = [f"no candidate steps: diaglib could not run vLLM {sc.vllm_version}'s scheduler "
                         f"({type(e).__name__}: {e})"]
            t.notes += notes
            t.notes.append(f"no usable input dump in the log: {len(t.candidates)} candidate step(s) from "
                           f"{len(lengths)} prompt length(s) " + ("given" if prompts else "in the request log"))
        else:
            t.notes.append("no input dump and no prompt lengths in the log: give --prompt N for candidate steps")
    if sc is not None:
        for s in ([step] if step else t.candidates[:MAX_CANDIDATES_REPLAYED]):
            t.replays.append(replay.replay(sc, s))
    t.suspects = _suspects(t, sc)
    t.explained = suspects.explained(t.suspects)
    best = step or (t.candidates[0] if t.candidates else None)
    if best is not None and rb.local_command:
        spelling, order = _switches(sc)
        t.next = suspects.next_commands(rb.local_command, rb.gpu, rb.gpu_count, best, t.suspects, spelling, order)
    return t


def _suspects(t: Triage, sc) -> list[suspects.Suspect]:
    from ..predict import known_issues

    matches = None
    if sc is not None:
        try:
            matches = known_issues.match(sc)
        except replay.COMPAT_GAPS as e:
            t.notes.append(f"the known classes are judged from the log alone: diaglib cannot match them on vLLM "
                           f"{sc.vllm_version} yet ({type(e).__name__}: {e})")
    return suspects.rank(matches, known_issues.catalog(), t.step, t.replays[0] if t.replays and t.step else None,
                         t.crash, log_version=t.version["log_release"] or t.version["log"],
                         judged_by=sc.vllm_version if sc is not None else None,
                         budget=sc.vllm_config.scheduler_config.max_num_batched_tokens if sc is not None else None,
                         candidates=t.candidates)


def _switches(sc):
    if sc is None:
        return None, []
    from ..predict import switches

    try:
        return switches.spelling(sc), [s.name for s in switches.CATALOGUE]
    except Exception:  # noqa: BLE001 - the next commands are advice; the switch list may be left out
        return None, []


# --- presenting -----------------------------------------------------------------------------------

def as_dict(t: Triage) -> dict:
    """JSON-ready, redacted."""
    f = t.facts
    data = {
        "source": t.source,
        "log": {"lines": f.lines, "found": f.found, "processes": f.processes, "version": f.version,
                "version_from": f.version_from, "model": f.model, "non_default_args": f.non_default_args,
                "engine_line": f.engine.line if f.engine else None,
                "engine_config": {k: v for k, v in (f.engine.config if f.engine else {}).items() if k != "_raw"},
                "budget": f.budget, "max_model_len": f.max_model_len, "kv_cache_tokens": f.kv_cache_tokens,
                "gpus": f.gpus, "prompts": f.prompts[:1000],
                "tracebacks": [tb.as_dict() for tb in f.tracebacks[:50]],
                "input_dump": f.dump.as_dict() if f.dump else None, "sanitizer": f.sanitizer[:50]},
        "version": t.version,
        "crash": t.crash.as_dict() if t.crash else None,
        "rebuilt": t.rebuilt.as_dict(),
        "step": asdict(t.step) if t.step else None,
        "step_described": t.step.describe() if t.step else None,
        "candidates": [asdict(c) | {"described": c.describe()} for c in t.candidates],
        "replays": t.replays,
        "suspects": [asdict(s) for s in t.suspects],
        "explained": t.explained,
        "verdict": verdict(t),
        "next": t.next,
        "notes": t.notes,
    }
    return json.loads(redact(json.dumps(data, default=str)))


def verdict(t: Triage) -> str:
    """One sentence: the classes that fit, or that none does."""
    fits = [s.id for s in t.suspects if s.verdict == "fits" and s.id not in suspects.ADVICE]
    maybe = [s.id for s in t.suspects if s.verdict == "possible" and s.id not in suspects.ADVICE]
    if not t.explained:
        return "no known class explains this"
    return ("fits: " + ", ".join(fits) if fits else "") + ("; " if fits and maybe else "") + (
        "possible: " + ", ".join(maybe) if maybe else "")


def _fmt_range(d: dict) -> str:
    r = d["compile_range"]
    kind = d["compile_kind"]
    if kind == "dynamic":
        return f"the dynamic-shape graph (one graph for {tuple(r)[0]}..{tuple(r)[1]} tokens)" if r else "dynamic"
    return f"{kind} {tuple(r)}" if isinstance(r, (list, tuple)) else str(kind)


def format_text(t: Triage) -> str:
    """The triage as text (redacted)."""
    f, c, rb = t.facts, t.crash, t.rebuilt
    procs = ", ".join(p for p in f.processes if p) or "no process prefixes"
    out = [f"diaglib triage: {t.source} ({f.lines:,} lines; {procs})",
           f"found       {', '.join(f.found) or 'errors only'}",
           f"vLLM        {t.version['note']}"]
    if c:
        out += [f"crash       {c.outcome}: {c.exc_type + ': ' if c.exc_type else ''}{c.message.splitlines()[0] if c.message else ''}",
                f"            in {c.stream or 'the main process'} (log line {c.line}), during {c.during}",
                f"            surfaced at {c.surfaced_at or '?'}: {c.surfaced_kind} ({c.surfaced_why})"]
        if c.kernel:
            out.append(f"            kernel {c.kernel} ({c.kernel_kind}; from {c.kernel_from})")
        if c.cuda_error and c.cuda_error not in (c.message or ""):
            out.append(f"            CUDA error: {c.cuda_error}")
    else:
        out.append("crash       no traceback or CUDA error in the log")
    if t.step:
        out += [f"step        {t.step.describe()}  [{t.step.source}]", f"            schedule {t.step.schedule}"]
    for i, s in enumerate(t.candidates[:8]):
        out.append(f"{'candidates' if i == 0 else '':<12}{s.describe()}  [{s.schedule}]  ({s.source})")
    for r in t.replays:
        out.append(f"replay      {r['describe']} on vLLM {t.version['installed']}:")
        d = r.get("dispatch")
        if d is None:
            out += [f"            {n}" for n in r["notes"]]
            continue
        graph = "no CUDA graph" if d["cudagraph_mode"] == "NONE" else f"CUDA graph {d['cudagraph_mode']}"
        out.append(f"            padded to {d['padded_tokens']:,} (+{d['padding']}), {graph} (graph mode "
                   f"{d['cudagraph_mode_config']}), compiled: {_fmt_range(d)}")
        if d.get("derived"):
            out.append(f"            ({d['derived']})")
        m = r.get("moe")
        if m:
            lb = m["largest_buffer"]
            out.append(f"            MoE {m['backend']} ({m['selected_experts']}, {m['selected_path']} path), "
                       f"{m['num_chunks']} activation chunk(s); Triton config {m['triton_config']['source']}; "
                       f"offs_token int64: {'yes' if m['offs_token_int64'] else 'no'}")
            out.append(f"            largest MoE buffer {lb['path']}.{lb['buffer']} {tuple(lb['shape'])}: "
                       f"{lb['frac_2_31']:.3f} x 2^31")
        for e in r.get("edges", []):
            out.append(f"            edge: {e['rule']}")
        cen = r.get("census") or {}
        out.append("            census: " + (cen.get("summary") or f"not available ({cen.get('why', '?')})"))
    out += [f"rebuilt     {rb.command or '(no model in the log)'}",
            f"            resolved by vLLM {rb.scenario.vllm_version} on {rb.gpu_count} x {rb.gpu}" if rb.scenario
            else f"            not resolved: {rb.error}"]
    for label, items in (("recovered", rb.recovered), ("assumed", rb.assumed), ("not recovered", rb.missing),
                         ("differs", rb.differs)):
        for i, x in enumerate(items):
            out.append(f"  {label if i == 0 else '':<13} {x}")
    out.append(f"suspects    {verdict(t)}")
    for i, s in enumerate(t.suspects, 1):
        out.append(f"  {i:>2}. {s.verdict:<14} {s.id}: {s.title}")
        out += [f"        + {e}" for e in s.evidence_for]
        out += [f"        - {e}" for e in s.evidence_against]
    if t.next:
        out.append("next        (not run; each line is shell-quoted)")
        for cmd in t.next:
            out += [f"  # {cmd['what']}: {cmd['why']}", f"  {cmd['command']}"]
    if t.notes:
        out.append("notes")
        out += [f"  - {n}" for n in t.notes]
    return redact("\n".join(out))
