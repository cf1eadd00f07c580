"""CUDA-graph dispatch and padding: what the model runner does with a step of N tokens."""
from __future__ import annotations

import copy

from ..errors import DiagError
from .attention import attention_backend_class
from .detect import _legacy
from .scheduling import kv_cache_spec


def uniform_decode_query_len(vllm_config) -> int:
    """Tokens per request in a uniform decode step: 1, or 1 + speculative tokens (vLLM's model runner)."""
    spec = vllm_config.speculative_config
    return 1 if not spec else 1 + spec.num_speculative_tokens


def cudagraph_dispatcher(vllm_config):
    """vLLM's CudagraphDispatcher with its keys set up as the model runner sets them up at start-up.

    The configured graph mode is first resolved against the attention backend's CUDA-graph support
    (vLLM may downgrade it); the resolution works on a copy, ``vllm_config`` is left untouched.
    Returns (dispatcher, resolved CUDAGraphMode).
    """
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    builder = attention_backend_class(vllm_config).get_builder_cls()
    cc = copy.copy(vllm_config.compilation_config)
    uq = uniform_decode_query_len(vllm_config)
    try:
        if _legacy():
            mode = _resolve_cudagraph_mode_0_10(cc, builder.cudagraph_support, builder.__name__, uq)
        else:
            mode = cc.resolve_cudagraph_mode_and_sizes(
                builder.get_cudagraph_support(vllm_config, kv_cache_spec(vllm_config)), builder.__name__, uq,
                vllm_config.parallel_config.tensor_parallel_size, None,
                vllm_config.scheduler_config.max_num_seqs)
    except ValueError as e:
        raise DiagError(f"vLLM rejects the CUDA-graph mode: {str(e).splitlines()[0]}") from None
    cc.cudagraph_mode = mode
    disp = CudagraphDispatcher(vllm_config)
    disp.compilation_config = cc
    if _legacy():
        disp.cudagraph_mode = mode
    disp.initialize_cudagraph_keys(mode, uq)
    return disp, mode


def _resolve_cudagraph_mode_0_10(cc, support, backend: str, uq: int):
    """0.10.x resolves the graph mode inline in GPUModelRunner.initialize_cudagraph_capture (that module
    cannot be imported without a GPU: Triton's driver needs libcuda). Mirrors that logic (messages shortened)."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.attention.backends.utils import AttentionCGSupport

    mode = cc.cudagraph_mode
    if mode.mixed_mode() == CUDAGraphMode.FULL and support != AttentionCGSupport.ALWAYS:
        if support == AttentionCGSupport.NEVER:
            raise ValueError(f"CUDAGraphMode.{mode.name} is not supported with {backend} backend")
        mode = (CUDAGraphMode.FULL_AND_PIECEWISE if cc.splitting_ops_contain_attention()
                else CUDAGraphMode.FULL_DECODE_ONLY)
    if (mode.decode_mode() == CUDAGraphMode.FULL and uq > 1
            and support.value < AttentionCGSupport.UNIFORM_BATCH.value):
        mode = CUDAGraphMode.PIECEWISE if cc.splitting_ops_contain_attention() else CUDAGraphMode.NONE
    if mode.has_full_cudagraphs() and support == AttentionCGSupport.NEVER:
        raise ValueError(f"CUDAGraphMode.{mode.name} is not supported with {backend} backend")
    return mode


def dispatch_batch(disp, vllm_config, num_tokens: int, num_reqs: int, max_query_len: int):
    """Pad and dispatch one step as the model runner does. Returns (padded tokens, CUDAGraphMode,
    uniform_decode, BatchDescriptor or None). Data parallelism and cascade attention are not modelled."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor

    cc = disp.compilation_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    if _legacy():
        # 0.10.x GPUModelRunner.execute_model (inline there; the module needs a GPU to import).
        if cc.cudagraph_mode != CUDAGraphMode.NONE and num_tokens <= max(cc.cudagraph_capture_sizes):
            padded = vllm_config.pad_for_cudagraph(num_tokens)
        elif cc.pass_config.enable_sequence_parallelism and tp > 1:
            padded = -(-num_tokens // tp) * tp
        else:
            padded = num_tokens
        uniform = max_query_len == uniform_decode_query_len(vllm_config) and num_tokens == num_reqs * max_query_len
        mode, desc = disp.dispatch(BatchDescriptor(num_tokens=padded, uniform_decode=uniform))
        return padded, mode, uniform, desc
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    uniform = GPUModelRunner._is_uniform_decode(max_query_len, disp.uniform_decode_query_len, num_tokens, num_reqs)
    runner = SimpleNamespace(vllm_config=vllm_config, compilation_config=cc)
    sp_padded = GPUModelRunner._pad_for_sequence_parallelism(runner, num_tokens)
    mode, desc = disp.dispatch(num_tokens=sp_padded, uniform_decode=uniform)
    return desc.num_tokens, mode, uniform, desc


def dispatch_derived() -> str | None:
    """What in a dispatch answer is diaglib's mirror of vLLM code rather than vLLM's code run (None: nothing)."""
    if _legacy():
        return ("derived: 0.10.x pads and resolves the graph mode inline in GPUModelRunner (not importable "
                "without a GPU), mirrored here; its one dynamic-shape graph is shown as range 1..max_num_batched_tokens")
    return None
