"""Every known bug class against this crash: the evidence for and against it, a verdict, a rank.

The classes are diaglib's catalogue (data/known_issues.json, matched to the rebuilt scenario by
diaglib.predict.known_issues.match: whether the class applies to this vLLM and config, and at which token
count). What each class predicts about a crash (the kernels it shows up in, the kill switches that avoid
it, whether it fails from its threshold on, exactly at it, or at start-up) is diaglib.live.observed.EXPECT;
this module holds it against the log: the step's tokens and batch (from the input dump or the candidate
steps), the CUDA-graph mode and compiled range it ran with (the replay), the named kernel and where the
error surfaced (the crash). Evidence from the step and its replay is strong; the named kernel's family, weak
(an asynchronous fault may surface in a later kernel). Verdicts: ``fits`` (strong evidence for, none against),
``possible`` (strong evidence for and some against, or only weak evidence for), ``unlikely`` (only evidence
against), ``no evidence``, ``ruled out`` (a contradiction), ``does not apply`` (to this vLLM and config).
``async-misattribution`` is advice on reading the traceback, never the explanation itself.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from ..live import classify
from ..live.observed import EXPECT, MEMORY_FAULTS
from ..predict.switches import NOT_DEFAULT as NOT_DEFAULT_SWITCHES
from .crash import Crash
from .replay import Step

ADVICE = {"async-misattribution"}  # classes that qualify the evidence rather than explain a crash
NOT_CRASHES = {"performance-cliff"}
ORDER = {"fits": 0, "possible": 1, "no evidence": 2, "unlikely": 3, "ruled out": 4, "does not apply": 5, "advice": 6}
# predicates whose class is about the CUDA graph the step replayed, the compiled range it ran, the token budget
_GRAPH, _RANGE, _BUDGET = {"cudagraph_edge"}, {"compile_range_edge"}, {"at_budget"}


@dataclass
class Suspect:
    id: str
    title: str
    verdict: str
    score: int
    evidence_for: list[str] = field(default_factory=list)
    evidence_against: list[str] = field(default_factory=list)
    threshold_tokens: int | None = None
    ruled_out_by: list[str] = field(default_factory=list)
    strong: int = 0  # evidence for from the step and its replay (the kernel's family is weak evidence)
    formula: str = ""
    links: list[str] = field(default_factory=list)
    judged_by: str = ""
    fix: list[str] = field(default_factory=list)  # argv of a fix read off vLLM's own metadata, never the log's words


def rank(matches, catalog: list[dict], step: Step | None, replayed: dict | None, crash: Crash | None, *,
         log_version: str | None, judged_by: str | None, budget: int | None, candidates: list[Step] = (),
         ) -> list[Suspect]:
    """One Suspect per class, best explanation first. ``matches``: known_issues.match(scenario) (None when no
    scenario could be rebuilt); ``catalog``: known_issues.catalog()."""
    rows = {m.id: m for m in matches.itertuples()} if matches is not None else {}
    out = []
    for c in catalog:
        m = rows.get(c["id"])
        s = Suspect(c["id"], c["title"], "", 0, formula=c["threshold"],
                    links=list(m.links) if m is not None else [], judged_by=judged_by or "")
        t = None if m is None or _na(m.threshold_tokens) else int(m.threshold_tokens)
        s.threshold_tokens = t
        if c["id"] in ADVICE:
            _advice(s, crash)
            out.append(s)
            continue
        if c["id"] in NOT_CRASHES:
            s.evidence_against.append("a performance cliff, not a crash")
            s.verdict = "does not apply"
            out.append(s)
            continue
        if c["predicate"] == "required_package_missing":  # the server's environment, not this one, decides
            _import_error(s, crash, judged_by)
            s.verdict = _verdict(s, None, log_version, judged_by)
            s.score = len(s.evidence_for) - len(s.evidence_against)
            out.append(s)
            continue
        expect = EXPECT.get(c["id"], (None, set(), None))
        if m is not None:
            (s.evidence_for if m.applies else s.evidence_against).append(
                f"{'applies' if m.applies else 'does not apply'} to vLLM {judged_by}: {m.why}"
                + (f" (the log's vLLM is {log_version})" if log_version and log_version != judged_by else ""))
        if c["predicate"] != "chunked_prefill":  # its edges are prompt lengths, read in _step_facts
            _tokens(s, c, expect[2], t, step, candidates, budget)
        _step_facts(s, c["predicate"], step, replayed, t)
        _kernel(s, expect[0], crash)
        _when(s, expect[2], crash)
        if m is None or m.applies:
            _memory(s, c["id"] in MEMORY_FAULTS, crash, step, budget)
        if c.get("versions") and log_version:
            hit = log_version in c["versions"]
            (s.evidence_for if hit else s.evidence_against).append(
                f"seen on vLLM {', '.join(c['versions'])}; the log's is {log_version}")
        s.verdict = _verdict(s, m, log_version, judged_by)
        s.score = len(s.evidence_for) - len(s.evidence_against)
        out.append(s)
    out.sort(key=lambda s: (ORDER[s.verdict], -s.score))
    return out


def explained(suspects: list[Suspect]) -> bool:
    """Whether any class (advice aside) fits or may fit."""
    return any(s.verdict in ("fits", "possible") for s in suspects if s.id not in ADVICE)


def _na(v) -> bool:
    """None, NaN or pandas' NA (known_issues.match's threshold column is a nullable Int64)."""
    import pandas as pd

    return v is None or bool(pd.isna(v))


def _tokens(s: Suspect, c: dict, mode, t, step: Step | None, candidates, budget) -> None:
    if t is None or mode not in ("from", "at"):
        return
    if step is not None:
        n, what = step.tokens, "this step had"
    elif candidates:
        n, what = max(c.tokens for c in candidates), "the largest candidate step has"
    else:
        return
    if mode == "from":
        if n >= t:
            _for(s, f"needs >= {t:,} tokens per step; {what} {n:,}: reached")
        else:
            _rule_out(s, f"needs >= {t:,} tokens per step; {what} {n:,}: ruled out"
                      + (f" (max_num_batched_tokens {budget:,} keeps every step below it)" if budget and budget < t else ""))
    elif n == t:
        _for(s, f"happens at exactly {t:,} tokens per step; {what} {n:,}")
    else:
        _rule_out(s, f"happens at exactly {t:,} tokens per step; {what} {n:,}: ruled out")


def _step_facts(s: Suspect, predicate: str, step: Step | None, replayed: dict | None, t) -> None:
    d = (replayed or {}).get("dispatch")
    if step is None or d is None:
        return
    if predicate in _GRAPH:
        if d["cudagraph_mode"] == "NONE":
            _rule_out(s, f"the step ran without a CUDA graph ({step.tokens:,} tokens; {d['cudagraph_mode_config']} "
                         "dispatches no graph at this size): ruled out")
        else:
            _for(s, f"the step replayed a {d['cudagraph_mode']} CUDA graph padded {step.tokens:,} -> "
                    f"{d['padded_tokens']:,}")
    if predicate in _RANGE:
        rng = d["compile_range"]
        if isinstance(rng, (tuple, list)) and step.tokens == rng[1]:
            _for(s, f"the step ran the compiled graph for {d['compile_kind']} {tuple(rng)}, at its upper end")
        elif isinstance(rng, (tuple, list)):
            s.evidence_against.append(f"the step ran {d['compile_kind']} {tuple(rng)}, not at its end")
    if predicate == "chunked_prefill" and step.num_prefill:
        bs, budget = replayed.get("block_size"), replayed.get("budget")
        split = [p for p in step.prompt_lens if budget and p > budget]
        whole = [p for p in step.prompt_lens if bs and p % bs == 0]
        for p in split:
            _for(s, f"its prompt of {p:,} tokens is split into chunks of at most {budget:,}")
        for p in whole:
            _for(s, f"its prompt of {p:,} tokens fills a whole number of {bs}-token KV blocks")
        if step.prompt_lens and not split:
            s.evidence_against.append(f"no prompt in the step is longer than the budget {budget:,}: none was split")


def _kernel(s: Suspect, pattern: str | None, crash: Crash | None) -> None:
    if crash is None or not crash.kernel or not pattern:
        return
    weak = crash.kernel_from != "compute-sanitizer memcheck" and crash.surfaced_kind in ("sync", "launch")
    if re.search(pattern, crash.kernel):
        s.evidence_for.append(f"the named kernel {crash.kernel} is one this class shows up in")
    else:
        s.evidence_against.append(f"the named kernel {crash.kernel} is not one this class shows up in"
                                  + (" (weak: the error may have surfaced after the faulting kernel)" if weak else ""))


def _when(s: Suspect, mode, crash: Crash | None) -> None:
    if crash is None or mode != "start":
        return
    if crash.during == "serving step":
        _rule_out(s, "a start-up fault; this crash came in a served step: ruled out")
    elif crash.during == "start-up":
        s.evidence_for.append("the crash came while the engine started")


def _memory(s: Suspect, memory_class: bool, crash: Crash | None, step: Step | None, budget: int | None) -> None:
    """An allocation that did not fit (PyTorch's out-of-memory message and its sizes) against the class: the
    memory class's own symptom; for a fault on the device, a contradiction unless the size asked is absurd."""
    if crash is None:
        return
    oom = crash.outcome == "out_of_memory"
    sizes = classify.allocation(crash.message) if oom else {}
    asked, total = sizes.get("asked"), sizes.get("total")
    if not memory_class:
        if oom and asked is not None and total is not None and asked > total:
            s.evidence_for.append(f"the step asked for {asked:,.2f} GiB, more than the GPU's {total:,.2f} GiB: a size "
                                  "computed past an index limit?")
        elif oom:
            _rule_out(s, f"the crash is an allocation that did not fit ({crash.exc_type or crash.outcome}), not a "
                         "fault on the device: ruled out")
        return
    if not oom:
        _rule_out(s, f"the crash is {crash.exc_type or crash.outcome}, not an allocation that did not fit: ruled out")
        return
    _for(s, f"the crash is {crash.exc_type or 'an out-of-memory error'}"
            + (f": {asked:,.2f} GiB asked" if asked is not None else "")
            + (f" of a GPU of {total:,.2f} GiB" if total is not None else ""))
    free, loose = sizes.get("free"), sizes.get("unallocated")
    if asked is not None and free is not None and loose is not None and free < asked <= free + loose:
        _for(s, f"{free:,.2f} GiB free and {loose:,.2f} GiB reserved by PyTorch but unallocated would hold it, not in "
                "one piece: the caching allocator's fragmentation")
    if crash.during == "serving step" and step is not None and budget and step.tokens <= budget:
        s.evidence_for.append(f"a step of {step.tokens:,} tokens is within the {budget:,} of the profile run whose peak "
                              "sized the KV cache: that peak fit at start-up")


def _import_error(s: Suspect, crash: Crash | None, judged_by: str | None) -> None:
    """The crash's own import error against the distributions the installed vLLM requires."""
    from .. import compat

    if crash is None:
        return
    failed = compat.failed_import(crash.message) if crash.exc_type in ("ModuleNotFoundError", "ImportError") else None
    if failed is None:
        _rule_out(s, f"the crash is {crash.exc_type or crash.outcome}, not a failed import: ruled out")
        return
    module, name = failed
    req = compat.required_by_module(module)
    what = f"{module} is missing" if name is None else f"{module} has no {name}: not the version vLLM pins"
    if req is None:
        s.evidence_for.append(f"the crash is {crash.exc_type}: {what}; no distribution vLLM {judged_by} requires "
                              "provides it here (an optional kernel package?)")
        return
    dist, spec = req
    _for(s, f"the crash is {crash.exc_type}: {what}; it comes from {dist}, which vLLM {judged_by} requires"
            + (f" ({spec})" if spec else "") + ": the server's environment lacks it")
    s.fix = ["pip", "install", f"{dist}{spec}"]


def _for(s: Suspect, text: str) -> None:
    s.evidence_for.append(text)
    s.strong += 1


def _rule_out(s: Suspect, text: str) -> None:
    s.evidence_against.append(text)
    s.ruled_out_by.append(text)


def _verdict(s: Suspect, m, log_version, judged_by) -> str:
    if s.ruled_out_by:  # said first: the contradiction names the threshold
        return "ruled out"
    if m is not None and not m.applies and (log_version is None or log_version == judged_by) and not s.evidence_for:
        return "does not apply"
    weak = any(e.startswith("the named kernel") for e in s.evidence_for)
    if s.strong and not s.evidence_against:
        return "fits"
    if s.strong or (weak and not s.evidence_against):
        return "possible"
    if s.evidence_against:
        return "unlikely"
    return "no evidence" if m is None or m.applies else "does not apply"


def _advice(s: Suspect, crash: Crash | None) -> None:
    s.verdict = "advice"
    if crash is None or crash.outcome not in ("illegal_memory_access", "cuda_error"):
        s.evidence_against.append("no CUDA fault in the log")
        return
    if crash.kernel_from == "compute-sanitizer memcheck":
        s.evidence_for.append(f"compute-sanitizer names the faulting kernel ({crash.kernel}): no misattribution")
        return
    if crash.surfaced_kind == "sync":
        s.evidence_for.append(f"WARNING: the innermost frame is a synchronisation point, not a kernel: "
                              f"{crash.surfaced_why}. The kernel that faulted ran before it, asynchronously")
    elif crash.surfaced_kind == "launch":
        s.evidence_for.append(f"the error surfaced at a kernel launch: {crash.surfaced_why}. A CUDA fault is "
                              "sticky: without CUDA_LAUNCH_BLOCKING=1 (and with CUDA graphs) an earlier kernel may "
                              "have faulted")
    else:
        s.evidence_for.append(f"the error surfaced at {crash.surfaced_at}: not necessarily the faulting kernel")
    s.evidence_for.append("confirm with `diaglib evidence` (CUDA_LAUNCH_BLOCKING=1, compute-sanitizer memcheck)")


# --- the next commands --------------------------------------------------------------------------------

def next_commands(command: str | None, gpu: str | None, gpu_count: int | None, step: Step | None,
                  suspects: list[Suspect], switch_spelling: dict | None, switch_order: list[str]) -> list[dict]:
    """``diaglib probe``, ``bisect`` and ``evidence`` for this step, and the fix a fitting class reads off
    vLLM's metadata, each as one shell-quoted line (never run)."""
    fixes = [{"what": "fix", "why": f"{s.id}: install what the installed vLLM requires", "argv": s.fix,
              "command": shlex.join(s.fix)} for s in suspects if s.fix and s.verdict in ("fits", "possible")]
    if command is None or step is None:
        return fixes
    base = ["--cmd", command] + (["--gpu", gpu] if gpu else []) + (["--gpu-count", str(gpu_count)] if gpu_count else [])
    out = []
    prompts = step.prompt_lens
    n = step.tokens
    if step.num_reqs == 1 and len(prompts) == 1:
        n = prompts[0]
        probe = ["--lengths", str(n)]
        why = f"one prompt of {n:,} tokens makes this step"
    elif prompts and len(prompts) == step.num_reqs:
        probe = ["--batch", "+".join(str(p) for p in prompts)]
        why = "these prompts arriving together make this step"
    else:
        probe = ["--lengths", str(n)]
        why = f"approximation: one prompt of {n:,} tokens (the step also held running requests)"
    out.append({"what": "probe", "why": why, "argv": ["diaglib", "probe", *base, *probe]})
    avoid: list[str] = []
    for s in suspects:
        if s.verdict in ("fits", "possible"):
            avoid += sorted(EXPECT.get(s.id, (None, set(), None))[1])
    spelled = switch_spelling or {}
    wanted = [w for w in switch_order if w in set(avoid) and not isinstance(spelled.get(w, ""), str)
              and w not in NOT_DEFAULT_SWITCHES]
    bisect = ["diaglib", "bisect", *base, "--tokens", str(n)]
    if wanted:
        bisect += ["--switches", ",".join(wanted)]
    out.append({"what": "bisect", "why": "the fewest kill switches that avoid the fault, and the nearest passing "
                "token count" + (f" (switches the fitting classes predict: {', '.join(wanted)})" if wanted else ""),
                "argv": bisect})
    out.append({"what": "evidence", "why": "re-run the failing step with CUDA_LAUNCH_BLOCKING=1, compute-sanitizer "
                "and TORCH_TRACE: the faulting kernel, safe to share",
                "argv": ["diaglib", "evidence", *base, "--tokens", str(n), "-o", f"evidence-{n}"]})
    for c in out:
        c["command"] = shlex.join(c["argv"])
    return fixes + out
