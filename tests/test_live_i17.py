"""Issue 17's H200 records (data/live/h200-vllm-0.20.2-i17) replayed on the CPU against diaglib's predictions,
made now by the installed vLLM: kernels against the census, the DeepSeek-V3 stand-in's steps, graph modes,
backends and memory against `diaglib show` / memory, and the fault hunt against the census and the catalog."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from diaglib import cache, compat
from diaglib.errors import DiagError
from diaglib.live import classify, compare, kernels, store
from diaglib.paths import DATA
from diaglib.predict import census

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


def test_a_kept_kernel_comparison_is_the_one_computed(tmp_path, monkeypatch):
    """The report keeps each probe's comparison in diaglib's cache: what comes back is what was computed (the
    census and the matching), and a changed kernel table is compared afresh."""
    import pandas as pd

    monkeypatch.setenv("DIAGLIB_CACHE_DIR", str(tmp_path / "cache"))
    path = R / "glm" / "live.jsonl"
    r = next(r for r in kernels.profiled(path) if r["key"] == "profile-run")
    rows, k, _ = kernels._compare_probe(path, r, kernels._engine_of(path, r), None)
    computed = kernels.compare(path, key="profile-run")
    assert cache.info()["by_namespace"]["kernels"] == 1  # the census on the way keeps its own (activation)
    kept = kernels.compare(path, key="profile-run")
    for a, b in zip(kept, computed):
        pd.testing.assert_frame_equal(a, b)
    assert kept[0].to_dict("records") == rows
    assert list(kept[1].columns) == list(k.columns) and list(kept[1]["grid"]) == list(k["grid"])  # tuples again
    copy = tmp_path / "glm"
    shutil.copytree(R / "glm", copy)
    table = copy / r["kernel_file"]
    t = kernels.read(table)
    kernels.write(t[t.groupby("step").cumcount() < 5], table)  # five kernels a step
    assert (kernels.compare(copy / "live.jsonl", key="profile-run")[0]["kernels"] == 5).all()
    assert cache.info()["by_namespace"]["kernels"] == 2


def test_a_copy_of_the_records_elsewhere_finds_the_kept_comparison(tmp_path, monkeypatch):
    """Kept comparisons are keyed by what the records show, not by where they lie or what their run is called
    (the report's benchmark copies them ten times): a renamed copy is served the kept answer, under its own name."""
    import json

    import pandas as pd

    monkeypatch.setenv("DIAGLIB_CACHE_DIR", str(tmp_path / "cache"))
    first = kernels.compare(R / "glm" / "live.jsonl", key="profile-run")
    copy = tmp_path / "elsewhere" / "glm"
    shutil.copytree(R / "glm", copy)
    lines = [json.loads(x) for x in (copy / "live.jsonl").read_text().splitlines() if x.strip()]
    (copy / "live.jsonl").write_text("".join(json.dumps({**r, "run": r["run"] + "-copy"} if "run" in r else r) + "\n"
                                             for r in lines))
    again = kernels.compare(copy / "live.jsonl", key="profile-run")
    assert cache.info()["by_namespace"] == {"kernels": 1}, "the copy was compared afresh"
    assert set(again[0]["run"]) == {r["run"] + "-copy" for r in lines if r.get("key") == "profile-run"}
    for a, b in zip(again, first):
        pd.testing.assert_frame_equal(a.drop(columns="run"), b.drop(columns="run"))


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


@pytest.mark.parametrize("folder,run", [("deepseek", "i17-deepseek"), ("glm", "i17-kernels")])
def test_kv_bytes_per_token_is_the_one_vllm_sized_the_cache_with(folder, run):
    """vLLM's log gives the KV cache's GiB and its tokens: their ratio is the per-token page size diaglib reads off
    vLLM's KV spec (MLA: one latent of kv_lora_rank + rope dims per layer, not K and V)."""
    from diaglib.predict.memory import kv_bytes_per_token

    eng = _engine(folder, run)
    sc = compare._scenario(compare.local_command(eng["spec"], R / folder), "NVIDIA H200")
    observed = eng["logged"]["kv_cache_gib"] * 2**30 / eng["logged"]["kv_cache_tokens"]
    assert kv_bytes_per_token(sc) == pytest.approx(observed, rel=2e-3)  # the log rounds GiB to 0.01


@pytest.mark.parametrize("folder,run", [("hybrid", "i17-hybrid-triton-gdn"), ("deepseek", "i17-deepseek"),
                                        ("glm", "i17-kernels")])
def test_kv_cache_size_is_the_one_vllm_logged_for_its_kv_memory(folder, run):
    """vLLM's sizing of the KV memory it logged, with the KV-cache specs the model's layers give themselves,
    holds the tokens vLLM logged: for the hybrid stand-in too, whose DeltaNet layers' state pages make every
    layer a full-attention layer's page four times over (taking them as full attention holds a quarter)."""
    from diaglib.predict.schedule import kv_specs

    eng = _engine(folder, run)
    sc = compare._scenario(compare.local_command(eng["spec"], R / folder), "NVIDIA H200")
    kv_cfg = compat.kv_cache_config(compat.private_config(sc.vllm_config), int(eng["logged"]["kv_cache_gib"] * 2**30),
                                    kv_specs(sc))[0]
    assert compat.kv_cache_tokens(sc.vllm_config, kv_cfg) == pytest.approx(eng["logged"]["kv_cache_tokens"],
                                                                          rel=2e-3)  # the log rounds GiB to 0.01
    uniform = compat.kv_cache_config(compat.private_config(sc.vllm_config), int(eng["logged"]["kv_cache_gib"] * 2**30))[0]
    assert (compat.kv_cache_tokens(sc.vllm_config, uniform) < 0.3 * eng["logged"]["kv_cache_tokens"]) == (folder == "hybrid")


def _engine(folder: str, run: str) -> dict:
    return next(e for e in store.read(R / folder / "live.jsonl") if e.get("type") == "engine" and e["run"] == run)


def _log(rec: dict, folder: str = "hunt") -> str:
    return (R / folder / "logs" / rec["run"] / Path(rec["log"]).name).read_text(errors="replace")


def _prefill_thresholds(folder: str, eng: dict):
    """The census's int32 crossings for the engine's command, under the settings it ran with."""
    from diaglib.predict import census

    with compat.vllm_env(kernels._settings(eng)):
        return census.thresholds(kernels._scenario_of(R / folder, eng), "prefill")


def _hybrid_log(run: str) -> str:
    return _log(_engine("hybrid", run), "hybrid")


def test_hybrid_engine_matches_diaglib_show_with_the_block_size_vllm_sets_after_loading():
    """The hybrid rank stand-in (gated DeltaNet + attention, MoE): every item of the engine's config as `show`
    predicts it, the KV block size included (vLLM raises it after loading the model, to fit the mamba page), but
    the MoE experts: the device's bundle has no FlashInfer, which this environment has, so vLLM fell back to
    Triton there (its log lists the candidates)."""
    ec = compare.engine_config(R / "hybrid" / "live.jsonl", run="i17-hybrid-triton-gdn").set_index("item")
    assert list(ec.index[~ec["match"]]) == ["moe.experts"]
    assert (ec.loc["moe.experts", "predicted"], ec.loc["moe.experts", "observed"]) == ("FlashInferExperts",
                                                                                      "TritonExperts")
    log = _hybrid_log("i17-hybrid-triton-gdn")
    assert "Using TRITON Unquantized MoE backend out of potential backends: ['FlashInfer TRTLLM'" in log
    block = ec.loc["cache.block_size", "observed"]
    assert f"Setting attention block size to {block} tokens" in log and block > 16  # not the resolved config's


def test_hybrid_steps_and_graph_modes_match_the_scheduler_and_dispatcher():
    st = compare.steps(R / "hybrid" / "live.jsonl")
    assert set(st["run"]) == {"i17-hybrid-triton-gdn"} and len(st) >= 8
    assert st["tokens_match"].all() and st["mode_match"].all()


def test_hybrid_flashinfer_gdn_prefill_without_flashinfer_fails_every_prefill_and_the_switch_passes():
    """vLLM 0.20.2 picks FlashInfer's GDN prefill kernel on sm90 without checking that FlashInfer is installed:
    the engine starts (its warm-up only warns) and every step with a prefill fails; --gdn-prefill-backend triton
    (the switch vLLM's own message names) passes the same probes."""
    path = R / "hybrid" / "live.jsonl"
    bad, good = store.probes(path, "i17-hybrid").set_index("key"), store.probes(path, "i17-hybrid-triton-gdn")
    forward = bad.drop(index="profile-run")
    assert (forward["outcome"] == "python_error").all()
    assert forward["detail"].str.contains("No module named 'flashinfer'").all()
    assert bad.loc["profile-run", "outcome"] == "ok" and (good["outcome"] == "ok").all()
    assert "Using FlashInfer GDN prefill kernel" in _hybrid_log("i17-hybrid")
    assert "Using Triton/FLA GDN prefill kernel" in _hybrid_log("i17-hybrid-triton-gdn")


@pytest.mark.parametrize("run,kernel", [("i17-hybrid", "forward_cuda"), ("i17-hybrid-triton-gdn", None)])
def test_show_predicts_the_gdn_prefill_kernel_each_engine_logged(run, kernel):
    """`show` names the CustomOps vLLM dispatches to their custom kernel: ChunkGatedDeltaRule.forward_cuda is
    vLLM's FlashInfer GDN prefill (its log line "Using FlashInfer GDN prefill kernel"); with the switch, none."""
    from diaglib.predict import architecture

    eng = _engine("hybrid", run)
    sc = kernels._scenario_of(R / "hybrid", eng)
    got = {c["class"]: c["runs"] for c in architecture.facts(sc)["custom_kernels"]}
    assert got.get("ChunkGatedDeltaRule") == kernel
    assert ("Using FlashInfer GDN prefill kernel" in _log(eng, "hybrid")) == (kernel is not None)


def test_triage_of_the_gdn_prefill_log_names_the_missing_package_vllm_requires():
    """diaglib triage on the failing hybrid run's log: the fatal traceback after the input dump is the crash
    (not the warm-up's, which vLLM logged as a warning and survived), the step is the probe's, and the class
    that fits is the missing package, with the pin read off the installed vLLM's own metadata."""
    import importlib.metadata

    from diaglib.triage import diagnose

    eng = _engine("hybrid", "i17-hybrid")
    t = diagnose.triage(_log(eng, "hybrid"), source="log", model_dir=str(DATA / "live" / "standins"))
    assert t.crash.exc_type == "ModuleNotFoundError" and t.crash.during == "serving step"
    assert t.crash.line > t.facts.dump.line and t.crash.surfaced_kind == "other"
    assert any(tb.survived for tb in t.facts.tracebacks)  # the warm-up's, kept as such
    assert (t.step.tokens, t.step.num_reqs) == (8191, 1)
    best = t.suspects[0]
    assert (best.id, best.verdict) == ("required-package-missing", "fits")
    pin = next(r for r in importlib.metadata.requires("vllm") if r.startswith("flashinfer-python"))
    assert best.fix == ["pip", "install", pin.replace(" ", "").split(";")[0]]
    assert t.next[0]["command"] == "pip install " + best.fix[2]
    others = [s for s in t.suspects[1:] if s.verdict == "fits"]
    assert not others, [s.id for s in others]


@pytest.mark.parametrize("run,budget", [("hunt-llama-int32", 131072), ("hunt-deepseek-moe", 65536)])
def test_hunt_ran_past_the_census_int32_crossing_without_a_fault(run, budget):
    first = int(_prefill_thresholds("hunt", _engine("hunt", run))["tokens"].dropna().min())
    probes = store.probes(R / "hunt" / "live.jsonl", run).set_index("key")
    assert {f"p{first - 1}", f"p{first}"} <= set(probes.index)
    assert (probes["outcome"] == "ok").all() and max(probes["total_tokens"]) >= budget - 1 > first


@pytest.mark.parametrize("run,kernel", [("hunt-awq-machete", "machete"), ("hunt-awq-marlin", "marlin")])
def test_int4_awq_steps_past_the_census_crossing_ran_through_the_kernel_vllm_picks_on_the_cpu(run, kernel):
    eng = _engine("hunt-awq", run)
    th = _prefill_thresholds("hunt-awq", eng).dropna(subset=["tokens"])
    first = th[th["tokens"] == th["tokens"].min()]  # gate_up_proj's output and the activation over it: a tie
    crossing = first[first["module"].str.endswith("gate_up_proj")].iloc[0]
    assert kernel in crossing["op"]
    log = _log(eng, "hunt-awq")
    assert re.search(rf"Using {kernel}LinearKernel for AWQMarlinLinearMethod", log, re.I)
    probes = store.probes(R / "hunt-awq" / "live.jsonl", run).set_index("key")
    below, above = probes.loc["b2x18157", "total_tokens"], probes.loc["b2x18158", "total_tokens"]
    assert below < int(crossing["tokens"]) <= above and max(probes["total_tokens"]) >= 65534
    assert (probes["outcome"] == "ok").all()  # the int32 crossing is headroom the kernels do not need


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


# --- compute-sanitizer, third try (hunt/sanitizer3.jsonl, fault-sanitizer3*.txt) ---------------------------------

def _s3() -> list[dict]:
    return store.read(R / "hunt" / "sanitizer3.jsonl")


def _s3_log(rec: dict) -> str:
    return (R / "hunt" / rec["log"]).read_text(errors="replace")


def test_sanitizer3_engine_runs_reclassify_and_fault_only_with_the_full_list_and_a_large_kv_cache():
    engines = {r["run"]: r for r in _s3() if r["type"] == "engine"}
    assert len(engines) == 9
    for run, rec in engines.items():
        log = _s3_log(rec)
        assert "--max-model-len 256 --max-num-seqs 256 -cc.cudagraph_mode=FULL" in rec["command"]
        assert f"--kv-cache-memory-bytes {rec['kv_cache_gib'] << 30}" in rec["command"]
        assert ("cudagraph_capture_sizes=[512]" in rec["command"]) == (rec["capture_sizes"] == "[512]")
        if rec["outcome"] == "ready":
            assert "ENGINE READY" in log and rec["returncode"] == 0, run
        else:
            out = classify.classify(log, returncode=rec["returncode"])
            assert out.outcome == rec["outcome"], run
    plain = {r["run"]: r for r in engines.values() if not r["sanitizer"]}
    faulted = {run for run, r in plain.items() if r["outcome"] == "illegal_memory_access"}
    assert faulted == {run for run, r in plain.items() if r["capture_sizes"] != "[512]" and r["kv_cache_gib"] >= 80}
    assert faulted == {"s3-plain-kv100-all", "s3-plain-kv80-all"}
    for run in faulted:  # the hunt's message: the combine kernel's launch check, before the first of 51 captures
        assert "flash_fwd_combine_launch_template.h:60" in plain[run]["detail"]
        assert plain[run]["captures_done"] == "0/51"
    assert plain["s3-plain-kv4-all"]["captures_done"] == "51/51"  # the same 51 captures pass with a 4 GiB KV cache


def test_sanitizer3_catalog_predicate_names_a_risk_not_a_certain_fault():
    from diaglib.predict import known_issues
    from diaglib.scenario import load

    plain = [r for r in _s3() if r["type"] == "engine" and not r["sanitizer"]]
    for rec in plain:  # every engine of the visit captures FULL graphs above max_model_len; three of five started
        cmd = re.sub(r"serve \S+/standins/(\S+)", lambda m: f"serve {DATA / 'live' / 'standins' / m.group(1)}",
                     rec["command"])  # the device's checkout -> this one
        sc = load(cmd=cmd, gpu="NVIDIA H200", gpu_count=1)
        assert known_issues.full_capture_over_mml(known_issues._Facts(sc))[0], rec["run"]
    assert sorted(r["outcome"] for r in plain) == ["illegal_memory_access"] * 2 + ["ready"] * 3


def test_sanitizer3_memcheck_never_caught_the_fault_inside_the_engine():
    from diaglib.live.evidence import sanitizer_first_error

    text = (R / "hunt" / "fault-sanitizer3-engine.txt").read_text()
    assert "Invalid __global__" not in text
    runs = [r for r in _s3() if r["type"] == "engine" and r["sanitizer"]]
    assert {r["run"] for r in runs} == {"s3-memcheck-kv4-c512", "s3-memcheck-kv100-all", "s3-memcheck-kv80-all",
                                        "s3-memcheck-kv64-all"}
    sections = dict(re.findall(r"^## (s3-memcheck-\S+?):.*?\n(.*?)(?=^## s3-|\Z)", text, re.MULTILINE | re.DOTALL))
    assert set(sections) == {r["run"] for r in runs}
    for r in runs:
        assert "--kernel-name kns=flash" in r["sanitizer"]
        first = sanitizer_first_error(sections[r["run"]])
        if r["outcome"] == "ready":
            assert first is None and "ERROR SUMMARY: 0 errors" in sections[r["run"]]
        else:  # out of memory under memcheck; at 80 and 64 GiB only after the faulting 512-token capture went through
            assert r["outcome"] == "out_of_memory" and "out of memory" in first["error"]
    by = {r["run"]: r for r in runs}
    assert by["s3-memcheck-kv80-all"]["captures_done"] == "3/51"
    assert by["s3-memcheck-kv64-all"]["captures_done"] == "9/51"


def test_sanitizer3_standalone_fa3_names_the_forward_kernel_not_the_combine():
    from diaglib.live.evidence import sanitizer_first_error

    fa3 = {r["args"]: r for r in _s3() if r["type"] == "fa3" and not r["sanitizer"]}
    bad = "--seq 512 --width 16 --tail poison"
    assert {a for a, r in fa3.items() if r["outcome"] != "ok"} == {bad}  # the controls pass
    out = classify.classify(_s3_log(fa3[bad]), returncode=fa3[bad]["returncode"])
    assert out.outcome == "illegal_memory_access" and "flash_fwd_combine_launch_template.h:60" in out.detail
    first = sanitizer_first_error((R / "hunt" / "fault-sanitizer3.txt").read_text())
    assert first["error"] == "Invalid __global__ read of size 16 bytes"
    at = next(ln for ln in first["lines"].splitlines() if " at " in ln)
    assert "flash::FlashAttnFwdSm90<" in at and "Combine" not in at and "VarlenDynamicPersistentTileScheduler" in at
    m = re.search(r"Access to (0x[0-9a-f]+) is out of bounds", first["lines"])
    assert m and int(m.group(1), 16) - (1 << 30) * 16 * 8 * 128 * 2 == 0x7fc8d0004600  # block id 2**30 x 32 KiB
    assert "run_flash_fwd<90, 128, 128" in first["lines"] and "mha_fwd" in first["lines"]


def test_sanitizer3_parser_names_the_kernel():
    from diaglib.live.evidence import sanitizer_first_error

    first = sanitizer_first_error((R / "hunt" / "fault-sanitizer3.txt").read_text())
    assert "FlashAttnFwdSm90" in (first["kernel"] or "")


def test_bisect_of_the_gdn_fault_replays_from_its_store_and_names_the_missing_package(tmp_path, capsys):
    """`diaglib bisect` on the H200 ran one probe (8190 tokens) and took four from the hybrid stand-in's records;
    here the same command finds every result in the store, runs nothing, and gives the same answer."""
    import json

    from diaglib.cli import main

    store_path = tmp_path / "live.jsonl"
    shutil.copy(R / "bisect" / "live.jsonl", store_path)
    argv = ["bisect", "hybrid-gdn", "--tokens", "8191", "--switches", "gdn-prefill-triton", "--range", "8190:8193",
            "--store", str(store_path), "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["complete"] and got["minimal"] == ["gdn-prefill-triton"] and got["runs"] == 0
    assert (got["failing_low"], got["failing_high"]) == (8190, 8193)
    assert got["error"] == "ModuleNotFoundError: No module named 'flashinfer'"
    fits = [c["id"] for c in got["classes"] if c["verdict"] == "fits"]
    assert fits == ["required-package-missing"]
    ran = (R / "bisect" / "bisect.txt").read_text()
    assert "runs: 1 new, 4 from the store" in ran and "(none)    8190 python_error    False    run" in ran
    again = (R / "bisect" / "bisect-again.txt").read_text()  # on the H200 after the fixes: the store alone
    assert "runs: 0 new, 5 from the store" in again and "known classes that fit: required-package-missing" in again


# --- one H100 (data/live/h100-vllm-0.20.2-i17): gemma-3-27b's language model past its census int32 crossing ---

H100 = DATA / "live" / "h100-vllm-0.20.2-i17"


def _h100_engine(store_path: Path) -> dict:
    return next(e for e in store.read(store_path) if e.get("type") == "engine")


@pytest.mark.parametrize("store_path", sorted(R.glob("*/live.jsonl")) + [H100 / "live.jsonl"],
                         ids=lambda p: p.parent.name)
def test_every_recorded_engine_has_its_weights_and_kv_cache_predicted(store_path):
    """The budget's weights (vLLM's meta model) and KV cache (GPU memory x utilization - weights - the profile
    run's activation estimate, then vLLM's sizing) against every engine's log: dense models at 65,536 and
    131,072 tokens per step included, whose MLP gate/up output is the largest activation of the profile run."""
    m = compare.memory(store_path)
    if m.empty:
        pytest.skip("no engine with a KV cache in this store")
    for item, tolerance in (("weights", 3), ("KV cache", 10)):
        rows = m[(m["item"] == item) & m["error_pct"].notna()]
        assert len(rows) and (rows["error_pct"].abs() < tolerance).all(), rows.to_string()


def test_gemma_sliding_window_kv_cache_holds_the_tokens_vllm_logged():
    """Gemma-3's 52 sliding-window and 10 global layers in vLLM's KV-cache groups (fp8): the 15.3 GiB vLLM
    logged hold 57,289 tokens (vLLM pads the groups to equal size: "Add 8 padding layers"); one group of 62
    global layers would report 13% more."""
    from diaglib.predict.schedule import kv_specs

    eng = _h100_engine(H100 / "live.jsonl")
    sc = compare._scenario(compare.local_command(eng["spec"], H100), eng["info"]["gpu_name"])
    kv = int(eng["logged"]["kv_cache_gib"] * 2**30)
    kv_cfg = compat.kv_cache_config(compat.private_config(sc.vllm_config), kv, kv_specs(sc))[0]
    assert len(kv_cfg.kv_cache_groups) > 1
    assert compat.kv_cache_tokens(sc.vllm_config, kv_cfg) == pytest.approx(eng["logged"]["kv_cache_tokens"], rel=2e-3)
    uniform = compat.kv_cache_config(compat.private_config(sc.vllm_config), kv)[0]
    assert compat.kv_cache_tokens(sc.vllm_config, uniform) > 1.1 * eng["logged"]["kv_cache_tokens"]  # 64,688


def test_gemma_at_its_int32_crossing_ran_out_of_memory_allocating_the_tensor_the_census_names():
    """49,932 tokens passed; 49,933, the census's first int32 crossing (gate_up_proj out, N x 43008 bf16), ran out
    of memory asking for that tensor: 2**31 elements of 2 bytes are 4 GiB, one allocator rounding step more than
    the 4 GiB blocks the step before had cached (the profile run's 65,536 tokens had passed at start-up)."""
    eng = _h100_engine(H100 / "live.jsonl")
    with compat.vllm_env(kernels._settings(eng)):
        th = census.thresholds(kernels._scenario_of(H100, eng), "prefill").dropna(subset=["tokens"])
    first = th[th["tokens"] == th["tokens"].min()]
    crossing = first[first["module"].str.endswith("gate_up_proj")].iloc[0]
    n = int(crossing["tokens"])
    probes = store.probes(H100 / "live.jsonl", eng["run"]).set_index("key")
    assert probes.loc[f"p{n - 1}", "outcome"] == "ok" and probes.loc[f"p{n}", "outcome"] == "out_of_memory"
    asked = float(re.search(r"Tried to allocate ([\d.]+) GiB", probes.loc[f"p{n}", "detail"]).group(1))
    assert asked == round(n * crossing["slope"] * 2 / 2**30, 2) == 4.0  # the crossing tensor, in bf16
    oom = next(r for r in store.read(H100 / "live.jsonl") if r.get("key") == f"p{n}")
    assert oom["memory"]["alloc_retries"] > 0  # cached blocks were freed and it still did not fit


def test_gemma_at_the_default_max_model_len_is_refused_as_diaglib_predicts():
    """The first attempt (max_model_len 131,072 on one H100) stopped at start-up in vLLM's KV-cache check; diaglib's
    budget stops there too, in vLLM's own words and with the KV memory one request needs that vLLM logged."""
    from diaglib.predict import memory

    folder = H100 / "attempts" / "1-max-model-len-131072"
    eng = _h100_engine(folder / "hunt.jsonl")
    log = (folder / "logs" / eng["run"] / Path(eng["log"]).name).read_text()
    needed = re.search(r"\(([\d.]+) GiB KV cache is needed", log).group(1)
    gpu = (H100 / "gpu.txt").read_text().splitlines()[1].split(",")[0]  # nvidia-smi's name: the engine never got ready
    sc = compare._scenario(compare.local_command(eng["spec"], H100), gpu)
    with pytest.raises(DiagError, match=rf"To serve at least one request.*\({re.escape(needed)} GiB KV cache is needed"):
        memory.budget(sc)


def test_triage_of_the_out_of_memory_log_fits_the_memory_class_not_the_int32_crossing_it_sits_on():
    """diaglib triage on the H100 engine's log: the 49,933-token step is the census's int32 crossing, yet the
    crash is an allocation that did not fit (PyTorch's sizes: 4.00 GiB asked, 3.43 free, 5.26 reserved but
    unallocated): the memory class fits, the int32 classes are ruled out by the crash itself."""
    from diaglib.triage import diagnose

    eng = _h100_engine(H100 / "live.jsonl")
    log = (H100 / "logs" / eng["run"] / Path(eng["log"]).name).read_text()
    t = diagnose.triage(log, source="log", model_dir=str(compare.model_folder(eng["spec"], H100)))
    assert t.crash.outcome == "out_of_memory" and t.crash.during == "serving step" and t.step.tokens == 49933
    best = t.suspects[0]
    assert (best.id, best.verdict) == ("step-out-of-memory", "fits")
    assert any("fragmentation" in e for e in best.evidence_for)
    by_id = {s.id: s for s in t.suspects}
    for cls in ("int32-token-offset", "inductor-32bit-indexing"):
        assert any("reached" in e for e in by_id[cls].evidence_for)  # the step is past the crossing...
        assert by_id[cls].verdict == "ruled out"                      # ...and the crash is not a device fault
