"""Every difference between the supported vLLM versions, and nothing else.

Other modules never test ``vllm.__version__``; they call a function here. Supported and verified in CI:
0.20.2 (the reference, runs on our H200) and 0.10.1.1 (the seed's version). Any other installed
version is tried with the newest code path and reported as unverified.
"""
from __future__ import annotations

import functools
import importlib.metadata

from .errors import DiagError
from .paths import ENVS, VENVS

SUPPORTED = ("0.20.2", "0.10.1.1")
REFERENCE = "0.20.2"


@functools.cache
def installed() -> str | None:
    """The vLLM version installed in this Python environment, or None (read once: ~2 ms a lookup)."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_verified(version: str | None = None) -> bool:
    """Whether diaglib's answers for this vLLM version are checked by its tests."""
    return (version or installed()) in SUPPORTED


def _legacy() -> bool:
    """True for the 0.10 line (VllmConfig 'level', V1 scheduler before async scheduling)."""
    v = installed() or ""
    return v.startswith("0.10.")


def venv_python(version: str):
    """The interpreter of the project's environment for ``version`` (scripts/venv.sh makes it)."""
    if not (ENVS / f"vllm-{version}.txt").exists():
        raise DiagError(f"vLLM {version} is not supported; supported: {', '.join(SUPPORTED)}")
    py = VENVS / f"vllm-{version}" / "bin" / "python"
    if not py.exists():
        raise DiagError(f"vLLM {version} is not installed here; create it with: scripts/venv.sh {version}")
    return py


# --- parsing ----------------------------------------------------------------------------------------

def flexible_argument_parser():
    """vLLM's own argument parser class (moved to vllm.utils.argparse_utils after 0.10)."""
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    return FlexibleArgumentParser


# --- the resolved configuration ---------------------------------------------------------------------

def compilation_summary(vllm_config) -> dict:
    """Compile mode, backend, graph mode, capture sizes, compile ranges and splitting ops."""
    cc = vllm_config.compilation_config
    capture = sorted(cc.cudagraph_capture_sizes or [])
    if _legacy():
        mode = {0: "NO_COMPILATION", 1: "DYNAMO_AS_IS", 2: "DYNAMO_ONCE", 3: "PIECEWISE"}.get(cc.level, str(cc.level))
        backend = "inductor" if cc.use_inductor else (cc.backend or "eager")
        ranges = _ranges([], vllm_config.scheduler_config.max_num_batched_tokens) if cc.level == 3 else []
        max_capture = cc.max_capture_size
    else:
        mode = cc.mode.name
        backend = cc.backend
        ranges = [(r.start, r.end) for r in cc.get_compile_ranges()] if cc.mode.value == 3 else []
        max_capture = cc.max_cudagraph_capture_size
    return {
        "compile_mode": mode,
        "compile_backend": backend,
        "cudagraph_mode": cc.cudagraph_mode.name if cc.cudagraph_mode is not None else "NONE",
        "cudagraph_capture_sizes": capture,
        "max_cudagraph_capture_size": max_capture,
        "compile_sizes": sorted(int(s) for s in (cc.compile_sizes or []) if str(s).isdigit()),
        "compile_ranges": ranges,
        "splitting_ops": list(cc.splitting_ops or []),
    }


def _ranges(endpoints: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """0.10.x compiles one dynamic-shape graph: a single range 1..max_num_batched_tokens."""
    edges = [0, *sorted(endpoints), max_tokens]
    return [(a + 1, b) for a, b in zip(edges, edges[1:]) if b > a]


def scheduler_summary(vllm_config) -> dict:
    """The scheduler knobs that decide what one step holds."""
    sc = vllm_config.scheduler_config
    async_ = bool(getattr(sc, "async_scheduling", False))
    cls = sc.scheduler_cls if _legacy() else sc.get_scheduler_cls()
    if not isinstance(cls, str):
        cls = f"{cls.__module__}.{cls.__qualname__}"
    return {
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "max_num_seqs": sc.max_num_seqs,
        "max_model_len": vllm_config.model_config.max_model_len,
        "chunked_prefill": bool(sc.enable_chunked_prefill),
        "async_scheduling": async_,
        "long_prefill_token_threshold": sc.long_prefill_token_threshold,
        "scheduler_cls": cls,
    }


def cache_summary(vllm_config) -> dict:
    c = vllm_config.cache_config
    return {
        "block_size": c.block_size,
        "gpu_memory_utilization": c.gpu_memory_utilization,
        "kv_cache_dtype": c.cache_dtype,
        "prefix_caching": bool(c.enable_prefix_caching),
    }


def attention_backend(vllm_config) -> str:
    """The name of the attention backend vLLM's selector picks for this model on the (real or what-if) GPU."""
    return attention_backend_class(vllm_config).get_name()


def attention_backend_class(vllm_config):
    """The attention backend class vLLM's selector picks for this model on the (real or what-if) GPU."""
    from vllm.config import set_current_vllm_config

    mc = vllm_config.model_config
    head_size = mc.get_head_size()
    with set_current_vllm_config(vllm_config):
        if _legacy():
            from vllm.attention.selector import get_attn_backend

            cls = get_attn_backend(head_size, mc.dtype, vllm_config.cache_config.cache_dtype,
                                   vllm_config.cache_config.block_size, use_mla=mc.use_mla)
        else:
            from vllm.v1.attention.selector import get_attn_backend

            cls = get_attn_backend(head_size, mc.dtype, vllm_config.cache_config.cache_dtype, use_mla=mc.use_mla)
    return cls


# --- scheduling -------------------------------------------------------------------------------------

def uniform_decode_query_len(vllm_config) -> int:
    """Tokens per request in a uniform decode step: 1, or 1 + speculative tokens (vLLM's model runner)."""
    spec = vllm_config.speculative_config
    return 1 if not spec else 1 + spec.num_speculative_tokens


def cudagraph_dispatcher(vllm_config, kv_spec=None):
    """vLLM's CudagraphDispatcher with its keys set up as the model runner sets them up at start-up.

    The configured graph mode is first resolved against the attention backend's CUDA-graph support
    (vLLM may downgrade it); the resolution works on a copy, ``vllm_config`` is left untouched.
    Returns (dispatcher, resolved CUDAGraphMode).
    """
    import copy

    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    builder = attention_backend_class(vllm_config).get_builder_cls()
    cc = copy.copy(vllm_config.compilation_config)
    uq = uniform_decode_query_len(vllm_config)
    try:
        if _legacy():
            mode = _resolve_cudagraph_mode_0_10(cc, builder.cudagraph_support, builder.__name__, uq)
        else:
            mode = cc.resolve_cudagraph_mode_and_sizes(
                builder.get_cudagraph_support(vllm_config, kv_spec), builder.__name__, uq,
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
    cannot be imported without a GPU: Triton's driver needs libcuda). Mirrors those lines verbatim."""
    from vllm.v1.attention.backends.utils import AttentionCGSupport
    from vllm.config import CUDAGraphMode

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



def compile_target(vllm_config, num_tokens: int) -> tuple[str, tuple[int, int] | None]:
    """Which compiled graph a step of ``num_tokens`` (padded) runs: (kind, (start, end)).

    kind: "size" (a graph compiled for exactly this size), "range" (0.20: the compile range holding it),
    "dynamic" (0.10.x: the one dynamic-shape graph; its range is 1..max_num_batched_tokens by
    convention), "whole" (compiled without piecewise splitting) or "none" (no compilation).
    """
    cc = vllm_config.compilation_config
    sizes = [int(s) for s in (cc.compile_sizes or []) if str(s).isdigit()]
    if _legacy():
        if cc.level == 0:
            return "none", None
        if cc.level != 3:
            return "whole", None
        if num_tokens in sizes:
            return "size", (num_tokens, num_tokens)
        return "dynamic", (1, vllm_config.scheduler_config.max_num_batched_tokens)
    if cc.mode.value == 0:
        return "none", None
    if cc.mode.value != 3:
        return "whole", None
    from types import SimpleNamespace

    from vllm.compilation.piecewise_backend import PiecewiseBackend
    from vllm.config.utils import Range

    ranges = cc.get_compile_ranges()
    entries = {Range(start=s, end=s): Range(start=s, end=s) for s in sizes}
    entries.update({r: r for r in ranges})
    # PiecewiseBackend's own lookup, given the state its constructor builds from the config.
    backend = SimpleNamespace(compile_sizes=sizes, compile_ranges=ranges, range_entries=entries)
    hit = PiecewiseBackend._find_range_for_shape(backend, num_tokens)
    if hit is None:
        return "outside", None
    return ("size" if hit.is_single_size() and hit not in ranges else "range"), (hit.start, hit.end)


# --- moe ---

def moe_backend_of(layer) -> tuple[str, str]:
    """(backend, experts kernel) that vLLM's MoE quant method on ``layer`` selects (call under layers.rank0)."""
    qm = layer.quant_method
    if _legacy():
        if getattr(qm, "use_cutlass", False):
            small = " (Triton fused_experts for M <= 8 on sm100)" if qm.is_fp8_w8a8_sm100 else ""
            return "CUTLASS FP8 (cutlass_moe_fp8)" + small, "CutlassExpertsFp8"
        if getattr(qm, "rocm_aiter_moe_enabled", False):
            return "ROCm AITER (rocm_aiter_fused_experts)", "rocm_aiter_fused_experts"
        if getattr(qm, "use_marlin", False):
            return "Marlin (fused_marlin_moe)", "fused_marlin_moe"
        return "Triton (fused_experts)", "TritonExperts"
    backend = next((v for k, v in vars(qm).items() if k.endswith("_backend") and hasattr(v, "value")), None)
    cls = getattr(qm, "experts_cls", None)
    name = backend.value if backend is not None else type(qm).__name__
    if cls is None:
        return name, "none selected"
    chosen = type(moe_experts(layer, 1 << 13))
    experts = cls.__name__ + (f" -> {chosen.__name__}" if chosen is not cls else "")
    return f"{name} ({experts})", experts


def _moe_quant_config(layer):
    """The FusedMoEQuantConfig the layer's method hands its experts (0.20 line)."""
    return layer.quant_method.get_fused_moe_quant_config(layer)


def moe_experts(layer, num_tokens: int):
    """The modular experts object vLLM runs for ``num_tokens`` tokens on this layer, or None (not modular)."""
    import dataclasses

    import torch

    qm = layer.quant_method
    if _legacy():
        from vllm.model_executor.layers.fused_moe.cutlass_moe import CutlassExpertsFp8

        if getattr(qm, "use_cutlass", False) and not (qm.is_fp8_w8a8_sm100 and num_tokens <= 8):
            return CutlassExpertsFp8(layer.quant_method.moe.in_dtype, qm.input_quant.strategy == "token",
                                     qm.weight_quant.strategy == "channel")
        return triton_experts(layer)
    cls = getattr(qm, "experts_cls", None)
    if cls is None:
        return None
    moe = dataclasses.replace(qm.moe, device=torch.device("meta"))
    experts = cls(moe, _moe_quant_config(layer))
    if hasattr(experts, "_select_experts_impl"):
        h = torch.empty(num_tokens, layer.hidden_size, dtype=moe.in_dtype, device="meta")
        experts = experts._select_experts_impl(h, layer.w13_weight, layer.w2_weight)
    return experts


def triton_experts(layer):
    """vLLM's Triton fused-MoE experts with this layer's quantization (what forcing the Triton path runs)."""
    import dataclasses

    import torch
    from vllm.model_executor.layers.fused_moe.fused_moe import TritonExperts

    qm = layer.quant_method
    if _legacy():
        fp8 = layer.w13_weight.dtype == torch.float8_e4m3fn
        return TritonExperts(use_fp8_w8a8=fp8, per_act_token_quant=fp8 and qm.input_quant.strategy == "token")
    return TritonExperts(dataclasses.replace(qm.moe, device=torch.device("meta")), _moe_quant_config(layer))


def triton_config_dtype(experts, act_dtype) -> str | None:
    """The dtype part of the fused-MoE config file name for these Triton experts."""
    if _legacy():
        from vllm.model_executor.layers.fused_moe.fused_moe import get_config_dtype_str

        return get_config_dtype_str(use_fp8_w8a8=experts.use_fp8_w8a8, use_int8_w8a16=experts.use_int8_w8a16,
                                    use_int4_w4a16=experts.use_int4_w4a16,
                                    use_mxfp4_w4a4=experts.use_mxfp4_w4a4, dtype=act_dtype)
    return experts.quant_config.config_name(act_dtype)


def experts_workspaces(experts, layer, num_tokens: int) -> dict:
    """vLLM's own workspace_shapes for ``num_tokens`` (per activation chunk where the version chunks)."""
    import torch

    E, N, K = layer.w13_weight.shape[0], layer.w13_weight.shape[1], layer.hidden_size
    chunk = moe_chunk_size()
    m = min(num_tokens, chunk) if chunk and experts.supports_chunking() else num_tokens
    args = (N, K, layer.top_k, layer.global_num_experts, layer.local_num_experts, None)
    if _legacy():
        a = torch.empty(num_tokens, K, dtype=layer.quant_method.moe.in_dtype, device="meta")
        ws13, ws2, _, dtype = experts.workspace_shapes(a, a, m, *args)
        out = experts.workspace_shapes(a, a, num_tokens, *args)[2]
    else:
        act = layer.quant_method.moe.activation
        ws13, ws2, _ = experts.workspace_shapes(m, *args, act)
        out = experts.workspace_shapes(num_tokens, *args, act)[2]
        dtype = experts.workspace_dtype(layer.quant_method.moe.in_dtype)
    return {"M_chunk": m, "workspace13": tuple(ws13), "workspace2": tuple(ws2), "output": tuple(out),
            "dtype": dtype}


def moe_chunk_size() -> int | None:
    """Tokens per fused-MoE activation chunk (VLLM_FUSED_MOE_CHUNK_SIZE), None where the version has none."""
    if not _legacy():
        return None
    import vllm.envs as envs

    return envs.VLLM_FUSED_MOE_CHUNK_SIZE if envs.VLLM_ENABLE_FUSED_MOE_ACTIVATION_CHUNKING else None
