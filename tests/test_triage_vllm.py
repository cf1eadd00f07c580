"""diaglib triage on logs the installed vLLM itself produces, and on the seed log, under each CI release.

vLLM's lines come from vLLM (diaglib.triage.emit): the engine config line is a real VllmConfig through vLLM's
formatter, ``non-default args`` is vLLM's log_non_default_args on the command as vLLM's parser reads it, the
input dump is vLLM's dump_engine_exception on a SchedulerOutput of the scheduler diaglib drives, and a worker's
traceback comes from a fault planted in a child process logging through vLLM's logger after vLLM's
decorate_logs. Answers are compared with vLLM's own objects.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.predict import known_issues
from diaglib.predict.dispatch import dispatch
from diaglib.triage import crash, diagnose, emit, lines, parse, rebuild, replay, values

LOGS = Path(__file__).parent / "logs"
SEED = LOGS / "seed-glm46-fp8-0.10.1.1.log"
INT32_CLASSES = ("moe-triton-int32-offset", "int32-token-offset", "inductor-32bit-indexing")


def read(text: str) -> parse.LogFacts:
    return parse.parse(lines.decode(text))


@pytest.fixture(scope="module")
def scheduler_runs(scenario):
    """Skip what needs diaglib's drive of vLLM's scheduler where diaglib.compat does not reach this vLLM yet."""
    from diaglib.predict.schedule import Engine

    try:
        Engine(scenario, 64 << 30)
    except (AttributeError, ImportError, TypeError, DiagError) as e:
        pytest.skip(f"diaglib.compat cannot build vLLM {compat.installed()}'s scheduler yet: {e}")


# --- vLLM's own lines, read back ------------------------------------------------------------------

def test_engine_line_of_a_real_vllm_config(scenario):
    log = emit.Log()
    emit.engine_line(log, scenario)
    f = read(log.text())
    cfg = scenario.vllm_config
    import vllm

    assert f.version == vllm.__version__ and f.version_from == "engine config line"
    e = f.engine.config
    assert e["tensor_parallel_size"] == cfg.parallel_config.tensor_parallel_size
    assert e["max_seq_len"] == cfg.model_config.max_model_len
    assert e["model"] == "zai-org/GLM-4.6-FP8" and e["dtype"] == str(cfg.model_config.dtype)
    chunked = e.get("enable_chunked_prefill", e.get("chunked_prefill_enabled"))
    assert chunked == cfg.scheduler_config.enable_chunked_prefill
    cc = f.engine.compilation
    assert sorted(cc["cudagraph_capture_sizes"]) == sorted(cfg.compilation_config.cudagraph_capture_sizes)
    mode = getattr(cfg.compilation_config, "cudagraph_mode", None)  # a field from 0.10.1 on
    if mode is not None:
        assert values.enum_member(cc["cudagraph_mode"]) in (mode.name, str(mode.value), str(mode.value[0])
                                                           if isinstance(mode.value, tuple) else mode.name)


def test_non_default_args_rebuild_the_same_serve_arguments(scenario):
    from diaglib.scenario import parse_serve_args

    log = emit.Log()
    emit.non_default_args(log, scenario)
    f = read(log.text())
    rb = rebuild.command(f, gpu=scenario.gpu.name, gpu_count=scenario.gpu.count)
    assert rb.model == "zai-org/GLM-4.6-FP8" and not rb.missing
    rebuilt, original = parse_serve_args(shlex.split(rb.command)[1:]), parse_serve_args(scenario.argv)
    assert vars(rebuilt) == vars(original), "vLLM's parser reads the rebuilt command as the original"


def test_input_dump_of_one_prompt_at_the_budget(scenario, scheduler_runs):
    log = emit.Log()
    out = emit.crash_dump(log, scenario, [8192])
    d = read(log.text()).dump
    assert d.total_tokens == out.total_num_scheduled_tokens == 8192
    assert {r.req_id: r.tokens for r in d.requests} == {str(k): v for k, v in out.num_scheduled_tokens.items()}
    assert [(r.new, r.prompt_len, r.computed_before, r.phase) for r in d.requests] == [(True, 8192, 0, "last-prefill-chunk")]


def test_input_dump_of_a_mixed_step_agrees_with_the_scheduler_trace(scenario, scheduler_runs):
    from diaglib.predict import schedule, workload

    prompts = [8192, 8193, 20000]
    tr = schedule.trace(scenario, workload.prompts(*prompts, output_len=4), 64 << 30)
    k = 2  # the third step: a decode, a 2-token last chunk, a new prompt's first chunk
    want = tr.per_request[tr.per_request.step == tr.per_step[tr.per_step.forward].step.iloc[k]]
    log = emit.Log()
    out = emit.crash_dump(log, scenario, prompts, steps=k + 1)
    d = read(log.text()).dump
    assert d.total_tokens == out.total_num_scheduled_tokens == int(want.tokens.sum())
    got = sorted((r.tokens, r.new, r.phase) for r in d.requests)
    exp = sorted(want.tokens)
    assert [g[0] for g in got] == exp
    for (n, new, phase), (_, row) in zip(got, sorted(want.iterrows(), key=lambda x: x[1].tokens)):
        if row.phase == "decode":
            assert phase == "decode"
        else:
            assert phase in ("prefill-chunk", "last-prefill-chunk", "prefill") and (phase == row.phase or not new)


def test_a_fault_planted_in_a_child_worker():
    p = subprocess.run([sys.executable, "-m", "diaglib.triage.emit", "VllmWorker TP3", "8192"], capture_output=True,
                       text=True, timeout=600, check=False)
    f = read(p.stdout + p.stderr)
    c = crash.crash(f)
    assert c is not None, p.stdout + p.stderr
    if compat.decorate_logs() is None:  # this vLLM names no process in its output
        assert c.stream == ""
    else:
        assert re.fullmatch(r"VllmWorker TP3 pid=\d+", c.stream)
    assert c.outcome == "illegal_memory_access"
    assert (c.kernel, c.kernel_kind, c.surfaced_kind) == ("fused_moe_kernel", "triton kernel", "launch")
    assert [fr.func for fr in crash.root(f).frames][-3:] == ["_fused_experts", "_invoke_fused_moe_kernel", "launch"]
    assert "_fused_experts" in c.traceback and c.async_hint and c.exc_type == "RuntimeError"


# --- the seed log, end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def seed_any():
    """The seed log's triage, whatever diaglib reaches of this vLLM."""
    return diagnose.triage(SEED.read_bytes(), source=SEED.name)


@pytest.fixture(scope="module")
def seed(seed_any):
    """The seed log's triage where diaglib replays on this vLLM."""
    t = seed_any
    assert t.rebuilt.scenario is not None, t.rebuilt.error
    if t.replays and t.replays[0]["dispatch"] is None and "cannot drive" in " ".join(t.replays[0]["notes"]):
        pytest.skip(f"diaglib.compat does not reach vLLM {compat.installed()} yet: {t.replays[0]['notes'][0]}")
    return t


def test_seed_triage_says_what_it_cannot_replay(seed_any):
    """Whatever this vLLM lets diaglib do, the triage of the seed log answers (in notes where it cannot)."""
    t = seed_any
    assert t.step.describe() == "8,192 tokens, 1 request, the last prefill chunk" and t.suspects
    text = diagnose.format_text(t)
    assert "suspects" in text and ("replay" in text or "not replayable" in text)


def test_seed_names_the_step_and_what_vllm_does_with_it(seed):
    assert seed.step.describe() == "8,192 tokens, 1 request, the last prefill chunk"
    sc = seed.rebuilt.scenario
    want = dispatch(sc, 8192, num_reqs=1, max_query_len=8192)
    d = seed.replays[0]["dispatch"]
    assert (d["padded_tokens"], d["cudagraph_mode"], d["compile_kind"], d["compile_range"]) == \
           (8192, "NONE", want["compile_kind"], want["compile_range"])
    text = diagnose.format_text(seed)
    assert "no CUDA graph" in text and "8,192 tokens, 1 request, the last prefill chunk" in text
    if want["compile_kind"] == "range":
        assert f"compiled: range {tuple(want['compile_range'])}" in text
    else:
        assert "the dynamic-shape graph" in text
    words = shlex.split(seed.rebuilt.command)
    assert words[:3] == ["vllm", "serve", "zai-org/GLM-4.6-FP8"]
    assert sorted(words[3:]) == sorted(["--tensor-parallel-size", "8", "--enable-chunked-prefill",
                                        "--max-num-batched-tokens", "8192"])
    assert sc.vllm_config.scheduler_config.max_num_batched_tokens == 8192
    assert sc.gpu.name == "NVIDIA H20" and sc.gpu.count == 8


def test_seed_rules_out_the_int32_classes_with_their_thresholds(seed):
    matches = known_issues.match(seed.rebuilt.scenario).set_index("id")
    by_id = {s.id: s for s in seed.suspects}
    for cid in INT32_CLASSES:
        t = int(matches.loc[cid, "threshold_tokens"])
        s = by_id[cid]
        assert s.verdict == "ruled out", (cid, s)
        assert f"needs >= {t:,} tokens per step; this step had 8,192: ruled out" in " ".join(s.evidence_against)
    assert seed.explained and by_id["exactly-at-budget"].verdict == "fits"
    assert by_id["compile-range-edge"].verdict == "fits"
    assert by_id["cudagraph-capture-padding"].verdict == "ruled out", "the step ran no CUDA graph"
    assert by_id["async-misattribution"].verdict == "advice"
    assert any("kernel launch" in e for e in by_id["async-misattribution"].evidence_for)


def test_seed_proposes_commands_diaglib_accepts(seed):
    from diaglib.cli import build_parser

    got = {c["what"]: c for c in seed.next}
    assert list(got) == ["probe", "bisect", "evidence"]
    for c in got.values():
        argv = shlex.split(c["command"])
        assert argv == c["argv"] and argv[0] == "diaglib"
        args = build_parser().parse_args(argv[1:])
        assert args.gpu == "NVIDIA H20" and args.gpu_count == 8 and "--max-num-batched-tokens 8192" in args.cmd
    assert build_parser().parse_args(got["probe"]["argv"][1:]).lengths == "8192"
    b = build_parser().parse_args(got["bisect"]["argv"][1:])
    assert b.tokens == 8192 and b.switches and "budget+1" in b.switches.split(",")
    e = build_parser().parse_args(got["evidence"]["argv"][1:])
    assert e.tokens == 8192 and e.out == "evidence-8192"


def test_seed_version_is_said(seed):
    v = seed.version
    assert v["log"] == "0.10.1.1" and v["installed"] == compat.installed()
    assert v["same"] == (compat.installed() == "0.10.1.1")
    if not v["same"]:
        assert "answered by the installed vLLM" in v["note"]


def test_seed_page_is_self_contained(seed, tmp_path):
    from diaglib.present.triage_page import page

    html = page(diagnose.as_dict(seed))
    assert not re.search(r"<script|<link|@import|src=[\"']?https?:|url\(", html, re.IGNORECASE)
    assert html.count('src="data:image/png;base64,') == 1
    assert "8,192 tokens, 1 request, the last prefill chunk" in html


# --- safe to share ------------------------------------------------------------------------------------

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_page_escapes_every_string_and_redacts_secrets(monkeypatch):
    from diaglib.present.triage_page import page

    token = "hf_" + "Zq9x" * 8
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value-xyz")
    text = SEED.read_text().replace("'model_tag': 'zai-org/GLM-4.6-FP8'", f"'model_tag': 'zai-org/GLM-4.6-FP8', "
                                    f"'hf_token': '{token}', 'served_model_name': ['{EVIL}']")
    text = text.replace("/usr/local/lib/python3.12", "/home/alice/venv/lib/python3.12")
    text += ("(EngineCore_0 pid=2990) INFO 12-01 21:22:24 [parallel_state.py:1102] world_size=8 rank=0 "
             "distributed_init_method=tcp://gpu-node-17.corp.example.com:29500 backend=nccl s3cr3t-value-xyz\n")
    t = diagnose.triage(text, source=EVIL, resolve=False)
    html = page(diagnose.as_dict(t))
    assert "<script>alert" not in html and "<img src=x" not in html and "&lt;script&gt;" in html
    for secret in (token, "alice", "gpu-node-17", "corp.example.com", "s3cr3t-value-xyz"):
        assert secret not in html, secret
    plain = json.dumps(diagnose.as_dict(t)) + diagnose.format_text(t)
    for secret in (token, "alice", "gpu-node-17", "s3cr3t-value-xyz"):
        assert secret not in plain, secret


# --- without an input dump: candidate steps from the logged workload -----------------------------------

def test_candidate_steps_from_the_prompts_in_the_log(scenario, scheduler_runs):
    from diaglib.predict import schedule, workload

    log = emit.Log()
    emit.non_default_args(log, scenario)
    for i, n in enumerate((8192, 9000)):
        log.raw(f"(APIServer pid=1) DEBUG 01-01 00:00:00 [logger.py:54] Request cmpl-{i} details: prompt: None, "
                f"prompt_token_ids: [{', '.join(['7'] * n)}], prompt_embeds shape: None.")
    log.raw("(VllmWorker TP0 pid=3) ERROR 01-01 00:00:01 [x.py:1] Traceback (most recent call last):\n"
            '(VllmWorker TP0 pid=3) ERROR 01-01 00:00:01 [x.py:1]   File "/v/vllm/v1/worker/gpu_model_runner.py", '
            "line 1, in execute_model\n"
            "(VllmWorker TP0 pid=3) ERROR 01-01 00:00:01 [x.py:1] RuntimeError: CUDA error: an illegal memory access "
            "was encountered")
    t = diagnose.triage(log.text(), gpu=scenario.gpu.name, gpu_count=scenario.gpu.count)
    assert t.step is None and t.candidates
    tr = schedule.trace(t.rebuilt.scenario, workload.prompts(8192, 9000, output_len=2))
    fwd = tr.per_step[tr.per_step.forward]
    assert {(c.tokens, c.num_reqs) for c in t.candidates} == set(zip(fwd.total_tokens, fwd.num_reqs))
    assert t.candidates[0].tokens == 8192 and t.replays and t.next


# --- the kernel census (issue 14), where it exists ----------------------------------------------------

def test_census_headroom_at_the_step(seed):
    if replay.census_module() is None:
        pytest.skip(f"{replay.CENSUS_MODULE} is not on this branch")
    cen = seed.replays[0]["census"]
    assert cen["available"], cen
    assert cen["rows"] and all(0 <= r["frac_2_31"] for r in cen["rows"])


# --- the command line hands the log to its vLLM's environment ------------------------------------------

def test_cli_hands_the_log_to_its_vllm():
    if compat.installed() == "0.10.1.1":
        pytest.skip("the seed log's vLLM is the installed one")
    try:
        compat.venv_python("0.10.1.1")
    except Exception as e:  # noqa: BLE001
        pytest.skip(str(e))
    p = subprocess.run([sys.executable, "-m", "diaglib", "triage", str(SEED), "--json"], capture_output=True,
                       text=True, timeout=1500, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["version"]["installed"] == "0.10.1.1" and out["version"]["same"]
    assert out["source"] == SEED.name and "handing over to the vLLM 0.10.1.1 environment" in p.stderr
    d = out["replays"][0]["dispatch"]
    assert (d["cudagraph_mode"], d["padded_tokens"]) == ("NONE", 8192)


# --- a partial log: only the engine config line, the model folder given ---------------------------------

def test_only_the_config_line_rebuilds_with_the_model_dir():
    root = Path(__file__).resolve().parents[1]
    standin = root / "data" / "live" / "standins" / "GLM-4.6-FP8-tp8"
    t = diagnose.triage((LOGS / "only-config-0.20.2.log").read_bytes(), model_dir=str(standin), gpu="NVIDIA H200",
                        gpu_count=1)
    rb = t.rebuilt
    assert rb.scenario is not None, rb.error
    assert rb.model == "/work/main/data/live/standins/GLM-4.6-FP8-tp8" and str(standin) in rb.local_command
    assert any("--model-dir" in a for a in rb.assumed) and any("non-default args" in a for a in rb.assumed)
    assert rb.scenario.vllm_config.parallel_config.tensor_parallel_size == 1
    assert t.crash is None and t.step is None and not t.explained
    if t.version["same"]:  # the engine line's fields that differ are carried over as flags
        assert rb.differs == [] and "--skip-tokenizer-init" in rb.command
        assert rebuild.compare(t.facts, rb.scenario) == []
    else:
        assert all("a different release" in d for d in rb.differs)
    assert "no known class explains this" == diagnose.verdict(t)
