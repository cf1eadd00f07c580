"""Bisection against synthetic fault oracles: minimal switch sets, token edges, run counts, reuse."""
from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from diaglib.errors import DiagError
from diaglib.live.bisect import bisect, max_runs_for, outcome_name

SWITCHES = ("enforce-eager", "compile-off", "cudagraph-off", "inductor-off", "budget+1", "moe-triton")


class Counting:
    """An oracle that counts its calls and refuses to answer the same point twice."""

    def __init__(self, faults):
        self.faults, self.calls = faults, []

    def __call__(self, switches, tokens):
        assert isinstance(switches, frozenset)
        assert (switches, tokens) not in self.calls, "the bisection re-ran a known point"
        self.calls.append((switches, tokens))
        return self.faults(switches, tokens)


def bound(k: int, lo: int, hi: int) -> float:
    """The issue's bound: 2k + log2(range) runs for k switches, the failing probe given (from the store)."""
    return 2 * k + math.log2(hi - lo + 1)


def failing(tokens: int, outcome="illegal_memory_access"):
    return [((), tokens, outcome)]


def test_one_switch_exact_boundary():
    # Fires only at 8192 tokens, and only while CUDA graphs are on (enforce-eager and compile-off also stop them).
    graphs_off = {"enforce-eager", "compile-off", "cudagraph-off"}
    oracle = Counting(lambda s, t: t == 8192 and not (s & graphs_off))
    r = bisect(oracle, 8192, SWITCHES, token_range=(1, 16384), known=failing(8192))
    assert r.minimal == {"cudagraph-off"}  # the broad switches are dropped first: the narrowest one remains
    assert (r.passing_below, r.failing_low, r.failing_high, r.passing_above) == (8191, 8192, 8192, 8193)
    assert r.pair == (8191, 8192)
    assert r.runs == len(oracle.calls) <= bound(len(SWITCHES), 1, 16384)
    assert r.fault == "illegal_memory_access" and r.complete


def test_two_switches_together_threshold():
    # Needs both the Inductor switch and the budget switch; fires at every count >= 8192.
    oracle = Counting(lambda s, t: t >= 8192 and not {"inductor-off", "budget+1"} <= s)
    r = bisect(oracle, 8192, SWITCHES, known=failing(8192))  # default range 1 .. 8193
    assert r.minimal == {"inductor-off", "budget+1"}
    assert r.pair == (8191, 8192)
    assert r.passing_above is None and r.failing_high == 8193
    assert r.runs <= bound(len(SWITCHES), 1, 8193)


def test_token_window():
    # Fires for 8000..8192 tokens unless the MoE backend is switched.
    oracle = Counting(lambda s, t: 8000 <= t <= 8192 and "moe-triton" not in s)
    r = bisect(oracle, 8192, SWITCHES, known=failing(8192))
    assert r.minimal == {"moe-triton"}
    assert (r.passing_below, r.failing_low) == (7999, 8000)
    assert (r.failing_high, r.passing_above) == (8192, 8193)
    assert r.pair == (8193, 8192)  # the nearer edge
    assert r.runs <= bound(len(SWITCHES), 1, 8193)


def test_window_both_sides_within_the_documented_bound():
    oracle = Counting(lambda s, t: 8000 <= t <= 8300 and "moe-triton" not in s)
    r = bisect(oracle, 8100, SWITCHES, token_range=(1, 16384), known=failing(8100))
    assert (r.passing_below, r.failing_low, r.failing_high, r.passing_above) == (7999, 8000, 8300, 8301)
    assert r.runs <= max_runs_for(len(SWITCHES), 8100, (1, 16384), failing_known=True)


@pytest.mark.parametrize("seed", range(40))
def test_random_oracles_minimal_and_bounded(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 7)
    names = [f"s{i}" for i in range(k)]
    needed = frozenset(rng.sample(names, rng.randint(1, k)))
    lo, hi = 1, rng.randint(2, 40000)
    t = rng.randint(lo, hi)
    a, b = rng.randint(lo, t), rng.randint(t, hi)
    oracle = Counting(lambda s, x: a <= x <= b and not needed <= s)
    r = bisect(oracle, t, names, token_range=(lo, hi))
    assert r.minimal == needed
    assert r.failing_low == a and r.failing_high == b
    assert r.passing_below == (a - 1 if a > lo else None)
    assert r.passing_above == (b + 1 if b < hi else None)
    assert r.runs <= max_runs_for(k, t, (lo, hi))


def test_result_is_minimal_against_every_subset():
    # Either set avoids it; the result must be one of them and no proper subset of it may avoid the fault.
    def avoids(s):
        return {"cudagraph-off"} <= s or {"inductor-off", "moe-triton"} <= s

    r = bisect(lambda s, t: not avoids(s), 8192, SWITCHES)
    assert avoids(r.minimal)
    for n in range(len(r.minimal)):
        for sub in itertools.combinations(r.minimal, n):
            assert not avoids(frozenset(sub))


def test_no_switch_avoids_the_fault():
    oracle = Counting(lambda s, t: t >= 100)
    r = bisect(oracle, 100, SWITCHES)
    assert r.minimal is None
    assert len([c for c in oracle.calls if c[1] == 100]) == 2  # the failing probe and all switches on, nothing else
    assert r.pair == (99, 100)


def test_known_results_are_reused():
    faults = lambda s, t: t == 8192 and "cudagraph-off" not in s  # noqa: E731
    first = bisect(faults, 8192, SWITCHES)
    known = [(t.switches, t.tokens, t.outcome) for t in first.trials]
    again = bisect(Counting(lambda s, t: pytest.fail("ran a known point")), 8192, SWITCHES, known=known)
    assert again.runs == 0 and again.as_dict()["minimal"] == ["cudagraph-off"]
    assert again.as_dict() | {"runs": first.runs, "known_used": 0} == first.as_dict()


def test_other_failures_do_not_count_as_avoided_and_are_reported():
    def run(s, t):
        if "enforce-eager" in s:
            return {"outcome": "out_of_memory"}
        return "ok" if "cudagraph-off" in s or t != 8192 else "illegal_memory_access"

    r = bisect(run, 8192, SWITCHES)
    assert r.fault == "illegal_memory_access"
    assert r.minimal == {"cudagraph-off"}  # found although all switches on ran out of memory
    assert r.side_effects()[frozenset(SWITCHES)] == "out_of_memory"
    assert r.frame().columns.tolist() == ["switches", "tokens", "outcome", "avoided", "source"]


def test_budget_stops_early_and_says_so():
    r = bisect(lambda s, t: t >= 8192, 8192, SWITCHES, max_runs=3)
    assert not r.complete and r.runs == 3


@pytest.mark.parametrize("call, message", [
    (lambda: bisect(lambda s, t: False, 10, ["a"]), "passes without kill switches"),
    (lambda: bisect(lambda s, t: True, 10, ["a"], token_range=(11, 20)), "must hold the failing count"),
    (lambda: bisect(lambda s, t: True, 10, ["a", "a"]), "duplicate"),
    (lambda: bisect(lambda s, t: 3.5, 10, ["a"]), "expected bool"),
    (lambda: bisect(lambda s, t: True, 10, ["a"], max_runs=0), "no run for the failing probe"),
])
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises(DiagError, match=message):
        call()


def test_outcome_names():
    from diaglib.live.classify import Outcome

    assert outcome_name(True) == "fault" and outcome_name(False) == "ok"
    assert outcome_name(Outcome("illegal_memory_access", "x")) == "illegal_memory_access"
    assert outcome_name({"outcome": "ok"}) == "ok"


# --- the CLI, on results already in a live store (no GPU needed) ---------------------------------------

def _store_trials(path, prefix, result):
    from diaglib.live import store
    from diaglib.live.bisect import run_name

    for t in result.trials:
        store.append(path, {"type": "probe", "run": run_name(prefix, t.switches), "key": f"p{t.tokens}",
                            "probe": {"prompts": [t.tokens]}, "outcome": t.outcome})


def test_cli_bisect_reuses_the_store(scenario, scenario_name, tmp_path, capsys):
    import json

    from diaglib.cli import main
    from diaglib.live.bisect import store_prefix, vllm_precheck
    from diaglib.predict import switches

    names = switches.candidates(scenario)
    truth = bisect(lambda s, t: "illegal_memory_access" if t == 8192 and "cudagraph-off" not in s else "ok",
                   8192, names, precheck=vllm_precheck(scenario))
    path = tmp_path / "live.jsonl"
    _store_trials(path, store_prefix(scenario), truth)
    rc = main(["bisect", scenario_name, "--tokens", "8192", "--store", str(path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["minimal"] == ["cudagraph-off"] and out["implicated"] == "CUDA graphs"
    assert out["pair"] == [8191, 8192] and out["runs"] == 0 and out["complete"]
    assert out["minimal_flags"][0] == switches.apply(scenario, ["cudagraph-off"])[0]


def test_cli_bisect_without_a_result_or_gpu_is_one_clear_error(scenario_name, tmp_path, capsys):
    from diaglib.cli import main
    from diaglib.whatif import real_gpu_present

    if real_gpu_present():
        pytest.skip("a GPU is here: the probe would run")
    rc = main(["bisect", scenario_name, "--tokens", "8192", "--store", str(tmp_path / "none.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "no result for 8192 tokens" in err and "no GPU" in err


def test_live_oracle_runs_real_children_and_the_store_answers_next_time(scenario, tmp_path):
    """Through diaglib.live's probe runner: CPU child processes, a planted abort with the CUDA runtime's
    illegal-address message at exactly 8192 tokens unless CUDA graphs are off (as the GPU check plants it)."""
    from diaglib.live import store
    from diaglib.live.bisect import known_from_store, live_oracle
    from diaglib.live.engine import no_engine
    from diaglib.live.probe import Probe

    graphs_off = {"enforce-eager", "cudagraph-off"}

    def make(n, switches):
        fires = n == 8192 and not switches & graphs_off
        return Probe(f"p{n}", [n], planted={"fault": "cuda_abort"} if fires else None)

    path = tmp_path / "live.jsonl"
    names = ["enforce-eager", "cudagraph-off", "inductor-off"]
    run = live_oracle(scenario, store_path=path, prefix="t", gpus=[None], make_probe=make, engine=no_engine(),
                      probe_timeout_s=30, ready_timeout_s=60)
    r = bisect(run, 8192, names)
    assert r.fault == "illegal_memory_access" and r.minimal == {"cudagraph-off"}
    assert r.pair == (8191, 8192) and r.passing_above == 8193 and r.runs == 7
    engines = [e for e in store.read(path) if e["type"] == "engine"]
    assert any(set(switches_flags(scenario, ["cudagraph-off"])) <= set(e["spec"]["argv"]) for e in engines)
    again = bisect(lambda s, t: pytest.fail("re-ran"), 8192, names, known=known_from_store(path, "t"))
    assert again.as_dict() | {"runs": 7, "known_used": 0} == r.as_dict()


def switches_flags(scenario, names):
    from diaglib.predict import switches

    return switches.apply(scenario, names)[0]


def test_known_from_store_takes_plain_probes_of_the_same_engine(tmp_path):
    from diaglib.live import store
    from diaglib.live.bisect import known_from_store

    spec = {"kind": "vllm", "argv": ["serve", "m"], "env": {}}
    path = tmp_path / "s.jsonl"
    for run, argv in (("sweep", ["serve", "m"]), ("other", ["serve", "m", "--enforce-eager"])):
        store.append(path, {"type": "engine", "run": run, "engine_id": "g0", "spec": {**spec, "argv": argv}})
        store.append(path, {"type": "probe", "run": run, "engine_id": "g0", "key": "p8191",
                            "probe": {"prompts": [8191]}, "outcome": "ok"})
        store.append(path, {"type": "probe", "run": run, "engine_id": "g0", "key": "x",
                            "probe": {"prompts": [8192], "planted": {"fault": "raise"}}, "outcome": "python_error"})
    eager = {**spec, "argv": ["serve", "m", "--enforce-eager"]}
    assert known_from_store(path, "t", {frozenset(): spec}) == [(frozenset(), 8191, "ok")]
    assert known_from_store(path, "t", {frozenset(): spec, frozenset({"enforce-eager"}): eager}) == [
        (frozenset(), 8191, "ok"), (frozenset({"enforce-eager"}), 8191, "ok")]
    assert known_from_store(path, "t") == []


def test_stored_probes_of_an_engine_planned_in_another_checkout_count(scenario, tmp_path):
    """Records keep absolute paths of the machine that made them: an engine whose stand-in lay elsewhere is the
    same engine here when the stand-in folder by that name holds the same files."""
    from diaglib.live import bisect as B
    from diaglib.live import store

    planned = B.planned_engines(scenario, ["cudagraph-off"], gpus=[0])
    base = planned[frozenset()]
    elsewhere = json.loads(json.dumps(base).replace(base["model_dir"], "/elsewhere/checkout/" + base["model_dir"]
                                                    .rsplit("/", 1)[-1]))
    assert elsewhere != base
    path = tmp_path / "s.jsonl"
    store.append(path, {"type": "engine", "run": "other", "engine_id": "g0", "spec": elsewhere})
    store.append(path, {"type": "probe", "run": "other", "engine_id": "g0", "key": "p8192",
                        "probe": {"prompts": [8192]}, "outcome": "illegal_memory_access"})
    assert B.known_from_store(path, "t", planned) == [(frozenset(), 8192, "illegal_memory_access")]
    moved = {**elsewhere, "model_dir": "/elsewhere/no-such-model"}
    moved["argv"] = [a.replace(elsewhere["model_dir"], moved["model_dir"]) for a in elsewhere["argv"]]
    store.append(path, {"type": "engine", "run": "gone", "engine_id": "g0", "spec": moved})
    store.append(path, {"type": "probe", "run": "gone", "engine_id": "g0", "key": "p8191",
                        "probe": {"prompts": [8191]}, "outcome": "ok"})
    assert len(B.known_from_store(path, "t", planned)) == 1  # another model: not this engine


def test_planned_engines_are_the_ones_the_oracle_starts(scenario, monkeypatch):
    """The engines a bisection's first trials start, planned on the CPU as the live oracle plans them."""
    from diaglib.live import bisect as B
    from diaglib.live import probe

    names = ["enforce-eager", "cudagraph-off"]
    planned = B.planned_engines(scenario, names, gpus=[0])
    started = []
    monkeypatch.setattr(probe, "run", lambda probes, spec, **kw: started.append(spec.as_dict()))
    run = B.live_oracle(scenario, store_path="/nonexistent/s.jsonl", prefix="t", gpus=[0])
    for switches in planned:
        with pytest.raises(DiagError, match="recorded no result"):
            run(switches, 8192)
    assert started == list(planned.values())
    assert len({json.dumps(s, sort_keys=True) for s in started}) == 4  # none, all, each alone: four engines


@pytest.mark.parametrize("seed", range(30))
def test_issue_bound_holds_for_catalogue_sized_k(seed):
    """With k >= 4 candidates (the catalogue has 7 on 0.10.1.1, 9 on 0.20.2) and the default range
    1..t+1, any single-interval fault is bisected within 2k + log2(range) runs, the failing probe given."""
    rng = random.Random(1000 + seed)
    k = rng.randint(4, 9)
    names = [f"s{i}" for i in range(k)]
    needed = frozenset(rng.sample(names, rng.randint(1, k)))
    t = rng.randint(2, 70000)
    a, b = rng.randint(1, t), rng.choice([t, t + 1])
    r = bisect(lambda s, x: a <= x <= b and not needed <= s, t, names, known=failing(t))
    assert r.minimal == needed and r.failing_low == a
    assert r.runs <= bound(k, 1, t + 1)


def test_vllm_precheck_rejects_what_vllm_refuses_without_a_run(scenario):
    """vLLM's own checks on the CPU: a prompt its front end refuses, and on 0.20.2 chunked-prefill-off (which
    caps max_model_len at the budget) with a prompt of exactly the budget (no room for an output token)."""
    from diaglib.live.bisect import vllm_precheck
    from diaglib.predict import switches

    check = vllm_precheck(scenario)
    budget = scenario.vllm_config.scheduler_config.max_num_batched_tokens
    max_len = scenario.vllm_config.model_config.max_model_len
    assert check(frozenset(), max_len + 1) == "rejected"
    assert check(frozenset(), budget) is None and check(frozenset({"cudagraph-off"}), budget) is None
    if isinstance(switches.spelling(scenario)["chunked-prefill-off"], str):
        return  # the switch does not exist in this vLLM
    if check(frozenset(), max_len) is None:
        return  # this vLLM takes a prompt of exactly max_model_len tokens (0.10-0.11.1): nothing to refuse
    assert check(frozenset({"chunked-prefill-off"}), budget) == "rejected"
    assert check(frozenset({"chunked-prefill-off"}), budget - 1) is None


def test_sets_decided_by_a_precheck_cost_no_run():
    r = bisect(lambda s, t: "illegal_memory_access" if "b" not in s else "ok", 100, ["a", "b"],
               precheck=lambda s, t: "rejected" if "a" in s else None, token_range=(100, 100))
    assert r.minimal == {"b"} and r.runs == 2  # the failing probe, then {b}; {a, b} was decided without a run
    assert [(sorted(t.switches), t.checked) for t in r.trials if t.checked] == [(["a", "b"], True)]
    assert set(r.frame().source) == {"run", "vllm check"} and r.as_dict()["checked_by_vllm"] == 1
