"""Evidence bundles: real child re-runs of a planted fault, parsing of debug-aid output, redaction, escaping."""
from __future__ import annotations

import json

import pytest

from diaglib.errors import DiagError
from diaglib.live import evidence as E
from diaglib.live import store
from diaglib.live.engine import no_engine
from diaglib.live.probe import planted_fault

SECRETS = {"HF_TOKEN": "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2", "DB_PASSWORD": "hunter2-correct-horse",
           "MY_API_KEY": "plain-looking-key-value", "GITHUB_AUTH": "xyz-auth-value-123"}
STRAY = "sk-" + "Q9w8E7r6T5y4U3i2O1p0"  # a token under an innocent name

SANITIZER = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 4 bytes
=========     at planted_oob_write_kernel+0x2b0 in /work/main/diaglib/live/planted.py:53
=========     by thread (32,0,0) in block (0,0,0)
=========     Address 0x7f3c40000080 is out of bounds
=========     and is 274,877,874,305 bytes after the nearest allocation at 0x7f1c40000000 of size 32,768 bytes
=========
========= Invalid __global__ write of size 4 bytes
=========     at planted_oob_write_kernel+0x2b0 in /work/main/diaglib/live/planted.py:53
=========
========= ERROR SUMMARY: 1024 errors
"""

OUTPUT_CODE = '''\
from torch._inductor.runtime import triton_helpers

triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', \'\'\'
import triton

@triton_heuristics.pointwise(
    size_hints={'x': 8388608},
    filename=__file__,
)
@triton.jit
def triton_poi_fused_add_0(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xnumel = 41943040
    xoffset = tl.program_id(0) * XBLOCK
    tl.store(out_ptr0 + (x0), tmp2, xmask)
\'\'\', device_str='cuda')


def call(args):
    pass
'''


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """The three default steps re-running a planted CUDA fault in real child processes."""
    work = tmp_path_factory.mktemp("work")
    mp = pytest.MonkeyPatch()
    for k, v in {**SECRETS, "INNOCENT": STRAY}.items():
        mp.setenv(k, v)
    try:
        results = E.run_steps(no_engine(), planted_fault("cuda_abort", key="p8192"), work, gpus=[None],
                              probe_timeout_s=60, ready_timeout_s=60)
        env = dict(__import__("os").environ)
    finally:
        mp.undo()
    return work, results, env


def test_steps_rerun_the_fault_with_their_debug_env(planted_run):
    work, results, _ = planted_run
    assert [r.step.name for r in results] == ["blocking", "sanitizer", "trace"]
    by = {r.step.name: r for r in results}
    assert by["blocking"].record["outcome"] == "illegal_memory_access"
    assert by["trace"].record["outcome"] == "illegal_memory_access"
    assert by["sanitizer"].skipped  # no launcher support in the runner, or no compute-sanitizer here
    engine_env = {n: next(r for r in store.read(work / n / "records.jsonl") if r["type"] == "engine")["env"]
                  for n in ("blocking", "trace")}
    assert engine_env["blocking"]["CUDA_LAUNCH_BLOCKING"] == "1"
    assert engine_env["trace"]["TORCH_TRACE"] == str(work / "trace" / "torch_trace")


def test_bundle_is_safe_to_share(planted_run, tmp_path):
    work, results, env = planted_run
    (work / "trace" / "torch_trace").mkdir(parents=True, exist_ok=True)
    (work / "trace" / "torch_trace" / "dedicated_log_torch_trace_0.log").write_text(
        f'{{"inductor_output_code": {{"filename": "x.py"}}}}\n\tpassword {SECRETS["DB_PASSWORD"]}\n')
    about = {"command": "vllm serve <script>alert(1)</script> --max-num-batched-tokens 8192",
             "tokens": 8192, "note": f"token {SECRETS['HF_TOKEN']} and {SECRETS['DB_PASSWORD']}"}
    import pandas as pd

    classes = pd.DataFrame([{"id": "exactly-at-budget", "verdict": "fits", "why": "<img src=x onerror=1>"}])
    out = E.assemble(tmp_path / "bundle", results, work, about=about, env=env, classes=classes)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"summary.html", "summary.json", "environment.json", "steps/blocking/log.txt",
            "steps/blocking/record.json", "steps/trace/record.json",
            "torch_trace/dedicated_log_torch_trace_0.log"} <= files
    blob = "\n".join(p.read_text() for p in out.rglob("*") if p.is_file())
    for value in [*SECRETS.values(), STRAY]:
        assert value not in blob
    page = (out / "summary.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img" not in page and "&lt;img src=x onerror=1&gt;" in page
    environment = json.loads((out / "environment.json").read_text())
    assert all(environment[k] == "<redacted>" for k in SECRETS)
    assert environment["INNOCENT"] == "<redacted>" and environment["CUDA_LAUNCH_BLOCKING"] == "1"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"][0]["outcome"] == "illegal_memory_access"
    assert summary["about"]["tokens"] == 8192  # a data field saying "tokens" is not a secret
    record = json.loads((out / "steps" / "blocking" / "record.json").read_text())
    assert record["probe"]["max_tokens"] == 2


def test_sanitizer_first_error_names_the_kernel():
    first = E.sanitizer_first_error("noise\n" + SANITIZER)
    assert first["error"] == "Invalid __global__ write of size 4 bytes"
    assert first["kernel"] == "planted_oob_write_kernel"
    assert first["lines"].count("Invalid") == 1 and "out of bounds" in first["lines"]
    old = "========= Invalid __global__ read of size 2 bytes\n=========     at 0x00000110 in triton_poi_fused_add_0\n"
    assert E.sanitizer_first_error(old)["kernel"] == "triton_poi_fused_add_0"
    assert E.sanitizer_first_error("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n") is None


def test_inductor_kernel_source_is_found_with_its_decorators(tmp_path):
    (tmp_path / "vllm_cache" / "x").mkdir(parents=True)
    (tmp_path / "vllm_cache" / "x" / "output_code.py").write_text(OUTPUT_CODE)
    file, src = E.kernel_source(tmp_path, "triton_poi_fused_add_0")
    assert file == "vllm_cache/x/output_code.py"
    assert src.startswith("@triton_heuristics.pointwise(") and "xnumel = 41943040" in src
    assert "device_str" not in src and "def call" not in src
    assert E.kernel_source(tmp_path, "triton_poi_fused_mul_1") is None


def test_findings_take_the_sanitizer_kernel_and_its_inductor_source(tmp_path):
    work = tmp_path / "work"
    (work / "trace" / "vllm_cache").mkdir(parents=True)
    (work / "trace" / "vllm_cache" / "output_code.py").write_text(OUTPUT_CODE)
    steps = E.steps(work)
    dump = ("ERROR 11-26 18:00:00 [dump_input.py:69] Dumping input data for V1 LLM engine (v0.20.2) with config: x\n"
            "ERROR 11-26 18:00:00 [dump_input.py:76] Dumping scheduler output for model execution: "
            "SchedulerOutput(num_scheduled_tokens={'r0': 8192})\n")
    results = [
        E.StepResult(steps["blocking"], {"outcome": "illegal_memory_access", "kernel": "fused_moe_kernel",
                                         "memory": {"peak_allocated_gib": 1.5}}, "log\n" + dump),
        E.StepResult(steps["sanitizer"], {"outcome": "illegal_memory_access"}, "",
                     sanitizer=SANITIZER.replace("planted_oob_write_kernel", "triton_poi_fused_add_0")),
    ]
    f = E.findings(results, work)
    assert (f["kernel"], f["kernel_from"]) == ("triton_poi_fused_add_0", "compute-sanitizer memcheck")
    assert f["inductor_kernel"] and "xnumel = 41943040" in f["inductor_source"]["source"]
    assert "num_scheduled_tokens={'r0': 8192}" in f["input_dump"]
    assert f["memory"] == {"peak_allocated_gib": 1.5}
    f = E.findings(results[:1], work)  # no sanitizer: the surfacing kernel, not an Inductor one
    assert f["kernel"] == "fused_moe_kernel" and "blocking" in f["kernel_from"] and f["inductor_source"] is None


def test_clean_redacts_keys_values_and_literal_secrets():
    secrets = E.secret_values({"DB_PASSWORD": "hunter2-correct-horse", "PATH": "/usr/bin", "X_TOKEN": "ab",
                               "TOKENIZERS_PARALLELISM": "false"})
    assert secrets == ["hunter2-correct-horse"]
    got = E.clean({"env": {"DB_PASSWORD": "hunter2-correct-horse", "PATH": "/usr/bin"}, "total_tokens": 8192,
                   "log": ["connect with hunter2-correct-horse", "auth " + STRAY]}, secrets)
    assert got == {"env": {"DB_PASSWORD": "<redacted>", "PATH": "/usr/bin"}, "total_tokens": 8192,
                   "log": ["connect with <redacted>", "auth <redacted>"]}


def test_bad_input(tmp_path):
    with pytest.raises(DiagError, match="unknown evidence step 'gdb'"):
        E.run_steps(no_engine(), planted_fault("raise"), tmp_path, names=["gdb"])
    with pytest.raises(DiagError, match="must not lie inside"):
        E.assemble(tmp_path / "work" / "bundle", [], tmp_path / "work", about={})


def test_cli_evidence_input_errors(scenario_name, tmp_path, capsys):
    from diaglib.cli import main
    from diaglib.whatif import real_gpu_present

    out = str(tmp_path / "b")
    assert main(["evidence", scenario_name, "--tokens", "8192", "-o", out, "--steps", "blocking,gdb"]) == 2
    assert "unknown evidence step 'gdb'" in capsys.readouterr().err
    assert main(["evidence", scenario_name, "--tokens", "8192", "-o", str(tmp_path / "b"), "--switches", "graphs"]) == 2
    assert "unknown kill switch 'graphs'" in capsys.readouterr().err
    if not real_gpu_present():
        assert main(["evidence", scenario_name, "--tokens", "8192", "-o", str(tmp_path / "b")]) == 2
        assert "this host has none" in capsys.readouterr().err


FAKE_SANITIZER = """#!{python}
# A stand-in for compute-sanitizer (not installed in CI): takes its options, notes the allocator setting in its
# log file and runs the program in its place (exec), as the real tool runs its target.
import os, sys
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("--"):
    opts[args[0]], args = args[1], args[2:]
with open(opts["--log-file"], "w") as f:
    f.write("========= COMPUTE-SANITIZER\\n")
    f.write("stand-in: PYTORCH_NO_CUDA_MEMORY_CACHING=%s\\n" % os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING"))
os.execvp(args[0], args)
"""


def test_children_run_under_the_launcher_and_memcheck_retries_with_the_allocator_on(tmp_path):
    """Through the real probe runner: the child runs under the launcher (recorded with the engine); memcheck
    naming no kernel with the caching allocator off makes the cached run follow; a re-run reads both back."""
    import sys

    fake = tmp_path / "sanitizer"
    fake.write_text(FAKE_SANITIZER.format(python=sys.executable))
    fake.chmod(0o755)
    work = tmp_path / "work"
    probe = planted_fault("cuda_abort", key="p8192")
    results = E.run_steps(no_engine(), probe, work, names=["sanitizer"], gpus=[None], probe_timeout_s=60,
                          ready_timeout_s=60, sanitizer=str(fake))
    assert [r.step.name for r in results] == ["sanitizer", "sanitizer-cached"]
    off, on = results
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in off.sanitizer and "PYTORCH_NO_CUDA_MEMORY_CACHING=None" in on.sanitizer
    assert off.record["outcome"] == on.record["outcome"] == "illegal_memory_access"
    engine = next(r for r in store.read(work / "sanitizer" / "records.jsonl") if r["type"] == "engine")
    assert engine["launcher"].startswith(f"{fake} --tool memcheck")
    again = E.run_steps(no_engine(), probe, work, names=["sanitizer"], gpus=[None], sanitizer="/nonexistent/tool")
    assert [(r.step.name, r.skipped, r.record["outcome"]) for r in again] == [
        ("sanitizer", None, "illegal_memory_access"), ("sanitizer-cached", None, "illegal_memory_access")]
    assert E.stored(work, "sanitizer-cached", "p8192") and not E.stored(work, "blocking", "p8192")


def _snapshot(secret: str) -> dict:
    frame = {"filename": f"/home/{secret}/vllm/gpu_model_runner.py", "line": 6537, "name": "_allocate_kv_cache"}
    frames = [frame, {"filename": "/x/site-packages/torch/cuda/memory.py", "line": 1, "name": "alloc"}]
    blocks = [{"size": 4096 * (i + 1), "requested_size": 4096, "address": 0x7F0000000000 + i * 8192,
               "state": "active_allocated" if i % 2 else "inactive", "frames": frames} for i in range(400)]
    trace = [{"action": "alloc", "addr": 0x7F0000000000 + i, "size": 512, "stream": 0, "frames": frames}
             for i in range(400)]
    return {"segments": [{"device": 0, "address": 0x7F0000000000, "total_size": 1 << 30, "blocks": blocks}],
            "device_traces": [trace]}


def test_memory_snapshot_is_summarised_scrubbed_and_stays_small(tmp_path):
    import pickle

    secret = "hunter2-correct-horse"
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps(_snapshot(secret)))
    snap = E.read_snapshot(path)
    s = E.snapshot_summary(snap, last=3)
    assert s["segments"] == 1 and s["reserved_bytes"] == 1 << 30
    assert s["allocated_bytes"] == sum(4096 * (i + 1) for i in range(400) if i % 2)
    assert s["largest_blocks"][0]["bytes"] == 4096 * 400 and s["events"] == 400 and len(s["last_events"]) == 3
    assert s["largest_blocks"][0]["allocated_in"] == "_allocate_kv_cache (gpu_model_runner.py:6537)"
    cleaned = E.clean(snap, [secret])
    blob = pickle.dumps(cleaned)
    assert secret.encode() not in blob and len(blob) <= 1.2 * path.stat().st_size  # shared frames stay shared


def test_a_snapshot_holding_objects_is_refused(tmp_path):
    import pickle
    from collections import OrderedDict

    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(OrderedDict(segments=[])))  # any class reference is refused, not constructed
    assert E.read_snapshot(path) is None
    assert E.read_snapshot(tmp_path / "missing.pickle") is None
