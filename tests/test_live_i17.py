"""Issue 17's H200 records (data/live/h200-vllm-0.20.2-i17) replayed on the CPU against diaglib's predictions,
made now by the installed vLLM: kernels against the census, the DeepSeek-V3 stand-in's steps, graph modes,
backends and memory against `diaglib show` / memory, and the fault hunt against the census and the catalog."""
from __future__ import annotations

from pathlib import Path

import pytest

from diaglib import compat
from diaglib.live import classify, compare, kernels, store
from diaglib.paths import DATA

R = DATA / "live" / "h200-vllm-0.20.2-i17"
pytestmark = pytest.mark.skipif(compat.installed() != "0.20.2", reason="the records are of vLLM 0.20.2")


def _check_kernels(summary, k):
    assert len(summary) and (summary["grids_predicted"] > 0).all()
    assert (summary["grids_equal"] == summary["grids_predicted"]).all()  # every grid the census predicts
    forward = summary[summary["census"].str.startswith(("prefill", "profile"))]
    assert (forward["foreseen"] / forward["kernels"] > 0.9).all()
    ran = summary[summary["observed_mode"].notna()]
    assert (ran["cudagraph"] == ran["observed_mode"]).all() and (ran["padded"] == ran["observed_tokens"]).all()
    assert k.loc[k["foreseen"], "census_row"].notna().all()


def test_glm_kernels_match_the_census():
    summary, k, _ = kernels.compare(R / "glm" / "live.jsonl", key="p8192")
    assert list(summary["census"]) == ["prefill 8192 tokens / 1 req", "decode 1 tokens / 1 req"]
    _check_kernels(summary, k)
    ops = set(k.loc[k["foreseen"], "op"])
    assert {"_vllm_fa3_C::fwd", "_C_cache_ops::reshape_and_cache_flash", "_C::cutlass_scaled_mm",
            "_moe_C::moe_permute", "_C::cutlass_moe_mm"} <= ops


def test_glm_profile_run_matches_the_census_profile_step():
    summary, k, _ = kernels.compare(R / "glm" / "live.jsonl", key="profile-run")
    assert summary["census"].iloc[0].startswith("profile 8192 tokens")
    _check_kernels(summary, k)
    assert "_vllm_fa3_C::fwd" not in set(k["op"])  # the profile run builds no attention metadata


def test_deepseek_prefill_kernels_match_the_census():
    summary, k, _ = kernels.compare(R / "deepseek" / "live.jsonl", key="p8192", steps=[0])
    _check_kernels(summary, k)
    foreseen = k[k["foreseen"]]
    assert {"_C::per_token_group_fp8_quant", "_vllm_fa3_C::fwd"} <= set(foreseen["op"])  # block FP8, MLA on FA3
    assert foreseen["name"].str.fullmatch("fused_moe_kernel").any()  # Triton experts, as predicted


@pytest.mark.parametrize("part", ["glm", "deepseek"])
def test_steps_and_graph_modes_match_the_scheduler_and_dispatcher(part):
    st = compare.steps(R / part / "live.jsonl")
    assert len(st) == 10 and st["tokens_match"].all() and st["mode_match"].all()
    assert set(st["observed_mode"]) == {"NONE", "FULL"}  # prefill chunks eager-dispatched, decodes on FULL graphs


def test_deepseek_engine_matches_diaglib_show():
    ec = compare.engine_config(R / "deepseek" / "live.jsonl")
    assert ec["match"].all(), ec[~ec["match"]].to_string()
    got = ec.set_index("item")["observed"]
    assert got["attention"][0]["backend"] == "FLASH_ATTN_MLA" and got["moe.experts"] == "TritonExperts"
    assert "CutlassFp8BlockScaledMMKernel" in got["linear_methods"][0]["kernels"]  # DeepGEMM off (not bundled)
    assert got["compilation.cudagraph_mode"] == "FULL_AND_PIECEWISE"


def test_deepseek_memory_against_the_budget():
    m = compare.memory(R / "deepseek" / "live.jsonl").set_index("item")
    assert abs(m.loc["weights", "error_pct"]) < 1 and abs(m.loc["KV cache", "error_pct"]) < 10
    assert 75 < m.loc["weights", "observed_gib"] < 85  # one TP-8 rank of the 671B model in FP8


@pytest.mark.parametrize("run,budget", [("hunt-llama-int32", 131072), ("hunt-deepseek-moe", 65536)])
def test_hunt_ran_past_the_census_int32_crossing_without_a_fault(run, budget):
    from diaglib.predict import census

    records = store.read(R / "hunt" / "live.jsonl")
    eng = next(e for e in records if e.get("type") == "engine" and e["run"] == run)
    sc = kernels._scenario_of(R / "hunt", eng)
    with compat.vllm_env(kernels._settings(eng)):
        th = census.thresholds(sc, "prefill")
    first = int(th["tokens"].dropna().min())
    probes = store.probes(R / "hunt" / "live.jsonl", run).set_index("key")
    assert {f"p{first - 1}", f"p{first}"} <= set(probes.index)
    assert (probes["outcome"] == "ok").all() and max(probes["total_tokens"]) >= budget - 1 > first


def _log(rec: dict) -> str:
    return (R / "hunt" / "logs" / rec["run"] / Path(rec["log"]).name).read_text(errors="replace")


def test_full_graph_fault_classifies_and_the_catalog_predicts_it():
    from diaglib.predict import known_issues
    from diaglib.scenario import load

    records = store.read(R / "hunt" / "fault.jsonl") + store.read(R / "hunt" / "live.jsonl")
    engines = {e["run"]: e for e in records if e.get("type") == "engine"}
    for run in ("hunt-full-graph", "fault-blocking", "fault-mml512", "fault-cap256"):
        eng = engines[run]
        out = classify.classify(_log(eng), returncode=eng.get("returncode"))
        faulted = out.outcome == "illegal_memory_access"
        assert faulted == (eng["outcome"] == "illegal_memory_access"), run
        sc = load(cmd=compare.local_command(eng["spec"], R / "hunt"), gpu="NVIDIA H200", gpu_count=1)
        applies, why, _ = known_issues.full_capture_over_mml(known_issues._Facts(sc))
        assert applies == faulted, (run, why)
    blocking = classify.classify(_log(engines["fault-blocking"]), returncode=engines["fault-blocking"]["returncode"])
    assert "flash_fwd_combine_launch_template" in blocking.detail and "FULL" in blocking.detail
