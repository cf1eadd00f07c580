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


def set_default_torch_dtype(dtype):
    """vLLM's context manager that makes ``dtype`` torch's default while a model is built."""
    try:
        from vllm.utils.torch_utils import set_default_torch_dtype as ctx
    except ImportError:
        from vllm.model_executor.model_loader.utils import set_default_torch_dtype as ctx
    return ctx(dtype)


# --- the resolved configuration ---------------------------------------------------------------------

def compilation_summary(vllm_config) -> dict:
    """Compile mode, backend, graph mode, capture sizes, compile ranges and splitting ops."""
    cc = vllm_config.compilation_config
    capture = sorted(cc.cudagraph_capture_sizes or [])
    if _legacy():
        names = {0: "NO_COMPILATION", 1: "DYNAMO_AS_IS", 2: "DYNAMO_ONCE", 3: "PIECEWISE"}
        mode = f"{names.get(cc.level, '?')} (level {cc.level})"
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
    name = attention_backend_class(vllm_config).get_name()
    if name.startswith("FLASH_ATTN"):
        if _legacy():
            from vllm.attention.utils.fa_utils import get_flash_attn_version
        else:
            from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        name += f" (FlashAttention {get_flash_attn_version()})"
    return name


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


def cudagraph_dispatcher(vllm_config):
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


def dispatch_derived() -> str | None:
    """What in a dispatch answer is diaglib's mirror of vLLM code rather than vLLM's code run (None: nothing)."""
    if _legacy():
        return ("derived: 0.10.x pads and resolves the graph mode inline in GPUModelRunner (not importable "
                "without a GPU), mirrored here; its one dynamic-shape graph is shown as range 1..max_num_batched_tokens")
    return None

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


def kv_cache_spec(vllm_config):
    """One decoder layer's KV-cache spec on one rank, as vLLM's Attention layer builds it (full attention)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    if _legacy():
        from vllm.utils import get_kv_cache_torch_dtype
    else:
        from vllm.utils.torch_utils import get_kv_cache_torch_dtype
    kw = {"use_mla": mc.use_mla} if _legacy() else {}
    return FullAttentionSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=mc.get_num_kv_heads(pc),
                             head_size=mc.get_head_size(),
                             dtype=get_kv_cache_torch_dtype(vllm_config.cache_config.cache_dtype, mc.dtype), **kw)


def private_config(vllm_config):
    """A copy of the config whose cache and model configs are its own: what vLLM's engine start-up writes
    into them (num_gpu_blocks; max_model_len, which 0.10.x's KV sizing leaves changed after a failed check)
    stays out of the scenario's config."""
    import copy

    cfg = copy.copy(vllm_config)
    cfg.cache_config = copy.copy(vllm_config.cache_config)
    cfg.model_config = copy.copy(vllm_config.model_config)
    return cfg


def kv_cache_config(vllm_config, memory_bytes: int):
    """vLLM's KVCacheConfig for one rank with ``memory_bytes`` of KV memory, plus the scheduler's
    (block_size, hash_block_size). Too little memory for max_model_len -> DiagError (vLLM's check).
    Pass a :func:`private_config`: vLLM may write into it."""
    from vllm.v1.core import kv_cache_utils as ku

    spec = kv_cache_spec(vllm_config)
    n = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
    specs = {f"model.layers.{i}.self_attn.attn": spec for i in range(n)}
    try:
        if _legacy():
            cfg = ku.get_kv_cache_config(vllm_config, specs, memory_bytes)
            return cfg, vllm_config.cache_config.block_size, vllm_config.cache_config.block_size
        cfg = ku.generate_scheduler_kv_cache_config(ku.get_kv_cache_configs(vllm_config, [specs], [memory_bytes]))
        return (cfg, *ku.resolve_kv_cache_block_sizes(cfg, vllm_config))
    except ValueError as e:
        raise DiagError(f"vLLM's KV-cache sizing: {' '.join(str(e).split())}") from None


def new_scheduler(cfg, kv_cfg, block_size: int, hash_block_size: int):
    """The scheduler class the engine core picks, built as the engine core builds it, on ``cfg`` (a
    :func:`private_config`: the engine writes num_gpu_blocks into it). Returns (scheduler, block hasher)."""
    from vllm.v1.structured_output import StructuredOutputManager

    cfg.cache_config.num_gpu_blocks = kv_cfg.num_blocks
    cfg.model_config.skip_tokenizer_init = True  # no tokenizer files here; only grammar decoding needs one
    if _legacy():
        from vllm.utils import get_hash_fn_by_name, resolve_obj_by_qualname

        cls = cfg.scheduler_config.scheduler_cls
        cls = resolve_obj_by_qualname(cls) if isinstance(cls, str) else cls
        sched = cls(vllm_config=cfg, kv_cache_config=kv_cfg, structured_output_manager=StructuredOutputManager(cfg),
                    include_finished_set=cfg.parallel_config.data_parallel_size > 1, log_stats=False)
    else:
        from vllm.utils.hashing import get_hash_fn_by_name

        sched = cfg.scheduler_config.get_scheduler_cls()(
            vllm_config=cfg, kv_cache_config=kv_cfg, structured_output_manager=StructuredOutputManager(cfg),
            include_finished_set=False, log_stats=False, block_size=block_size, hash_block_size=hash_block_size)
    hasher = None
    if cfg.cache_config.enable_prefix_caching:
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
        init_none_hash(fn)
        hasher = get_request_block_hasher(hash_block_size, fn)
    return sched, hasher


def new_request(req_id: str, prompt_token_ids: list[int], max_tokens: int, block_hasher, cache_salt: str):
    """A V1 Request that generates exactly ``max_tokens`` tokens (EOS ignored); ``cache_salt`` keeps its
    blocks apart from other requests' in the prefix cache."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    if _legacy():
        return Request(request_id=req_id, prompt_token_ids=prompt_token_ids, multi_modal_kwargs=None,
                       multi_modal_hashes=None, multi_modal_placeholders=None, sampling_params=params,
                       pooling_params=None, eos_token_id=None, cache_salt=cache_salt, block_hasher=block_hasher)
    return Request(request_id=req_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
                   pooling_params=None, cache_salt=cache_salt, block_hasher=block_hasher)


def check_prompt_len(vllm_config, prompt_len: int) -> None:
    """vLLM's own front-end check of a decoder prompt's length (DiagError with vLLM's message)."""
    import copy
    from types import SimpleNamespace

    mc = copy.copy(vllm_config.model_config)
    mc.skip_tokenizer_init = True  # the check is on the length only
    try:
        if _legacy():
            from vllm.v1.engine.processor import Processor

            Processor._validate_model_input(SimpleNamespace(model_config=mc), {"prompt_token_ids": [0] * prompt_len},
                                            None, prompt_type="decoder")
        else:
            from vllm.v1.engine.input_processor import InputProcessor

            InputProcessor._validate_prompt_len(
                SimpleNamespace(model_config=mc, skip_prompt_length_check=False, supports_mm_inputs=False,
                                mm_encoder_cache_size=0), prompt_len, "decoder")
    except ValueError as e:
        raise DiagError(f"vLLM would reject this request: {str(e).split('. Make sure')[0]}") from None


def capture_sizes_flag() -> str:
    """The serve flag that lists CUDA-graph capture sizes."""
    return "--cuda-graph-sizes" if _legacy() else "--cudagraph-capture-sizes"


def max_capture_size_flags(size: str) -> list[str]:
    """Serve flags for a largest capture size (0.10.x: one --cuda-graph-sizes value means 1, 2, 4, 8.. N)."""
    return ["--cuda-graph-sizes", size] if _legacy() else ["--max-cudagraph-capture-size", size]


def batch_queue_size(vllm_config) -> int:
    """How many scheduled steps the engine core keeps in flight: its executor's max_concurrent_batches
    (0.20.2 with async scheduling: 2, so step k+1 is scheduled before step k's output is processed)."""
    import inspect
    from types import SimpleNamespace

    from vllm.v1.executor.abstract import Executor

    prop = inspect.getattr_static(Executor.get_class(vllm_config), "max_concurrent_batches")
    fn = getattr(prop, "fget", None) or prop.func  # a property on 0.10.x, a cached_property on 0.20
    return fn(SimpleNamespace(parallel_config=vllm_config.parallel_config,
                              scheduler_config=vllm_config.scheduler_config))

def runner_output(req_ids: list[str], sampled: list[list[int]]):
    """The ModelRunnerOutput a worker returns for one step (sampled tokens only)."""
    from vllm.v1.outputs import ModelRunnerOutput

    index = {r: i for i, r in enumerate(req_ids)}
    if _legacy():
        return ModelRunnerOutput(req_ids=req_ids, req_id_to_index=index, sampled_token_ids=sampled,
                                 spec_token_ids=None, logprobs=None, prompt_logprobs_dict={}, pooler_output=[])
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index=index, sampled_token_ids=sampled)


# --- moe ---

def cutlass_index_buffers(rows: int) -> tuple[str, list[tuple[str, tuple, str, str]]]:
    """The CUTLASS FP8 MoE path's expert-offset dtype and its permutation index buffers for ``rows`` = M x top-k:
    0.10.x keeps a_map / c_map and int32 expert offsets; 0.20 permutes with moe_permute (int64 offsets)."""
    if _legacy():
        return "int32", [("a_map", (rows,), "int32", ""), ("c_map", (rows,), "int32", "")]
    return "int64", [("inv_perm", (rows,), "int32", "moe_permute inverse permutation")]


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
            return CutlassExpertsFp8(qm.moe.in_dtype, _ct_strategy(qm, "input_quant") == "token",
                                     _ct_strategy(qm, "weight_quant") == "channel")
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
        block = getattr(qm, "weight_block_size", None) or getattr(getattr(qm, "quant_config", None),
                                                                   "weight_block_size", None)
        per_token = fp8 and _ct_strategy(qm, "input_quant") == "token"
        return TritonExperts(use_fp8_w8a8=fp8, per_act_token_quant=per_token, block_shape=block)
    return TritonExperts(dataclasses.replace(qm.moe, device=torch.device("meta")), _moe_quant_config(layer))


def _ct_strategy(qm, which: str) -> str | None:
    """A compressed-tensors method's input/weight quantization strategy (None for other methods)."""
    return getattr(getattr(qm, which, None), "strategy", None)


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

    N, K = layer.w13_weight.shape[1], layer.hidden_size
    chunk = moe_chunk_size()
    m = min(num_tokens, chunk) if chunk and experts.supports_chunking() else num_tokens
    args = (N, K, layer.top_k, layer.global_num_experts, layer.local_num_experts, None)
    if _legacy():
        a = torch.empty(num_tokens, K, dtype=layer.quant_method.moe.in_dtype, device="meta")  # dtype carrier
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



# --- kill switches ---

def kill_switches(vllm_config, attention: str) -> dict[str, tuple[list[str], dict[str, str]] | str]:
    """This vLLM's spelling of each kill switch as (serve flags, env vars), or why the version has none.

    ``attention``: the attention backend the scenario runs (the switch picks another one).
    Checked against vLLM's parser and resolved config by diaglib.switches.verify.
    """
    mnbt = vllm_config.scheduler_config.max_num_batched_tokens
    common = {
        "enforce-eager": (["--enforce-eager"], {}),
        "budget+1": (["--max-num-batched-tokens", str(mnbt + 1)], {}),
        "budget-1": (["--max-num-batched-tokens", str(mnbt - 1)], {}),
        "pad-off": "VLLM_DISABLE_PAD_FOR_CUDAGRAPH exists in neither 0.10.1.1 nor 0.20.2",
    }
    if _legacy():
        other = "FLASH_ATTN_VLLM_V1" if attention.startswith("TRITON") else "TRITON_ATTN_VLLM_V1"
        return {**common,
                "compile-off": (["-O", "0"], {}),
                "cudagraph-off": (["-O.cudagraph_mode=NONE"], {}),
                # -O.backend=eager is accepted but ignored at level 3 (PIECEWISE reads use_inductor).
                "inductor-off": (["-O.use_inductor=False"], {}),
                "chunked-prefill-off": "the V1 engine of 0.10 forces chunked prefill on "
                                       "(EngineArgs._set_default_args_v1 overrides --no-enable-chunked-prefill)",
                "async-off": "async scheduling is off by default on 0.10",
                "moe-chunk-off": ([], {"VLLM_ENABLE_FUSED_MOE_ACTIVATION_CHUNKING": "0"}),
                "moe-chunk-half": ([], {"VLLM_FUSED_MOE_CHUNK_SIZE": str(max(mnbt // 2, 1))}),
                "moe-backend": "no switch: sm90 FP8 compressed-tensors MoE always takes CUTLASS "
                               "(use_cutlass is checked before VLLM_TEST_FORCE_FP8_MARLIN in apply)",
                "attention-backend": ([], {"VLLM_ATTENTION_BACKEND": other})}
    other = "FLASH_ATTN" if attention.startswith("TRITON") else "TRITON_ATTN"
    return {**common,
            "compile-off": (["-cc.mode=0"], {}),
            "cudagraph-off": (["-cc.cudagraph_mode=NONE"], {}),
            "inductor-off": (["-cc.backend=eager"], {}),
            # Without chunking vLLM requires max_model_len <= max_num_batched_tokens.
            "chunked-prefill-off": (["--no-enable-chunked-prefill", "--max-model-len", str(mnbt)], {}),
            "async-off": (["--no-async-scheduling"], {}),
            "moe-chunk-off": "fused-MoE activation chunking was removed (no VLLM_ENABLE_FUSED_MOE_ACTIVATION_CHUNKING)",
            "moe-chunk-half": "fused-MoE activation chunking was removed (no VLLM_FUSED_MOE_CHUNK_SIZE)",
            "moe-backend": (["--moe-backend", "triton"], {}),
            "attention-backend": (["--attention-backend", other], {})}


def fresh_attention_backend(vllm_config) -> str:
    """attention_backend() after clearing vLLM's selector cache (it does not key on VLLM_ATTENTION_BACKEND)."""
    if _legacy():
        from vllm.attention.selector import _cached_get_attn_backend

        _cached_get_attn_backend.cache_clear()
    return attention_backend(vllm_config)
