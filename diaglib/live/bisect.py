"""Adaptive kill-switch and token-count bisection of a fault, independent of how a run is executed.

The oracle ``run(switches, tokens)`` runs the failing probe with a set of kill switches at a prompt
length and answers with an outcome: a bool (True: the run faulted), an outcome name ("ok" passes), or
an object or dict with an ``outcome`` field (diaglib.live.classify.Outcome, a store record). Only "ok"
counts as avoiding the fault; another failure (say an OOM under --enforce-eager) does not, and is
reported. Results already known (the store) are never re-run.

Assumed: switches only remove optimisations (a superset of an avoiding set avoids too), and the
failing token counts around the failing probe form one interval. Runs, at most, for k candidate
switches and the token interval [lo, hi] around the failing count t (``max_runs_for``):
``k + 1`` (all switches on, then drop one at a time, broadest first) plus
``1 + ceil(log2(t - lo))`` below t (t - 1 first: boundaries are usually exact) plus
``1 + ceil(log2(hi - t))`` above t, plus 1 for the failing probe itself unless it is known.
With k >= 4 candidates and the default range 1..t+1 this stays within 2k + log2(range) runs (the
failing probe given). If all switches on fail differently (a switch brings its own failure, say an OOM),
each single switch is left out in turn until a set passes: up to k more runs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

from ..errors import DiagError

Oracle = Callable[[frozenset, int], Any]


def outcome_name(result: Any) -> str:
    """The outcome name of an oracle answer ("ok" or a failure name; True means "fault")."""
    if isinstance(result, bool):
        return "fault" if result else "ok"
    if isinstance(result, str):
        return result
    if isinstance(result, Mapping) and "outcome" in result:
        return str(result["outcome"])
    if hasattr(result, "outcome"):
        return str(result.outcome)
    raise DiagError(f"an oracle answered {type(result).__name__}; expected bool, outcome name or Outcome")


@dataclass(frozen=True)
class Trial:
    """One (switches, tokens) point: its outcome, and whether it was run now, known before, or decided by
    vLLM's own checks without a run (``checked``: a switch set or prompt vLLM rejects)."""

    switches: frozenset
    tokens: int
    outcome: str
    ran: bool
    checked: bool = False


@dataclass
class BisectResult:
    """What the bisection found (None where nothing was found within the range or the budget)."""

    tokens: int
    fault: str
    candidates: tuple[str, ...]
    minimal: frozenset | None = None
    passing_below: int | None = None
    failing_low: int | None = None
    failing_high: int | None = None
    passing_above: int | None = None
    token_range: tuple[int, int] = (1, 1)
    complete: bool = True
    trials: list[Trial] = field(default_factory=list)

    @property
    def runs(self) -> int:
        """Oracle calls made by this bisection (known results excluded)."""
        return sum(t.ran for t in self.trials)

    @property
    def pair(self) -> tuple[int, int] | None:
        """The closest (passing, failing) token counts: the edge nearest the failing probe."""
        edges = []
        if self.passing_below is not None:
            edges.append((self.tokens - self.passing_below, (self.passing_below, self.failing_low)))
        if self.passing_above is not None:
            edges.append((self.passing_above - self.tokens, (self.passing_above, self.failing_high)))
        return min(edges)[1] if edges else None

    def side_effects(self) -> dict[frozenset, str]:
        """Switch sets that changed the failure into another failure (not "ok", not the original fault)."""
        return {t.switches: t.outcome for t in self.trials
                if t.tokens == self.tokens and t.switches and t.outcome not in ("ok", self.fault)}

    def frame(self) -> pd.DataFrame:
        """The trials in order: switches (sorted, '+'-joined), tokens, outcome, ran."""
        return pd.DataFrame([{"switches": ",".join(sorted(t.switches)) or "(none)", "tokens": t.tokens,
                              "outcome": t.outcome, "avoided": t.outcome == "ok",
                              "source": "run" if t.ran else "vllm check" if t.checked else "store"}
                             for t in self.trials], columns=["switches", "tokens", "outcome", "avoided", "source"])

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "fault": self.fault, "candidates": list(self.candidates),
                "minimal": sorted(self.minimal) if self.minimal is not None else None,
                "passing_below": self.passing_below, "failing_low": self.failing_low,
                "failing_high": self.failing_high, "passing_above": self.passing_above,
                "pair": list(self.pair) if self.pair else None, "token_range": list(self.token_range),
                "complete": self.complete, "runs": self.runs,
                "known_used": sum(not t.ran and not t.checked for t in self.trials),
                "checked_by_vllm": sum(t.checked for t in self.trials),
                "side_effects": {",".join(sorted(k)): v for k, v in self.side_effects().items()}}


class _OutOfRuns(Exception):
    pass


class _Memo:
    """Known and new results; runs the oracle only for points it has not seen, within the budget."""

    def __init__(self, run: Oracle, known: Iterable[tuple[Iterable[str], int, Any]], max_runs: int | None,
                 precheck: Callable[[frozenset, int], str | None] | None = None):
        self.run, self.max_runs, self.ran, self.precheck = run, max_runs, 0, precheck
        self.seen: dict[tuple[frozenset, int], str] = {}
        for switches, tokens, result in known:
            self.seen[(frozenset(switches), int(tokens))] = outcome_name(result)
        self.trials: list[Trial] = []

    def outcome(self, switches: frozenset, tokens: int) -> str:
        key = (switches, tokens)
        if key in self.seen:
            if not any(t.switches == switches and t.tokens == tokens for t in self.trials):
                self.trials.append(Trial(switches, tokens, self.seen[key], ran=False))
            return self.seen[key]
        decided = self.precheck(switches, tokens) if self.precheck else None
        if decided is not None:
            self.seen[key] = decided
            self.trials.append(Trial(switches, tokens, decided, ran=False, checked=True))
            return decided
        if self.max_runs is not None and self.ran >= self.max_runs:
            raise _OutOfRuns
        self.ran += 1
        name = outcome_name(self.run(switches, tokens))
        self.seen[key] = name
        self.trials.append(Trial(switches, tokens, name, ran=True))
        return name

    def passes(self, switches: frozenset, tokens: int) -> bool:
        return self.outcome(switches, tokens) == "ok"


def bisect(run: Oracle, tokens: int, candidates: Sequence[str], *, token_range: tuple[int, int] | None = None,
           known: Iterable[tuple[Iterable[str], int, Any]] = (), max_runs: int | None = None,
           precheck: Callable[[frozenset, int], str | None] | None = None) -> BisectResult:
    """Find a minimal set of ``candidates`` avoiding the fault at ``tokens``, and the nearest passing counts.

    ``candidates``: kill-switch names, broadest first (the broad ones are dropped first, so the narrowest
    switch that suffices is what remains). ``token_range``: (lo, hi) searched around ``tokens``
    (default: 1 .. tokens + 1). ``known``: (switches, tokens, result) already measured; the failing
    probe itself must be failing there or is run first. ``max_runs``: stop early (result incomplete).
    ``precheck(switches, tokens)``: an outcome decided without a run (e.g. "rejected"), or None.
    """
    lo, hi = token_range or (1, tokens + 1)
    if not lo <= tokens <= hi or lo < 1:
        raise DiagError(f"the token range {lo}..{hi} must hold the failing count {tokens} and start at >= 1")
    names = tuple(candidates)
    if len(set(names)) != len(names):
        raise DiagError(f"duplicate kill switches: {sorted({n for n in names if names.count(n) > 1})}")
    memo = _Memo(run, known, max_runs, precheck)
    base = frozenset()
    try:
        fault = memo.outcome(base, tokens)
    except _OutOfRuns:
        raise DiagError("max_runs leaves no run for the failing probe itself") from None
    if fault == "ok":
        raise DiagError(f"the probe at {tokens} tokens passes without kill switches: nothing to bisect")
    result = BisectResult(tokens=tokens, fault=fault, candidates=names, token_range=(lo, hi))
    try:
        result.minimal = _minimal_switches(memo, tokens, names, fault)
        result.passing_below, result.failing_low = _edge(memo, tokens, lo, -1)
        result.passing_above, result.failing_high = _edge(memo, tokens, hi, +1)
    except _OutOfRuns:
        result.complete = False
    result.trials = memo.trials
    return result


def _minimal_switches(memo: _Memo, tokens: int, names: tuple[str, ...], fault: str) -> frozenset | None:
    """All switches on; if that avoids the fault, drop each switch the rest can do without."""
    if not names:
        return None
    current = frozenset(names)
    outcome = memo.outcome(current, tokens)
    if outcome == fault:
        return None
    if outcome != "ok":  # a switch fails on its own: find one whose absence lets the rest pass
        current = next((current - {n} for n in names if memo.passes(current - {n}, tokens)), None)
        if current is None:
            return None
    for name in names:
        if name not in current:
            continue
        trial = current - {name}
        if memo.passes(trial, tokens):  # the empty set is known failing: never re-run
            current = trial
    return current


def _edge(memo: _Memo, tokens: int, bound: int, step: int) -> tuple[int | None, int]:
    """The nearest passing count from ``tokens`` towards ``bound`` (None: all fail) and the failing count next to it."""
    base = frozenset()
    failing = tokens
    if tokens == bound:
        return None, failing
    first = tokens + step
    if memo.passes(base, first):
        return first, failing
    failing = first
    # Bisection between the nearest known failing count and one past the bound (a virtual pass).
    passing = bound + step
    while abs(passing - failing) > 1:
        mid = (passing + failing) // 2
        if memo.passes(base, mid):
            passing = mid
        else:
            failing = mid
    return (None if passing == bound + step else passing), failing


def max_runs_for(k: int, tokens: int, token_range: tuple[int, int], *, failing_known: bool = False) -> int:
    """The worst-case number of runs of ``bisect`` for k well-behaved candidates (module docstring)."""
    lo, hi = token_range
    below = 0 if tokens == lo else 1 + math.ceil(math.log2(max(tokens - lo, 1)))
    above = 0 if tokens == hi else 1 + math.ceil(math.log2(max(hi - tokens, 1)))
    return (k + 1 if k else 0) + below + above + (0 if failing_known else 1)


# --- live runs (diaglib.live) -------------------------------------------------------------------------

def run_name(prefix: str, switches: Iterable[str]) -> str:
    """The store's run name for one switch set: ``PREFIX/base`` or ``PREFIX/a,b``."""
    return f"{prefix}/{','.join(sorted(switches)) or 'base'}"


def store_prefix(sc) -> str:
    """A stable run-name prefix for a scenario (same command, GPU and vLLM -> same prefix)."""
    import hashlib

    digest = hashlib.sha1(f"{sc.command}|{sc.gpu.name}|{sc.gpu.count}|{sc.vllm_version}".encode()).hexdigest()
    return f"bisect-{digest[:10]}"


def known_from_store(path, prefix: str, engines: dict[frozenset, dict] | None = None
                     ) -> list[tuple[frozenset, int, str]]:
    """Single-prompt probe results already in the store: this prefix's runs, and other runs' plain probes on an
    engine built exactly like one of ``engines`` ({switch set: EngineSpec.as_dict()}, e.g. from
    :func:`planned_engines`), credited to that switch set."""
    return [(switches, tokens, r["outcome"]) for switches, tokens, r in _stored(path, prefix, engines)]


def fault_detail(path, prefix: str, engines: dict[frozenset, dict] | None, tokens: int) -> str | None:
    """What the last failing switch-free probe of ``tokens`` in the store said (its exception line), or None."""
    failed = [r for s, t, r in _stored(path, prefix, engines) if not s and t == tokens and r["outcome"] != "ok"]
    return failed[-1].get("detail") if failed else None


def engine_key(spec: dict | None, store_dir) -> str:
    """An engine spec as a key that does not depend on where its model folder lies, so that records made on
    another machine or in another checkout match: the folder (found here as the records' comparison finds it)
    by the content of its files, else by its name."""
    from pathlib import Path

    from .. import cache
    from .compare import model_folder

    if not spec or not spec.get("model_dir"):
        return json.dumps(spec, sort_keys=True)
    found = model_folder(spec, store_dir)
    ident = cache.model_id(found) if found is not None else "model:" + Path(spec["model_dir"]).name
    return json.dumps(spec, sort_keys=True).replace(json.dumps(spec["model_dir"])[1:-1], ident)


def _stored(path, prefix: str, engines: dict[frozenset, dict] | None):
    from pathlib import Path

    from . import store

    here = Path(path).parent
    by_spec = {engine_key(spec, here): switches for switches, spec in (engines or {}).items()}
    records = store.read(path)
    # each recorded engine as the switch set it was built for (None: built otherwise), keyed once per engine
    built = {(r.get("run"), r.get("engine_id")): by_spec.get(engine_key(r.get("spec"), here)) for r in records
             if r.get("type") == "engine"} if by_spec else {}
    for r in records:
        prompts = (r.get("probe") or {}).get("prompts") or []
        if r.get("type") != "probe" or len(prompts) != 1:
            continue
        run = r.get("run", "")
        if run.startswith(prefix + "/"):
            tail = run[len(prefix) + 1:]
            yield frozenset() if tail == "base" else frozenset(tail.split(",")), prompts[0], r
        elif not r["probe"].get("planted") and built.get((run, r.get("engine_id"))) is not None:
            yield built[(run, r.get("engine_id"))], prompts[0], r


def engine_for(sc, switches: Iterable[str], *, gpus: list[int] | None = None, weights: str = "auto", engine=None):
    """The EngineSpec a live run of ``sc`` with ``switches`` on starts: planned from the scenario (``gpus``: the
    indices it runs on; None: every GPU of this host), or ``engine`` with the switches' flags appended."""
    import dataclasses

    from ..predict import switches as sw
    from .engine import plan
    from .observe import gpu_count

    flags, env = sw.apply(sc, switches)
    if engine is None:
        spec = plan(sc.command, models=sc.models, gpus=len(gpus) if gpus else max(gpu_count(), 1), flags=flags,
                    weights=weights)
    else:
        spec = dataclasses.replace(engine, argv=list(engine.argv) + flags, env=dict(engine.env))
    spec.env.update(env)
    return spec


def planned_engines(sc, candidates: Sequence[str], *, gpus: list[int] | None = None,
                    weights: str = "auto") -> dict[frozenset, dict]:
    """{switch set: EngineSpec.as_dict()} for the sets a bisection tries first (none, all, each alone), so that
    other runs on exactly such an engine count as known (:func:`known_from_store`). Empty where no engine can
    be planned here (no weights, no stand-in)."""
    sets = {frozenset(), frozenset(candidates), *(frozenset([c]) for c in candidates)}
    try:
        return {s: engine_for(sc, s, gpus=gpus, weights=weights).as_dict() for s in sets}
    except DiagError:
        return {}


def live_oracle(sc, *, store_path, prefix: str, weights: str = "auto", gpus: list[int] | None = None,
                probe_timeout_s: float = 600, ready_timeout_s: float = 1800, make_probe=None, engine=None) -> Oracle:
    """An oracle running one exact-length probe per call on the GPU, crash-isolated, recorded in the store.

    ``make_probe(tokens, switches) -> Probe`` (key ``p<tokens>``): instead of one plain prompt, e.g. a
    planted fault;
    ``engine``: an EngineSpec to append the switches' flags to, instead of one planned from the scenario.
    """
    from . import probe, store

    def run(switches: frozenset, tokens: int) -> str:
        spec = engine_for(sc, switches, gpus=gpus, weights=weights, engine=engine)
        name = run_name(prefix, switches)
        probes = [make_probe(tokens, switches)] if make_probe else probe.exact([tokens])
        probe.run(probes, spec, store_path=store_path, run_name=name, gpus=gpus,
                  probe_timeout_s=probe_timeout_s, ready_timeout_s=ready_timeout_s)
        rows = store.probes(store_path, name)
        hit = rows[rows.key == f"p{tokens}"]
        if hit.empty:
            raise DiagError(f"the probe runner recorded no result for {tokens} tokens in run {name}")
        return str(hit.outcome.iloc[-1])

    return run


def vllm_precheck(sc) -> Callable[[frozenset, int], str | None]:
    """``precheck`` for ``bisect``: "rejected" where vLLM refuses the switch set for this scenario or would
    refuse the prompt under it (its config validation and front-end length check, on the CPU), else None.
    A rejected set counts as not avoiding the fault."""
    from .. import compat
    from ..predict import switches as sw

    def check(switches: frozenset, tokens: int) -> str | None:
        flags, env = sw.apply(sc, switches)
        with compat.with_env(env):
            try:
                derived = sc.derive(*flags)
                compat.check_prompt_len(derived.vllm_config, tokens)  # chunked-prefill-off caps max_model_len
            except DiagError:
                return "rejected"
        return None

    return check


def describe(result: BisectResult, sc, error: str | None = None) -> tuple[dict, str]:
    """JSON-ready data and text for a bisection of scenario ``sc``: minimal set, its flags, layer, pair, and the
    failing probe's ``error`` (its exception line, :func:`fault_detail`)."""
    from ..predict import switches as sw

    data = result.as_dict()
    data["implicated"] = sw.implicated(result.minimal) if result.complete else None
    data["minimal_flags"] = sw.apply(sc, result.minimal) if result.minimal else None
    data["error"] = error
    lines = [f"fault at {result.tokens} tokens: {result.fault}" + (f" ({error})" if error else "")
             + f"   (vLLM {sc.vllm_version}, {sc.command})"]
    if not result.complete:
        lines.append("INCOMPLETE: the run budget ran out or no GPU is here; what is known so far:")
    if result.minimal is not None:
        flags, env = data["minimal_flags"]
        spelled = " ".join(flags + [f"{k}={v}" for k, v in env.items()])
        lines.append(f"minimal kill switches: {', '.join(sorted(result.minimal))}   ({spelled})")
    if data["implicated"]:
        lines.append(f"implicated: {data['implicated']}")
    if result.pair:
        lines.append(f"closest pair: {result.pair[0]} passes, {result.pair[1]} fails")
    lo, hi = result.token_range
    below = result.passing_below if result.passing_below is not None else f"none in {lo}..{result.tokens}"
    above = result.passing_above if result.passing_above is not None else f"none in {result.tokens}..{hi}"
    if result.failing_low is not None and result.failing_high is not None:
        lines.append(f"failing counts {result.failing_low}..{result.failing_high}; nearest passing below: {below}, "
                     f"above: {above}")
    rejected = [t.switches for t in result.trials if t.outcome == "rejected"]
    for s, outcome in data["side_effects"].items():
        if outcome != "rejected":
            lines.append(f"note: with {s} the run ended in {outcome} instead (not counted as avoiding the fault)")
    if rejected:
        accepted = frozenset().union(*(t.switches for t in result.trials if t.outcome != "rejected"))
        culprits = ", ".join(sorted(frozenset.intersection(*rejected) - accepted)) or "various combinations"
        lines.append(f"note: vLLM rejects {len(rejected)} of the switch sets tried (culprit: {culprits}) for this "
                     "scenario or prompt; they count as not avoiding the fault")
    lines.append(f"runs: {result.runs} new, {data['known_used']} from the store, "
                 f"{data['checked_by_vllm']} decided by vLLM's checks without a run")
    lines.append(result.frame().to_string(index=False))
    return data, "\n".join(lines)
