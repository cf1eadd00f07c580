"""The kill-switch catalogue, checked against the installed vLLM's parser and resolved configuration."""
from __future__ import annotations

import pytest

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.predict import switches

# What each switch does on the seed scenario, per vLLM version (vLLM's answers, checked by verify()).
EXPECTED = {
    "0.20.2": {"ok": ["enforce-eager", "compile-off", "cudagraph-off", "inductor-off", "chunked-prefill-off",
                      "async-off", "budget+1", "moe-backend", "attention-backend", "budget-1"],
               "unavailable": ["moe-chunk-off", "moe-chunk-half", "pad-off"], "no effect": []},
    "0.10.1.1": {"ok": ["enforce-eager", "compile-off", "cudagraph-off", "inductor-off", "budget+1",
                        "moe-chunk-half", "attention-backend", "budget-1"],
                 "unavailable": ["chunked-prefill-off", "async-off", "moe-backend", "pad-off"],
                 # chunking starts at 32768 tokens: turning it off changes nothing at an 8192 budget
                 "no effect": ["moe-chunk-off"]},
}


@pytest.fixture(scope="module")
def table(scenario):
    return switches.verify(scenario)


def test_every_switch_is_verified_by_vllm(table):
    expected = EXPECTED[compat.installed()]
    got = {status: table.loc[table.status == status, "switch"].tolist() for status in expected}
    assert got == expected
    assert set(table.switch) == set(switches.BY_NAME)


def test_spellings_per_version(table):
    flags = dict(zip(table["switch"], table["flags"]))
    if compat._legacy():
        assert flags["cudagraph-off"] == ["-O.cudagraph_mode=NONE"]
        assert flags["compile-off"] == ["-O", "0"]
        assert flags["inductor-off"] == ["-O.use_inductor=False"]
    else:
        assert flags["cudagraph-off"] == ["-cc.cudagraph_mode=NONE"]
        assert flags["compile-off"] == ["-cc.mode=0"]
        assert flags["inductor-off"] == ["-cc.backend=eager"]


def test_cudagraph_switch_keeps_compilation(table):
    row = table.set_index("switch").loc["cudagraph-off"]
    assert row.after[0] == "NONE" and row.after[1] == row.before[1]


def test_the_spellings_that_look_right_but_are_not(scenario):
    """0.20.2 rejects the -O.key spelling outright; 0.10.1.1 accepts -O.backend=eager but keeps Inductor."""
    if compat._legacy():
        derived = scenario.derive("-O.backend=eager")
        assert compat.compilation_summary(derived.vllm_config)["compile_backend"] == "inductor"
    else:
        with pytest.raises(DiagError, match="optimization_level"):
            scenario.derive("-O.cudagraph_mode=NONE")


def test_candidates_are_broadest_first_and_combine(scenario):
    names = switches.candidates(scenario)
    order = list(switches.BY_NAME)
    assert names == sorted(names, key=order.index) and "budget-1" not in names
    flags, env = switches.apply(scenario, names)
    with switches.with_env(env):
        derived = scenario.derive(*flags)  # all switches on at once: vLLM accepts the combination
    cs = compat.compilation_summary(derived.vllm_config)
    assert cs["cudagraph_mode"] == "NONE" and cs["compile_backend"] == "eager"


def test_apply_rejects_conflicts_unknown_and_missing(scenario):
    with pytest.raises(DiagError, match="both set --max-num-batched-tokens"):
        switches.apply(scenario, ["budget+1", "budget-1"])
    with pytest.raises(DiagError, match="unknown kill switch 'cuda-graphs'"):
        switches.apply(scenario, ["cuda-graphs"])
    with pytest.raises(DiagError, match="pad-off is not available"):
        switches.apply(scenario, ["pad-off"])


def test_implicated_layer_in_words():
    assert switches.implicated(["cudagraph-off"]) == "CUDA graphs"
    assert switches.implicated(["budget+1", "inductor-off"]) == \
        "Inductor + token budget (batch exactly at max_num_batched_tokens)"
    assert "no narrower switch" in switches.implicated(["enforce-eager"])
    assert "not an optimisation layer" in switches.implicated(None)


def test_cli_switches(scenario_name, capsys):
    from diaglib.cli import main

    assert main(["switches", scenario_name]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("cudagraph-off"))
    assert "ok" in line and "CUDA graphs" in line
    assert ("-O.cudagraph_mode=NONE" if compat._legacy() else "-cc.cudagraph_mode=NONE") in line
