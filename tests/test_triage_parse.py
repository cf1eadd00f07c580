"""diaglib.triage reading logs without vLLM: hand-written excerpts of every shape, and no input ever a traceback.

The logs vLLM itself writes (engine line, non-default args, input dump, a worker's traceback) are read in
tests/test_triage_vllm.py under each CI release; here are the shapes around them (tests/logs/*.log).
"""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from diaglib.errors import DiagError
from diaglib.triage import crash, dump, lines, parse, tracebacks, values
from diaglib.triage.diagnose import release_of

LOGS = Path(__file__).parent / "logs"
SEED = LOGS / "seed-glm46-fp8-0.10.1.1.log"


def facts(name: str | bytes) -> parse.LogFacts:
    data = name if isinstance(name, bytes) else (LOGS / name).read_bytes()
    return parse.parse(lines.decode(data))


# --- values: vLLM's printed objects -----------------------------------------------------------------

def test_values_read_every_notation_vllm_prints():
    v = values.value("{'mode': <CompilationMode.VLLM_COMPILE: 3>, 'sizes': [1, 2], \"x\": {\"level\":3}, 'n': None}")
    assert v == {"mode": "CompilationMode.VLLM_COMPILE", "sizes": [1, 2], "x": {"level": 3}, "n": None}
    call = values.value("SchedulerOutput(a=[NewRequestData(req_id=cmpl-1,prompt_token_ids_len=8)], b={r-1: 8}, c=[false])")
    assert call.name == "SchedulerOutput" and call["a"][0]["req_id"] == "cmpl-1" and call["b"] == {"r-1": 8}
    assert call["c"] == [False]
    assert values.value("[1, 2, (3") == [1, 2, (3,)], "a cut-off line keeps what came before the cut"
    f = values.fields("model='/m', dtype=torch.bfloat16, tp=8, kernel_config=KernelConfig(x='a, b=c'), last=/p, q")
    assert f["model"] == "/m" and f["dtype"] == "torch.bfloat16" and f["tp"] == 8
    assert f["kernel_config"]["x"] == "a, b=c" and f["last"] == "/p, q"


@pytest.mark.parametrize("text", ["", "(" * 5000, "{" * 300 + "'", "<<<>>>", "a=b=c, =, ,,", "\x00\x01'\"", "[" * 70])
def test_values_never_raise(text):
    values.value(text)
    values.fields(text)


# --- lines: prefixes, colours, CRLF, containers, JSON -----------------------------------------------------

def test_every_prefix_is_taken_off_and_kept():
    raw = ("\x1b[1;36m(VllmWorker TP3 pid=9)\x1b[0;0m ERROR 08-26 12:00:01 [core.py:74] boom\r\n"
           "vllm-1  | #033[0;36m(EngineCore pid=4)#033[0;0m #033[32mINFO#033[0m 11-02 10:00:00 [core.py:140] ok\n"
           "2025-09-14T08:10:00.123Z stdout F (APIServer pid=1) WARNING 09-14 08:10:00 [x.py:1] w\n"
           "MYPREFIX (Worker pid=7) INFO 01-02 03:04:05 [a.py:9] pre\n"
           "plain line\n")
    got = [(ln.proc, ln.pid, ln.level, ln.src, ln.text) for ln in lines.records(raw)]
    assert got == [("VllmWorker TP3", 9, "ERROR", "core.py:74", "boom"), ("EngineCore", 4, "INFO", "core.py:140", "ok"),
                   ("APIServer", 1, "WARNING", "x.py:1", "w"), ("Worker", 7, "INFO", "a.py:9", "pre"),
                   (None, None, None, None, "plain line")]


def test_json_records_0_32_and_later():
    f = facts("json-0.33.0.log")
    assert f.version == "0.33.0" and f.model == "Qwen/Qwen3-30B-A3B-FP8" and f.budget == 16384
    assert f.non_default_args["max_num_batched_tokens"] == 16384
    tb = crash.root(f)
    assert tb.stream == "Worker pid=4301" and tb.outcome == "illegal_memory_access"
    assert tracebacks.kernel(tb) == ("_moe_C.moe_permute", "vLLM custom op")


@pytest.mark.parametrize("transform", [
    lambda b: b.replace(b"\n", b"\r\n"),
    lambda b: b.replace(b"\x1b[", b"#033["),
    lambda b: b"".join(b"vllm-1  | " + ln for ln in b.splitlines(keepends=True)),
    lambda b: b.replace(b"\x1b[1;36m", b"").replace(b"\x1b[0;0m", b""),
], ids=["crlf", "syslog-escapes", "compose-prefix", "no-colour"])
def test_the_seed_log_reads_the_same_however_it_is_wrapped(transform):
    plain, wrapped = facts(SEED.read_bytes()), facts(transform(SEED.read_bytes()))
    assert (wrapped.version, wrapped.non_default_args, wrapped.budget, wrapped.gpus) == \
           (plain.version, plain.non_default_args, plain.budget, plain.gpus)
    assert [(t.stream, t.exc_type, len(t.frames)) for t in wrapped.tracebacks] == \
           [(t.stream, t.exc_type, len(t.frames)) for t in plain.tracebacks]
    assert wrapped.dump.as_dict() | {"line": 0} == plain.dump.as_dict() | {"line": 0}


# --- the seed log: interleaved workers, the root cause, the dump ---------------------------------------

def test_seed_log_facts():
    f = facts("seed-glm46-fp8-0.10.1.1.log")
    assert (f.version, f.version_from, f.budget, f.gpu) == ("0.10.1.1", "engine config line", 8192, "NVIDIA H20")
    assert f.non_default_args == {"model_tag": "zai-org/GLM-4.6-FP8", "tensor_parallel_size": 8,
                                  "max_num_batched_tokens": 8192, "enable_chunked_prefill": True}
    assert f.engine.config["tensor_parallel_size"] == 8 and f.engine.compilation["level"] == 3
    streams = [t.stream for t in f.tracebacks]
    assert streams == ["VllmWorker TP0 pid=3101", "VllmWorker TP3 pid=3104", "EngineCore_0 pid=2990",
                       "APIServer pid=2817"], "interleaved workers are read apart"
    assert len(f.tracebacks[0].frames) == len(f.tracebacks[1].frames) == 24
    c = crash.crash(f)
    assert c.stream == "VllmWorker TP0 pid=3101" and c.outcome == "illegal_memory_access"
    assert c.kernel == "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_2" and c.kernel_kind == "inductor triton kernel"
    assert c.surfaced_kind == "launch" and "triton_heuristics.py" in c.traceback and c.during == "serving step"
    assert c.cuda_error == "CUDA driver error: an illegal memory access was encountered"
    d = f.dump
    assert (d.total_tokens, d.num_reqs, d.mix) == (8192, 1, "prefill")
    assert [(r.req_id, r.tokens, r.new, r.prompt_len, r.phase) for r in d.requests] == \
           [("cmpl-0", 8192, True, 8192, "last-prefill-chunk")]


def test_a_mixed_step_dumped_by_0_11_and_later():
    f = facts("container-0.14.1.log")
    assert f.version == "0.14.1"
    d = f.dump
    assert d.total_tokens == 2093 and d.stats["num_waiting_reqs"] == 5
    assert [(r.req_id, r.tokens, r.new, r.phase) for r in d.requests] == [
        ("chatcmpl-9", 44, True, "last-prefill-chunk"), ("chatcmpl-3", 1, False, "decode"),
        ("chatcmpl-4", 2048, False, "prefill")]
    assert d.mix == "mixed" and d.max_query_len == 2048


# --- partial logs ---------------------------------------------------------------------------------------

def test_only_a_traceback_at_a_sync_point():
    f = facts("only-traceback.log")
    assert f.version is None and f.engine is None and f.dump is None
    c = crash.crash(f)
    assert c.outcome == "illegal_memory_access" and c.exc_type == "torch.AcceleratorError"
    assert c.surfaced_kind == "sync" and "_to_list" in c.surfaced_why and c.async_hint
    assert c.kernel is None


WARMED_UP_THEN_FATAL = """\
WARNING 12-03 12:24:07 [gdn_linear_attn.py:733] GDN prefill kernel warmup (T=64) failed for layer model.layers.0.linear_attn.
WARNING 12-03 12:24:07 [gdn_linear_attn.py:733] Traceback (most recent call last):
WARNING 12-03 12:24:07 [gdn_linear_attn.py:733]   File "/site/vllm/model_executor/layers/mamba/gdn_linear_attn.py", line 726, in _warmup_prefill_kernels
WARNING 12-03 12:24:07 [gdn_linear_attn.py:733]     self.chunk_gated_delta_rule(
WARNING 12-03 12:24:07 [gdn_linear_attn.py:733] RuntimeError: CUDA error: an illegal memory access was encountered
INFO 12-03 12:24:49 [core.py:299] init engine (profile, create kv cache, warmup model) took 109.08 s
Traceback (most recent call last):
  File "/site/vllm/v1/worker/gpu_worker.py", line 813, in execute_model
    output = self.model_runner.execute_model(
  File "/site/vllm/model_executor/layers/mamba/gdn_linear_attn.py", line 81, in fi_chunk_gated_delta_rule
    from flashinfer.gdn_prefill import (
ModuleNotFoundError: No module named 'flashinfer'
"""


def test_a_traceback_vllm_logged_as_a_warning_and_survived_is_not_the_crash():
    """A warm-up failure vLLM caught and logged (even a CUDA one, the most specific outcome) ranks below the
    traceback that ended the process; a host-side error surfaces where it is raised."""
    f = facts(WARMED_UP_THEN_FATAL.encode())
    assert [t.survived for t in f.tracebacks] == [True, False]
    c = crash.crash(f)
    assert (c.exc_type, c.line, c.during) == ("ModuleNotFoundError", 7, "serving step")
    assert c.surfaced_kind == "other" and "raised it" in c.surfaced_why
    assert f.crash_line == 7


def test_a_dump_that_schedules_no_tokens_is_no_step():
    """An input dump cut before num_scheduled_tokens says which requests were new, not how many tokens ran: the
    step is unknown (not a 0-token step the thresholds would rule classes out on)."""
    from diaglib.triage import diagnose

    text = SEED.read_text()
    line = next(ln for ln in text.splitlines() if "Dumping scheduler output" in ln)
    cut = line[: line.index("num_scheduled_tokens")] if "num_scheduled_tokens" in line else line
    t = diagnose.triage(text.replace(line, cut), resolve=False)
    assert t.facts.dump is not None and t.facts.dump.total_tokens == 0
    assert t.step is None and any("schedules no tokens" in n for n in t.notes)


def test_only_the_engine_config_line():
    f = facts("only-config-0.20.2.log")
    assert f.version == "0.20.2" and f.tracebacks == [] and crash.crash(f) is None
    cc = f.engine.compilation
    assert values.enum_member(cc["cudagraph_mode"]) == "FULL_AND_PIECEWISE" and cc["max_cudagraph_capture_size"] == 512
    assert f.engine.config["max_seq_len"] == 202752


def test_compute_sanitizer_names_the_kernel_without_a_traceback():
    c = crash.crash(facts("sanitizer.log"))
    assert (c.kernel, c.kernel_from) == ("triton_poi_fused_mul_silu_slice_4", "compute-sanitizer")


def test_logo_version_requests_and_a_triton_launch():
    f = facts("logo-requests-0.15.1.log")
    assert (f.version, f.version_from, f.model) == ("0.15.1", "start-up logo", "/home/bob/models/tiny-glm-fp8")
    assert [(p["request"], p["tokens"]) for p in f.prompts] == [("cmpl-a", 5), ("cmpl-b", 100)]
    c = crash.crash(f)
    assert (c.kernel, c.kernel_kind, c.surfaced_kind) == ("fused_moe_kernel", "triton kernel", "launch")


def test_release_of_a_logged_version():
    assert release_of("0.10.1.1") == "0.10.1.1" and release_of("0.10.1") == "0.10.1.1"
    assert release_of("0.11.0+cu128") == "0.11.2" and release_of("0.9.2") is None and release_of(None) is None


# --- no input ever a traceback -------------------------------------------------------------------------

@pytest.mark.parametrize("data, words", [
    (b"", "empty"), (b"   \n\n", "empty"), (bytes(range(256)) * 300, "not a text log"),
    (b"\x89PNG\r\n\x1a\n" + bytes(4000), "not a text log"), (b"hello world\nnothing here\n", "nothing in this log"),
])
def test_bad_logs_are_one_line_errors(data, words):
    with pytest.raises(DiagError, match=words) as e:
        facts(data)
    assert "\n" not in str(e.value)


def test_the_cli_says_one_line_and_exits_2(tmp_path):
    junk = tmp_path / "core.bin"
    junk.write_bytes(bytes(range(256)) * 100)
    for args in (["triage", str(junk)], ["triage", str(tmp_path / "missing.log")], ["triage", str(tmp_path)]):
        p = subprocess.run([sys.executable, "-m", "diaglib", *args], capture_output=True, text=True, timeout=120,
                           check=False)
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("diaglib: error: ") and "Traceback" not in p.stderr


def test_no_replay_reads_the_log_without_vllm():
    p = subprocess.run([sys.executable, "-m", "diaglib", "triage", "-", "--no-replay", "--json"], input=SEED.read_bytes(),
                       capture_output=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    import json

    out = json.loads(p.stdout)
    assert out["step"]["tokens"] == 8192 and out["crash"]["kernel"].startswith("triton_red_fused")
    assert out["source"] == "stdin"


def _survives(data: bytes) -> None:
    try:
        f = parse.parse(lines.decode(data))
    except DiagError as e:
        assert "\n" not in str(e)
        return
    crash.crash(f)
    for d in f.dumps:
        d.as_dict()


def test_mangled_real_logs_never_raise():
    rnd = random.Random(15)
    base = SEED.read_bytes()
    for _ in range(60):
        b = bytearray(base)
        for _ in range(rnd.randint(1, 40)):
            op = rnd.random()
            i = rnd.randrange(len(b))
            if op < 0.4:
                b[i] = rnd.randrange(256)
            elif op < 0.7:
                del b[i:i + rnd.randint(1, 400)]
            else:
                b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 20)))
        cut = rnd.randint(0, len(b))
        _survives(bytes(b[:cut] if rnd.random() < 0.3 else b))


def test_random_bytes_never_raise():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    pieces = [SEED.read_bytes()[i:i + 300] for i in range(0, 36000, 3000)]

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(st.one_of(st.binary(max_size=200), st.sampled_from(pieces),
                                         st.text(alphabet="()[]{}'\"=,: <>.\n\r\x1bvLLMpid0123456789").map(str.encode)),
                               max_size=12))
    def check(parts):
        _survives(b"".join(parts))

    check()


def test_dump_of_a_step_cut_short():
    text = SEED.read_text()
    line = next(ln for ln in text.splitlines() if "Dumping scheduler output" in ln)
    step = dump.read(line[: len(line) // 3])
    assert step is None or step.total_tokens >= 0
