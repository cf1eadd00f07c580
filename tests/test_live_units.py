"""Classification, store, observations, stand-in, checkpoint and engine plans, on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from diaglib.errors import DiagError
from diaglib.live import classify as C
from diaglib.live import observe, standin, store
from diaglib.paths import DATA

RECORDS = DATA / "live" / "h200-vllm-0.20.2"
GLM = DATA / "models" / "GLM-4.6-FP8"


# --- classify ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,rc,outcome", [
    ("RuntimeError: CUDA error: an illegal memory access was encountered\n", -6, "illegal_memory_access"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n", 1, "out_of_memory"),
    ("RuntimeError: CUDA error: device-side assert triggered\n", 1, "cuda_error"),
    ("torch._inductor.exc.InductorError: LoweringException: boom\n", 1, "compile_error"),
    ("triton.compiler.errors.CompilationError: at 3:4\n", 1, "compile_error"),
    ("RuntimeError: cutlass_group_gemm_caller, grouped_mm_c3x.cuh:187, Error Internal\n", 3, "cuda_error"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\nKeyError: 'a'\n", 1, "python_error"),
    ("", -9, "killed"),
    ("", -11, "killed"),
])
def test_classify_by_log_and_exit(text, rc, outcome):
    assert C.classify(text, returncode=rc).outcome == outcome


def test_ima_inside_an_inductor_kernel_is_an_ima_and_names_the_kernel():
    log = ("  File \"/tmp/torchinductor/ab.py\", line 9, in call\n"
           "    triton_poi_fused_add_3.run(buf0, xnumel=8192)\n"
           "torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n")
    o = C.classify(log, returncode=3)
    assert (o.outcome, o.kernel, o.surfaced_at) == ("illegal_memory_access", "triton_poi_fused_add_3", "call (ab.py:9)")


def test_timeout_wins_and_ok_needs_a_report():
    assert C.classify("CUDA error: x", returncode=None, timed_out=True).outcome == "timeout"
    assert C.classify("", returncode=None, report={"status": "ok"}).outcome == "ok"
    assert C.classify("", returncode=0).outcome == "python_error"  # ended without answering


def test_recorded_planted_fault_and_sanitizer_name_the_right_things():
    recs = store.read(RECORDS / "live.jsonl")
    planted = next(r for r in recs if r.get("key") == "planted-oob-m8192")
    assert planted["outcome"] == "illegal_memory_access" and planted["kernel"] is None  # asynchronous: no name
    again = C.classify(planted["excerpt"], returncode=3)
    assert again.outcome == "illegal_memory_access"
    san = (RECORDS / "sanitizer.txt").read_text()
    o = C.classify(san, returncode=1)
    assert (o.outcome, o.kernel) == ("illegal_memory_access", "planted_oob_write_kernel")


def test_secrets_are_scrubbed_from_excerpts_and_env():
    tok = "hf_" + "a1B2c3D4e5F6g7H8i9J0kLmN"
    o = C.classify(f"HF_TOKEN={tok}\nRuntimeError: CUDA error: an illegal memory access was encountered\n", returncode=1)
    assert tok not in o.excerpt and "<redacted>" in o.excerpt
    env = store.redact_env({"HF_TOKEN": tok, "VLLM_API_KEY": "x", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/root",
                            "VLLM_LOGGING_LEVEL": f"see {tok}"})
    assert env == {"HF_TOKEN": "<redacted>", "VLLM_API_KEY": "<redacted>", "CUDA_VISIBLE_DEVICES": "0",
                   "VLLM_LOGGING_LEVEL": "see <redacted>"}


# --- store -------------------------------------------------------------------------------------------

def test_store_appends_escapes_and_survives_torn_lines(tmp_path):
    p = tmp_path / "s.jsonl"
    store.append(p, {"type": "probe", "run": "r", "key": "a", "detail": 'quote " newline \n <b>'})
    with open(p, "a") as f:
        f.write('{"type": "probe", "run": "r", "key": "b"')  # torn
    store.append(p, {"type": "probe", "run": "r", "key": "c"})
    assert [r["key"] for r in store.read(p)] == ["a", "c"]
    assert store.read(p)[0]["detail"] == 'quote " newline \n <b>'
    assert all(line.isascii() for line in p.read_text().splitlines())
    assert store.done_keys(p, "r") == {"a", "c"} and store.done_keys(p, "other") == set()
    with pytest.raises(DiagError):
        store.read(tmp_path)


def test_recorded_run_tables():
    df = store.probes(RECORDS / "live.jsonl", "standin-sweep")
    assert len(df) == 24 and (df.outcome == "ok").sum() == 23
    assert set(df[df.outcome != "ok"].key) == {"planted-oob-m8192"}
    after = df.set_index("key")
    assert after.engine_started["p8193"] and after.engine_id["p8193"] != after.engine_id["p8192"]
    eng = store.engines(RECORDS / "live.jsonl", "standin-sweep")
    assert list(eng.weights_gib) == [41.9, 41.9]


# --- observe -----------------------------------------------------------------------------------------

def test_logged_figures_from_a_real_vllm_log():
    log = next((RECORDS / "logs" / "standin-sweep").glob("*.log")).read_text()
    f = observe.logged_figures(log)
    assert f["weights_gib"] == 41.9 and f["kv_cache_tokens"] == 1_894_223 and f["graph_pool_gib"] == 2.14
    assert f["graph_pool_estimated_gib"] == 1.47 and f["init_engine_s"] > 0
    assert "VLLM_CUTLASS Fp8 MoE backend" in f["moe_backend"]


def test_kernel_table_groups_launches_and_picks_moe():
    ev = [{"cat": "kernel", "name": "fused_moe_kernel", "dur": 10.0, "args": {"grid": [4, 1, 1], "block": [128, 1, 1]}},
          {"cat": "kernel", "name": "fused_moe_kernel", "dur": 30.0, "args": {"grid": [4, 1, 1], "block": [128, 1, 1]}},
          {"cat": "kernel", "name": "triton_poi_fused_add_0", "dur": 5.0, "args": {"grid": [8, 1, 1], "block": [64, 1, 1]}},
          {"cat": "cpu_op", "name": "aten::add", "dur": 99.0}]
    t = observe.kernel_table({"traceEvents": ev})
    assert list(t.name) == ["fused_moe_kernel", "triton_poi_fused_add_0"]
    assert t.iloc[0].launches == 2 and t.iloc[0].mean_us == 20.0 and list(t.moe) == [True, False]


def test_nvml_timeline_without_a_gpu_is_empty():
    with observe.NvmlTimeline(None) as tl:
        pass
    assert tl.downsampled() == []


# --- stand-in ----------------------------------------------------------------------------------------

def test_rank_config_divides_per_rank_sizes_and_keeps_the_rest():
    cfg = json.loads((GLM / "config.json").read_text())
    r = standin.rank_config(cfg, 8)
    assert (r["num_attention_heads"], r["num_key_value_heads"], r["intermediate_size"],
            r["moe_intermediate_size"], r["vocab_size"]) == (12, 1, 1536, 192, 18944)
    for k in ("hidden_size", "n_routed_experts", "num_hidden_layers", "head_dim", "quantization_config"):
        assert r[k] == cfg[k]
    assert standin.rank_config(cfg, 16)["num_key_value_heads"] == 1  # replicated, as vLLM does


def test_rank_config_rejects_sizes_that_do_not_divide(tmp_path):
    with pytest.raises(DiagError):
        standin.rank_config({"hidden_size": 64, "num_attention_heads": 6, "vocab_size": 100}, 4)
    with pytest.raises(DiagError):
        standin.rank_config({"hidden_size": 64}, 0)
    with pytest.raises(DiagError):
        standin.write_standin(tmp_path / "nowhere", 8, tmp_path / "out")


def test_rank_config_divides_a_multimodal_wrappers_text_config(tmp_path):
    """Llama-4 Scout nests its language model in text_config: that is what TP shards; the vocabulary a probe
    may use comes from vLLM's text config where config.json leaves it to the class default (gemma-3)."""
    cfg = json.loads((DATA / "models" / "Llama-4-Scout-17B-16E-Instruct" / "config.json").read_text())
    text = cfg["text_config"]
    r = standin.rank_config(cfg, 8)["text_config"]
    assert (r["num_attention_heads"], r["num_key_value_heads"], r["intermediate_size"], r["vocab_size"]) == (
        text["num_attention_heads"] // 8, 1, text["intermediate_size"] // 8, text["vocab_size"] // 8)
    assert r["head_dim"] == text["head_dim"] and r["hidden_size"] == text["hidden_size"]
    gemma = standin.write_standin(DATA / "models" / "gemma-3-27b-it", 1, tmp_path / "gemma")
    from diaglib.scenario import load

    sc = load(cmd=f"vllm serve {DATA / 'models' / 'gemma-3-27b-it'}", gpu="NVIDIA H200", gpu_count=1)
    assert standin.per_rank_vocab(gemma) == sc.vllm_config.model_config.get_vocab_size()


def test_committed_standin_is_what_the_writer_makes(tmp_path):
    out = standin.write_standin(GLM, 8, tmp_path / "GLM-4.6-FP8-tp8")
    committed = json.loads((DATA / "live" / "standins" / "GLM-4.6-FP8-tp8" / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == committed
    assert standin.per_rank_vocab(out) == 18944


# --- small real checkpoint -----------------------------------------------------------------------------

def test_checkpoint_fp8_per_channel_round_trips(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from diaglib.live.checkpoint import TinyGlm, tensors, write_checkpoint

    sizes = TinyGlm(layers=2, hidden=64, heads=2, kv_heads=1, head_dim=32, intermediate=128, moe_intermediate=32,
                    experts=4, topk=2, vocab=256)
    d = write_checkpoint(tmp_path / "ck", sizes, fp8=True)
    t = load_file(str(d / "model.safetensors"))
    w, s = t["model.layers.1.mlp.experts.3.down_proj.weight"], t["model.layers.1.mlp.experts.3.down_proj.weight_scale"]
    assert w.dtype == torch.float8_e4m3fn and s.shape == (64, 1) and s.dtype == torch.float32
    ref = tensors(sizes, fp8=False)["model.layers.1.mlp.experts.3.down_proj.weight"].float()
    err = (w.float() * s - ref).norm() / ref.norm()
    assert err < 0.05
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert "model.layers.1.mlp.gate" in cfg["quantization_config"]["ignore"]
    bf = load_file(str(write_checkpoint(tmp_path / "bf", sizes, fp8=False) / "model.safetensors"))
    assert bf["model.layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16 and not any("scale" in k for k in bf)
    with pytest.raises(DiagError):
        write_checkpoint(tmp_path / "bad", TinyGlm(layers=1, first_dense=1))


# --- engine plans --------------------------------------------------------------------------------------

SEED = "vllm serve zai-org/GLM-4.6-FP8 --enable-chunked-prefill --max-num-batched-tokens 8192 -tp 8"


def test_plan_without_weights_is_the_rank_standin(tmp_path):
    from diaglib.live.engine import engine_args, plan

    spec = plan(SEED, models={"zai-org/GLM-4.6-FP8": str(GLM)}, gpus=1, standins=tmp_path)
    assert spec.weights.startswith("dummy") and spec.tp_of == 8 and spec.vocab == 18944
    ea = engine_args(spec.argv)
    assert (ea.tensor_parallel_size, ea.load_format, ea.max_num_batched_tokens, ea.enable_chunked_prefill,
            ea.skip_tokenizer_init) == (1, "dummy", 8192, True, True)
    assert Path(ea.model) == tmp_path / "GLM-4.6-FP8-tp8"
    with pytest.raises(DiagError):
        plan(SEED, models={"zai-org/GLM-4.6-FP8": str(GLM)}, weights="real")
    with pytest.raises(DiagError):
        plan(SEED + " -pp 2", models={"zai-org/GLM-4.6-FP8": str(GLM)}, standins=tmp_path)
    with pytest.raises(DiagError):
        plan(SEED + " --no-such-flag", models={"zai-org/GLM-4.6-FP8": str(GLM)}, standins=tmp_path)


def test_plan_with_weights_loads_them_for_real(tmp_path):
    pytest.importorskip("torch")
    from diaglib.live.checkpoint import TinyGlm, write_checkpoint
    from diaglib.live.engine import plan

    d = write_checkpoint(tmp_path / "ck", TinyGlm(layers=2, experts=4, topk=2), fp8=True)
    spec = plan(f"vllm serve {d} --max-num-batched-tokens 8192", gpus=1)
    assert spec.weights == "real" and "--load-format" not in spec.argv and spec.vocab == 4096
    assert plan(f"vllm serve {d} -tp 2", gpus=1, standins=tmp_path).weights.startswith("dummy")  # too few GPUs


# --- CLI -----------------------------------------------------------------------------------------------

def test_cli_probe_bad_input_exits_2_and_compare_reads_records(capsys):
    from diaglib import compat
    from diaglib.cli import main as cli

    def main(argv):  # answer with the vLLM installed here (no hand-over to another environment)
        return cli(["--vllm", compat.installed(), *argv])

    assert main(["probe", "--lengths", "9-3"]) == 2
    assert main(["probe", "--batch", "ax3"]) == 2
    assert main(["probe", "--lengths", "8192", "--store", str(RECORDS / "live.jsonl"), "--run", "x",
                 "--cmd", "vllm serve x", "--gpus", "zero"]) == 2
    capsys.readouterr()
    if compat.installed() != "0.20.2":
        return  # the records were made with 0.20.2; its scheduler is what predicts them
    assert main(["probe", "--compare", "--store", str(RECORDS / "live.jsonl"), "--run", "ckpt-fp8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == ["p8191", "p8192", "b8x1001+184"] and all(r["steps_match"] for r in rows)


def test_caller_is_the_innermost_frame_outside_torch_and_triton():
    """With CUDA_LAUNCH_BLOCKING=1 the fault surfaces in Triton's launcher; the caller is what launched it."""
    tb = ('Traceback (most recent call last):\n'
          '  File "/work/main/diaglib/live/child.py", line 200, in run\n'
          '  File "/usr/lib/python3/site-packages/vllm/model_executor/models/glm4_moe.py", line 440, in forward\n'
          '  File "/work/main/diaglib/live/planted.py", line 66, in oob_write\n'
          '  File "/tmp/site/triton/runtime/jit.py", line 419, in <lambda>\n'
          '  File "/usr/lib/python3/site-packages/torch/_inductor/runtime/triton_heuristics.py", line 9, in run\n'
          '  File "/tmp/site/triton/backends/nvidia/driver.py", line 713, in __call__\n'
          'RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered\n')
    out = C.classify(tb, returncode=1)
    assert out.outcome == "illegal_memory_access"
    assert out.surfaced_at == "__call__ (driver.py:713)" and out.caller == "oob_write (planted.py:66)"
    assert C.caller('  File "<string>", line 1, in <module>\n') is None


def test_allocation_sizes_are_read_off_pytorchs_out_of_memory_message():
    oom = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total capacity of "
           "79.18 GiB of which 3.43 GiB is free. Including non-PyTorch memory, this process has 75.73 GiB memory in "
           "use. Of the allocated memory 69.16 GiB is allocated by PyTorch, with 366.00 MiB allocated in private "
           "pools (e.g., CUDA Graphs), and 5.26 GiB is reserved by PyTorch but unallocated.")
    assert C.allocation(oom) == {"asked": 4.0, "total": 79.18, "free": 3.43, "unallocated": 5.26}
    assert C.allocation("Tried to allocate 138.00 MiB. GPU 0") == {"asked": 138 / 1024}
    assert C.allocation("RuntimeError: CUDA error: an illegal memory access") == {}
    assert C.outcome_of(oom) == "out_of_memory" and C.outcome_of("ValueError: x") == "python_error"
