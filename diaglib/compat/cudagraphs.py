"""CUDA-graph dispatch and padding: what the model runner does with a step of N tokens.

Eras (decided by what the installed vLLM has):
- model runner: V1 ``GPUModelRunner`` with vLLM's ``CudagraphDispatcher``; the V2 runner (``vllm.v1.worker.gpu``)
  with its ``CudaGraphManager`` where ``VllmConfig.use_v2_model_runner`` says so (0.22.1+: chosen
  architectures; 0.28.0: every dense model; 0.29.0+: every model), or VLLM_USE_V2_MODEL_RUNNER=1 before.
- graph mode resolution against attention: ``GPUModelRunner.initialize_cudagraph_capture`` (0.10.1-0.10.2),
  ``_check_and_update_cudagraph_mode`` (0.11.2+; from 0.20.2 it calls
  ``CompilationConfig.resolve_cudagraph_mode_and_sizes``, which the V2 runner calls itself).
- dispatch: none in 0.10.0 (piecewise graphs inline in the runner); ``dispatch(BatchDescriptor)`` with the
  runner padding first (0.10.1-0.11.2); ``dispatch(num_tokens, uniform_decode, has_lora, ...)`` padding
  itself (0.12.0+).
- sequence-parallel padding to a multiple of TP: inline in the eager path (0.10.0-0.11.2),
  ``GPUModelRunner._pad_for_sequence_parallelism`` (0.12.0-0.31.0), gone with the SP pass (0.32.0).
- uniform-decode rule: ``GPUModelRunner._is_uniform_decode`` from 0.14.1 (inline before; 0.12-0.13 test
  the SP-padded count); V2: ``get_uniform_token_count`` / ``get_uniform_decode_token_count``.

Where a rule is inline in a module that cannot be imported here, or the runner's own state is needed, the
rule is mirrored and :func:`dispatch_derived` says what.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ..errors import DiagError
from .attention import attention_backend_class
from .compile import cudagraph_mode_name, has_compile_ranges, has_cudagraph_mode, is_piecewise, max_capture_size
from .detect import call, first, has, missing, takes
from .scheduling import kv_cache_spec

_DISPATCH = "vllm.v1.cudagraph_dispatcher:CudagraphDispatcher.dispatch"


def uniform_decode_query_len(vllm_config) -> int:
    """Tokens per request in a uniform decode step: 1, or 1 + speculative tokens (vLLM's model runner)."""
    spec = vllm_config.speculative_config
    return 1 if not spec else 1 + spec.num_speculative_tokens


def runner_kind(vllm_config) -> str:
    """Which GPU model runner vLLM's worker builds for this config: "V1" or "V2"."""
    if has("vllm.config:VllmConfig.use_v2_model_runner"):
        return "V2" if vllm_config.use_v2_model_runner else "V1"
    import vllm.envs as envs

    opt_in = "VLLM_USE_V2_MODEL_RUNNER" in getattr(envs, "environment_variables", {}) and envs.VLLM_USE_V2_MODEL_RUNNER
    return "V2" if opt_in and has("vllm.v1.worker.gpu.model_runner") else "V1"


@functools.cache
def _v1_runner():
    """vLLM's V1 GPUModelRunner class, or None where its module cannot be imported without a GPU."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception:  # noqa: BLE001  (0.10.x: Triton's driver probe needs libcuda at import)
        return None
    return GPUModelRunner


@dataclass
class GraphDispatch:
    """CUDA-graph dispatch for one config, set up as the model runner sets it up at start-up.

    ``vllm_config`` is a copy whose compilation config holds the mode resolved against the attention
    backend (the scenario's config is left untouched); ``impl`` is vLLM's CudagraphDispatcher (V1),
    CudaGraphManager (V2), or None (0.10.0, where the runner decides inline)."""

    vllm_config: Any
    mode: str
    runner: str
    impl: Any
    uniform_query_len: int


def _attention_cg_support(cfg):
    """(backend class, builder class, AttentionCGSupport) the model runner reads from the attention backend."""
    backend = attention_backend_class(cfg)
    builder = backend.get_builder_cls()
    if hasattr(builder, "get_cudagraph_support"):
        return backend, builder, builder.get_cudagraph_support(cfg, kv_cache_spec(cfg))
    return backend, builder, builder.cudagraph_support


def _private_compilation(vllm_config):
    """A copy of the config with a compilation config of its own (the runner resolves the mode into it)."""
    cfg = copy.copy(vllm_config)
    cc = cfg.compilation_config = copy.copy(vllm_config.compilation_config)
    cc.cudagraph_capture_sizes = list(cc.cudagraph_capture_sizes or [])
    return cfg


def cudagraph_dispatcher(vllm_config) -> GraphDispatch:
    """vLLM's CUDA-graph dispatch for ``vllm_config``, with the graph mode resolved as the model runner
    resolves it at start-up (a mode vLLM refuses -> DiagError with vLLM's reason)."""
    from vllm.config import set_current_vllm_config

    cfg = _private_compilation(vllm_config)
    uq = uniform_decode_query_len(cfg)
    kind = runner_kind(cfg)
    try:
        if not has_cudagraph_mode():
            return GraphDispatch(cfg, cudagraph_mode_name(cfg), kind, None, uq)
        with set_current_vllm_config(cfg):  # as the runner's start-up: backends read it (FlashInfer's builder)
            return _v2_dispatch(cfg, uq) if kind == "V2" else _v1_dispatch(cfg, uq)
    except ValueError as e:
        raise DiagError(f"vLLM rejects the CUDA-graph mode: {str(e).splitlines()[0]}") from None


def _v1_dispatch(cfg, uq) -> GraphDispatch:
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    cc = cfg.compilation_config
    disp = CudagraphDispatcher(cfg)
    backend, builder, support = _attention_cg_support(cfg)
    runner = _v1_runner()
    me = SimpleNamespace(vllm_config=cfg, compilation_config=cc, parallel_config=cfg.parallel_config,
                         model_config=cfg.model_config, uniform_decode_query_len=uq, kv_cache_config=None,
                         max_num_reqs=cfg.scheduler_config.max_num_seqs, cudagraph_dispatcher=disp,
                         speculative_config=cfg.speculative_config, drafter=None,
                         _attn_group_iterator=lambda: [SimpleNamespace(metadata_builder=builder)])
    try:
        if runner is not None and hasattr(runner, "_check_and_update_cudagraph_mode"):
            from vllm.v1.kv_cache_interface import KVCacheGroupSpec

            group = call("KVCacheGroupSpec", KVCacheGroupSpec, layer_names=["model.layers.0.self_attn.attn"],
                         kv_cache_spec=kv_cache_spec(cfg))
            runner._check_and_update_cudagraph_mode(me, [{backend}], [group])
        elif runner is not None and hasattr(runner, "initialize_cudagraph_capture"):
            runner.initialize_cudagraph_capture(me)
        else:
            cc.cudagraph_mode = _resolve_mode_inline(cc, support, builder.__name__, uq)
            disp.initialize_cudagraph_keys(cc.cudagraph_mode, uq)
    except AttributeError as e:  # the runner method reads state diaglib does not set up
        raise missing("model-runner state diaglib knows how to set up", str(e)) from None
    return GraphDispatch(cfg, cc.cudagraph_mode.name, "V1", disp, uq)


def _resolve_mode_inline(cc, support, backend: str, uq: int):
    """GPUModelRunner.initialize_cudagraph_capture of 0.10.1-0.10.2, for where that module cannot be
    imported (Triton's driver needs libcuda): the same rule, messages shortened (derived)."""
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


def _v2_dispatch(cfg, uq) -> GraphDispatch:
    """The V2 runner's CudaGraphManager: the mode from resolve_cudagraph_mode_and_sizes as the V2 runner
    calls it, then the manager's own _init_candidates and dispatch on the state its constructor sets
    (its constructor also asks the pipeline group and a CUDA graph pool, which need a GPU)."""
    mgr_cls = first("the V2 model runner's CUDA-graph manager", "vllm.v1.worker.gpu.cudagraph_utils:CudaGraphManager")
    if not hasattr(mgr_cls, "_init_candidates"):
        raise missing("V2 CUDA-graph manager with candidate descriptors", "CudaGraphManager._init_candidates")
    cc = cfg.compilation_config
    if not hasattr(cc, "resolve_cudagraph_mode_and_sizes"):
        raise missing("graph-mode resolution for the V2 model runner", "CompilationConfig.resolve_cudagraph_mode_and_sizes")
    backend, builder, support = _attention_cg_support(cfg)
    mode = call("resolve_cudagraph_mode_and_sizes", cc.resolve_cudagraph_mode_and_sizes, min_cg_support=support,
                min_cg_attn_backend=backend.__name__, uniform_decode_query_len=uq, use_v2_model_runner=True,
                tensor_parallel_size=cfg.parallel_config.tensor_parallel_size, kv_cache_config=None,
                max_num_reqs=cfg.scheduler_config.max_num_seqs, piecewise_capture_available=is_piecewise(cc))
    cc.cudagraph_mode = mode
    mgr = object.__new__(mgr_cls)
    pc = cfg.parallel_config
    vars(mgr).update(vllm_config=cfg, compilation_config=cc, cudagraph_mode=mode, decode_query_len=uq,
                     max_num_reqs=cfg.scheduler_config.max_num_seqs, device=None, pool=None, graphs={},
                     tp_size=pc.tensor_parallel_size, dp_size=pc.data_parallel_size, is_first_pp_rank=True,
                     is_last_pp_rank=pc.pipeline_parallel_size == 1, lora_capture_cases=[0], varlen_decode=False,
                     ubatch_runner=None, use_breakable_cg=False, breakable_cg_runner=None,
                     _candidates={}, _capture_descs={}, _graphs_captured=False, _lora_dispatch_map={},
                     _max_lora_case=0, _capture_mem_samples=None, _max_full_descs_to_capture=None)
    if hasattr(mgr, "_build_lora_dispatch_map"):
        mgr._lora_dispatch_map, mgr._max_lora_case = mgr._build_lora_dispatch_map()
    try:
        mgr._init_candidates()
    except AttributeError as e:
        raise missing("V2 CUDA-graph manager state diaglib knows how to set up", str(e)) from None
    mgr._graphs_captured = True  # dispatch as after start-up capture
    return GraphDispatch(cfg, mode.name, "V2", mgr, uq)


def dispatch_batch(gd: GraphDispatch, num_tokens: int, num_reqs: int, max_query_len: int,
                   has_prefill: bool | None = None) -> tuple[int, str, bool, str | None]:
    """Pad and dispatch one step as the model runner does: (padded tokens, CUDA-graph mode name,
    uniform decode, batch descriptor as text). ``has_prefill``: whether a request in the step is still
    prefilling (default: not a uniform batch of ``uniform_query_len``-token requests). Data parallelism,
    LoRA and cascade attention are not modelled."""
    uq = gd.uniform_query_len
    if has_prefill is None:
        has_prefill = not (max_query_len == uq and num_tokens == num_reqs * uq)
    if gd.runner == "V2":
        return _dispatch_v2(gd, num_tokens, num_reqs, max_query_len, has_prefill)
    if gd.impl is None:
        return _dispatch_inline(gd, num_tokens, num_reqs, max_query_len)
    return _dispatch_v1(gd, num_tokens, num_reqs, max_query_len)


def _sp_padded(cfg, runner, num_tokens: int) -> int:
    """Sequence-parallel padding to a multiple of TP where the runner pads for it (else unchanged)."""
    if runner is not None and hasattr(runner, "_pad_for_sequence_parallelism"):
        return runner._pad_for_sequence_parallelism(
            SimpleNamespace(vllm_config=cfg, compilation_config=cfg.compilation_config), num_tokens)
    return num_tokens


def _inline_sp(cfg, num_tokens: int) -> int:
    """The eager path's SP padding of 0.10.0-0.11.2 (inline in the runner; derived)."""
    tp = cfg.parallel_config.tensor_parallel_size
    if getattr(cfg.compilation_config.pass_config, "enable_sequence_parallelism", False) and tp > 1:
        return -(-num_tokens // tp) * tp
    return num_tokens


def _uniform_inline(max_query_len, uq, num_tokens, num_reqs) -> bool:
    """The uniform-decode rule before GPUModelRunner._is_uniform_decode (inline; derived)."""
    return max_query_len == uq and num_tokens == num_reqs * max_query_len


def _dispatch_v1(gd, num_tokens, num_reqs, max_query_len):
    from vllm.forward_context import BatchDescriptor

    cfg, disp, runner = gd.vllm_config, gd.impl, _v1_runner()
    if takes(_DISPATCH, "num_tokens"):  # 0.12+: the dispatcher pads
        sp = _sp_padded(cfg, runner, num_tokens)
        if runner is not None and hasattr(runner, "_is_uniform_decode"):
            uniform = runner._is_uniform_decode(max_query_len, gd.uniform_query_len, num_tokens, num_reqs)
        else:
            uniform = _uniform_inline(max_query_len, gd.uniform_query_len, sp, num_reqs)
        mode, desc = call("CudagraphDispatcher.dispatch", disp.dispatch, num_tokens=sp, uniform_decode=uniform,
                          has_lora=False, use_cascade_attn=False)
        return desc.num_tokens, mode.name, uniform, str(desc)
    # 0.10.1-0.11.2: the runner pads, then asks the dispatcher about the padded batch.
    uniform = _uniform_inline(max_query_len, gd.uniform_query_len, num_tokens, num_reqs)
    padded = _caller_padded(cfg, runner, num_tokens)
    mode, desc = call("CudagraphDispatcher.dispatch", disp.dispatch,
                      call("BatchDescriptor", BatchDescriptor, num_tokens=padded, uniform_decode=uniform,
                           has_lora=False), use_cascade_attn=False)
    return padded, mode.name, uniform, str(desc) if desc is not None else None


def _caller_padded(cfg, runner, num_tokens: int) -> int:
    """The runner's padding before dispatch: GPUModelRunner._get_num_input_tokens (0.11.2) or its inline
    form of 0.10.1-0.10.2 (derived): the next capture size for a graph, SP padding in eager mode."""
    cc = cfg.compilation_config
    sizes = sorted(cc.cudagraph_capture_sizes or [])
    if runner is not None and hasattr(runner, "_get_num_input_tokens"):
        return runner._get_num_input_tokens(SimpleNamespace(compilation_config=cc, vllm_config=cfg,
                                                            cudagraph_batch_sizes=sizes), num_tokens)
    import vllm.envs as envs
    from vllm.config import CUDAGraphMode

    no_pad = "VLLM_DISABLE_PAD_FOR_CUDAGRAPH" in envs.environment_variables and envs.VLLM_DISABLE_PAD_FOR_CUDAGRAPH
    if cc.cudagraph_mode != CUDAGraphMode.NONE and not no_pad and sizes and num_tokens <= sizes[-1]:
        return cfg.pad_for_cudagraph(num_tokens)
    return _inline_sp(cfg, num_tokens)


def _dispatch_inline(gd, num_tokens, num_reqs, max_query_len):
    """0.10.0: GPUModelRunner.execute_model pads to the next capture size and replays the piecewise
    (or, with full_cuda_graph, whole-model) graph when the step fits the largest one (derived)."""
    cfg = gd.vllm_config
    uniform = _uniform_inline(max_query_len, gd.uniform_query_len, num_tokens, num_reqs)
    if gd.mode != "NONE" and num_tokens <= max_capture_size(cfg.compilation_config):
        return cfg.pad_for_cudagraph(num_tokens), gd.mode, uniform, None
    return _inline_sp(cfg, num_tokens), "NONE", uniform, None


def _dispatch_v2(gd, num_tokens, num_reqs, max_query_len, has_prefill):
    if has("vllm.v1.worker.utils:get_uniform_decode_token_count"):
        from vllm.v1.worker.utils import get_uniform_decode_token_count

        count = call("get_uniform_decode_token_count", get_uniform_decode_token_count, num_reqs, num_tokens,
                     max_query_len, has_prefill=has_prefill, decode_graph_eligible=not has_prefill)
    else:
        count = first("the V2 runner's uniform-batch rule",
                      "vllm.v1.worker.gpu.cudagraph_utils:get_uniform_token_count")(num_reqs, num_tokens, max_query_len)
    desc = call("CudaGraphManager.dispatch", gd.impl.dispatch, num_reqs, num_tokens, count, num_active_loras=0,
                max_query_len=max_query_len)
    return desc.num_tokens, desc.cg_mode.name, count == gd.uniform_query_len, str(desc)


def dispatch_derived(gd: GraphDispatch) -> str | None:
    """What in a dispatch answer is diaglib's mirror of vLLM code rather than vLLM's code run (None: nothing)."""
    notes = []
    if gd.impl is None:
        notes.append("this vLLM has no CUDA-graph dispatcher: GPUModelRunner pads and picks graphs inline "
                     "(mirrored here)")
    elif gd.runner == "V2":
        notes.append("V2 model runner: its CudaGraphManager's own candidates and dispatch, on the state its "
                     "constructor sets (which needs a GPU); prefill vs decode from the batch shape")
    elif _v1_runner() is None:
        notes.append("GPUModelRunner (not importable without a GPU) resolves the graph mode and pads inline: "
                     "mirrored here")
    elif not hasattr(_v1_runner(), "_is_uniform_decode"):
        notes.append("the uniform-decode test is inline in GPUModelRunner here: mirrored")
    if is_piecewise(gd.vllm_config.compilation_config) and not has_compile_ranges():
        notes.append("one dynamic-shape graph, shown as range 1..max_num_batched_tokens")
    return ("derived: " + "; ".join(notes)) if notes else None

