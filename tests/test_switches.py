"""The kill-switch catalogue, checked against the installed vLLM's parser and resolved configuration."""
from __future__ import annotations

import pytest

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.predict import switches

pytestmark = pytest.mark.contract

# What each switch does on the seed scenario under the CI releases (vLLM's answers, checked by verify()).
# moe-backend's fact comes from the MoE layers (predict.layers): it has a test of its own below.
EXPECTED = {
    "0.33.0": {"ok": ["enforce-eager", "compile-off", "cudagraph-off", "inductor-off", "chunked-prefill-off",
                      "async-off", "budget+1", "attention-backend", "budget-1"],
               "unavailable": ["moe-chunk-off", "moe-chunk-half", "pad-off"], "no effect": ["gdn-prefill-triton"]},
    "0.20.2": {"ok": ["enforce-eager", "compile-off", "cudagraph-off", "inductor-off", "chunked-prefill-off",
                      "async-off", "budget+1", "attention-backend", "budget-1"],
               "unavailable": ["moe-chunk-off", "moe-chunk-half", "pad-off"], "no effect": ["gdn-prefill-triton"]},
    "0.10.1.1": {"ok": ["enforce-eager", "compile-off", "cudagraph-off", "inductor-off", "budget+1",
                        "moe-chunk-half", "attention-backend", "budget-1"],
                 "unavailable": ["gdn-prefill-triton", "pad-off"],
                 # the V1 engine of 0.10 forces chunked prefill on; async scheduling is off by default;
                 # MoE chunking starts at 32768 tokens: turning it off changes nothing at an 8192 budget
                 "no effect": ["chunked-prefill-off", "async-off", "moe-chunk-off"]},
}
ALWAYS_OK = ["enforce-eager", "compile-off", "cudagraph-off", "inductor-off", "budget+1", "budget-1"]


@pytest.fixture(scope="module")
def table(scenario):
    return switches.verify(scenario)


def test_every_switch_is_verified_by_vllm(table):
    t = table[table.switch != "moe-backend"]
    got = {status: t.loc[t.status == status, "switch"].tolist() for status in ("ok", "unavailable", "no effect")}
    assert set(ALWAYS_OK) <= set(got["ok"])  # on every release
    assert set(table.switch) == set(switches.BY_NAME)
    assert not (set(t.status) - {"ok", "no effect", "unavailable", "rejected"})
    expected = EXPECTED.get(compat.installed())
    if expected is None:
        pytest.skip(f"no recorded expectations for vLLM {compat.installed()} (the CI releases have them)")
    assert got == expected


@pytest.mark.parametrize("gpu,effect", [("NVIDIA H200", "ok"), ("NVIDIA A100-SXM4-80GB", "no effect")])
def test_gdn_prefill_switch_replaces_the_flashinfer_kernel_vllm_picks_on_sm90(gpu, effect):
    """On a hybrid model vLLM dispatches its GDN prefill CustomOp to FlashInfer's kernel on sm90 only; the switch
    takes it off there (the custom kernel is gone from vLLM's meta model) and has nothing to replace on sm80."""
    from diaglib.scenario import load

    if "--gdn-prefill-backend" not in compat.serve_options():
        pytest.skip(f"vLLM {compat.installed()} has no --gdn-prefill-backend")
    sc = load(cmd="vllm serve data/models/Qwen3-Next-80B-A3B-Thinking -tp 4", gpu=gpu, gpu_count=8)
    row = switches.verify(sc, ["gdn-prefill-triton"]).iloc[0]
    assert row["status"] == effect, row["note"]
    if effect == "ok":
        assert "ChunkGatedDeltaRule.forward_cuda" in row["before"] and row["after"] == ()
        assert row["flags"] == ["--gdn-prefill-backend", "triton"]


def test_moe_backend_switch(table):
    row = table.set_index("switch").loc["moe-backend"]
    if row.status == "unverified":  # pending: the MoE layers of this release (predict.layers)
        pytest.xfail(f"MoE backend not readable on this vLLM yet: {row.note}")
    assert row.status in ("ok", "unavailable")


def test_moe_backend_switch_has_nothing_to_replace_on_a_dense_model():
    """A dense model builds no fused-MoE layer on vLLM's meta model: the MoE-backend switch cannot act there."""
    from diaglib.scenario import load

    sc = load(cmd="vllm serve data/models/Llama-3.1-8B-Instruct", gpu="NVIDIA H200", gpu_count=1)
    row = switches.verify(sc, ["moe-backend"]).iloc[0]
    if row["status"] == "unavailable":
        pytest.skip(f"vLLM {compat.installed()} has no MoE-backend switch: {row['note']}")
    assert row["status"] == "no effect" and "no fused-MoE layer" in row["note"], row["note"]
    assert switches.format_text(switches.verify(sc, ["moe-backend"])).splitlines()[0].startswith("switch ")


def test_spellings_are_this_parsers(scenario, table):
    """Each spelling parses with this vLLM's serve parser, and the compilation switches use the
    compilation-config flag's own short form."""
    from diaglib.compat.parsing import option_alias
    from diaglib.scenario import parse_serve_args

    for r in table.itertuples():
        if r.flags:
            parse_serve_args(["serve", str(scenario.model_dir), *r.flags])
    cc = option_alias("--compilation-config")
    flags = dict(zip(table["switch"], table["flags"]))
    for name in ("compile-off", "cudagraph-off", "inductor-off"):
        assert flags[name][0].startswith(cc + ".")


def test_cudagraph_switch_keeps_compilation(table):
    row = table.set_index("switch").loc["cudagraph-off"]
    assert row.after[0] == "NONE" and row.after[1] == row.before[1]


def test_the_spellings_that_look_right_but_are_not(scenario):
    """Where use_inductor picks the backend, -O.backend=eager is accepted but Inductor stays; where -O is the
    optimization level, -O.key=value is refused or rewritten to the compilation config (-cc)."""
    from diaglib.compat.compile import inductor_by_flag
    from diaglib.compat.parsing import option_alias

    if inductor_by_flag():
        derived = scenario.derive(f"{option_alias('--compilation-config')}.backend=eager")
        assert compat.compilation_summary(derived.vllm_config)["compile_backend"] == "inductor"
    if option_alias("--compilation-config") != "-O":
        try:
            derived = scenario.derive("-O.cudagraph_mode=NONE")
        except DiagError as e:
            assert "optimization_level" in str(e) or "-O" in str(e)
        else:
            assert compat.compilation_summary(derived.vllm_config)["cudagraph_mode"] == "NONE"


def test_candidates_are_broadest_first_and_combine(scenario):
    names = switches.candidates(scenario)
    order = list(switches.BY_NAME)
    assert names == sorted(names, key=order.index) and "budget-1" not in names
    flags, env = switches.apply(scenario, names)
    with compat.with_env(env):
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
    from diaglib.compat.parsing import option_alias

    assert f"{option_alias('--compilation-config')}.cudagraph_mode=NONE" in line
