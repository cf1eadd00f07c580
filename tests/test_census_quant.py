"""The kernel census through quantized checkpoints' weight processing and kernels (own file: the test session
spreads files over its workers, and these are the slow ones)."""
from __future__ import annotations

import pytest

from diaglib import compat, whatif
from diaglib.errors import DiagError
from diaglib.predict import census

from test_census import _buildable, _linear_outputs_are_tokens_by_output_size


def _scenario(cmd: str, gpus: int, gpu: str = "NVIDIA H100"):
    """The checkpoint resolved on ``gpu`` and built on meta, or a skip naming vLLM's refusal."""
    from diaglib.scenario import load

    try:
        sc = load(cmd=cmd, gpu=gpu, gpu_count=gpus)
    except DiagError as e:
        pytest.skip(f"vLLM {compat.installed()} refuses the checkpoint: {e}")
    _buildable(sc)
    return sc


def test_weights_processed_on_meta_for_an_nvfp4_checkpoint():
    """ModelOpt NVFP4 (hf_quant_config.json beside config.json): vLLM's process_weights_after_loading asks
    torch.unique, boolean-mask indexing and allclose of weight scales, which have no meta answer."""
    sc = _scenario("vllm serve data/models/Qwen3-235B-A22B-NVFP4 -tp 2 --max-num-batched-tokens 8192", 2)
    try:
        census.prepare(sc)
    except DiagError as e:
        if f"CUDA error {whatif.CUDA_ERROR_STUB_LIBRARY}" not in str(e):
            raise
        pytest.skip(f"a kernel library of vLLM {compat.installed()} asks the CUDA driver itself while it "
                    f"converts the weights, which the what-if layer does not answer: {e}")
    _linear_outputs_are_tokens_by_output_size(sc)


def test_mxfp4_experts_kernels_are_traced():
    """gpt-oss's MXFP4 experts on Hopper run Triton's matmul_ogs, which sizes its tiles by the device's
    opt-in shared memory: the census traces them, and their output is N x top_k x hidden."""
    sc = _scenario("vllm serve data/models/gpt-oss-120b -tp 8 --max-num-batched-tokens 8192", 8)
    p = census.record(sc, census.prefill(4096))
    assert p.stopped is None, p.stopped
    stale = [n for n in p.notes if "not traced (TypeError: " in n and "_fake() takes" in n]
    if stale:  # vLLM's own fake of an inner kernel lags the kernel's schema: a bug of that release
        pytest.skip(stale[0])
    assert not [n for n in p.notes if "moe" in n and "not traced" in n], p.notes
    experts = [r for r in p.ops if ".experts" in r.module]
    assert any(r.kind == "triton" for r in experts), {r.op for r in experts}
    text = sc.vllm_config.model_config.hf_text_config
    want = p.padded * text.num_experts_per_tok * text.hidden_size
    assert any(t.numel() == want for r in experts if r.kind == "triton" for _, t in r.tensors), want


@pytest.mark.parametrize("gpu", ["NVIDIA A100-SXM4-80GB", "NVIDIA H100"])
def test_int4_awq_linears_and_attention_are_traced(gpu):
    """AWQ int4 goes to Marlin on Ampere (which repacks the zero points with numpy on the host) and to Machete on
    Hopper; Ampere's attention is FlashAttention 2. The census runs all of them: every linear layer outputs
    N x its size per rank, and attention's inner kernels are traced."""
    sc = _scenario("vllm serve data/models/Qwen2.5-72B-Instruct-ko-AWQ --max-num-batched-tokens 8192", 1, gpu)
    _linear_outputs_are_tokens_by_output_size(sc)
    p = census.record(sc, census.prefill(4096))
    assert not [n for n in p.notes if "not traced" in n], p.notes
    assert any(r.kind.startswith("custom") and ".self_attn.attn" in r.module and "fwd" in r.op for r in p.ops)
