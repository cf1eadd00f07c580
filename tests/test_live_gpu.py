"""On a CUDA GPU: the planted Triton fault through the probe machinery, and a small real FP8 checkpoint
through vLLM's real loading path with exact-length probes (skipped where no GPU exists)."""
from __future__ import annotations

import pytest

from diaglib.live import probe as P
from diaglib.live.engine import no_engine, plan

pytestmark = pytest.mark.gpu


def test_planted_gpu_fault_is_an_ima_and_the_sweep_goes_on(tmp_path):
    probes = [P.planted_fault("oob_write", key="below", m=8191, threshold=8192),
              P.planted_fault("oob_write", key="at", m=8192, threshold=8192),
              P.planted_fault("oob_write", key="after", m=100, threshold=8192)]
    df = P.run(probes, no_engine(), store_path=tmp_path / "s.jsonl", run_name="g", gpus=[0], probe_timeout_s=120)
    got = dict(zip(df.key, df.outcome))
    assert got == {"below": "ok", "at": "illegal_memory_access", "after": "ok"}


def test_small_real_checkpoint_probes_match_the_budget(tmp_path):
    pytest.importorskip("vllm")
    from diaglib.live.checkpoint import write_checkpoint

    d = write_checkpoint(tmp_path / "ck", fp8=True)
    spec = plan(f"vllm serve {d} --enable-chunked-prefill --max-num-batched-tokens 8192 --enforce-eager",
                weights="real")
    from diaglib.predict import workload as W

    staggered = P.from_workload(W.Workload((W.Req("a", 8000, 2, 0), W.Req("b", 500, 3, 1)), "staggered"))
    df = P.run([P.Probe("p8193", [8193]), P.batch([1001] * 8 + [184]), staggered], spec,
               store_path=tmp_path / "s.jsonl", run_name="ck", gpus=[0], ready_timeout_s=600)
    rows = df.set_index("key")
    assert (rows.outcome == "ok").all()
    assert rows.observed_tokens["p8193"][:3] == (8192, 1, 1)
    assert rows.observed_tokens["b8x1001+184"][:2] == (8192, 9)
    assert rows.observed_tokens["w-staggered"][0] == 8000 and sum(rows.observed_tokens["w-staggered"]) == 8000 + 500 + 1 + 2


def test_a_scenario_for_more_gpus_than_this_host_has_resolves_for_its_own():
    """A rank stand-in's host (one GPU) resolves a TP-4 scenario as vLLM would on four: the world-size check
    counts the scenario's GPUs while the config resolves, and torch sees the real count again after."""
    import torch

    from diaglib.scenario import load

    real = torch.cuda.device_count()
    sc = load(cmd="vllm serve data/models/Qwen3-Next-80B-A3B-Thinking -tp 4", gpu="NVIDIA H200",
              gpu_count=max(4, real))
    assert sc.vllm_config.parallel_config.tensor_parallel_size == 4 and not sc.simulated
    assert torch.cuda.device_count() == real
