"""Scheduler and KV-cache sizing: vLLM's V1 scheduler, its requests and outputs, built as the engine core builds them.

Eras (decided by what the installed vLLM has):
- scheduler class: ``SchedulerConfig.scheduler_cls`` (a qualname or class) up to 0.10.2;
  ``get_scheduler_cls()`` from 0.11.2 (AsyncScheduler with async scheduling, on by default from 0.14.1).
- scheduler arguments: ``block_size`` from 0.11.2, ``hash_block_size`` from 0.20.2 (both from
  ``resolve_kv_cache_block_sizes``; before, block_size x DCP x PCP as EngineCore computes it).
- KV sizing: ``kv_cache_utils.get_kv_cache_config`` (one worker) up to 0.10.2; ``get_kv_cache_configs`` +
  ``generate_scheduler_kv_cache_config`` from 0.11.2; ``kv_cache_planning.get_kv_cache_configs`` with
  ``get_global_kv_cache_groups`` in 0.33.0; from 0.29.0 a KV-cache layout resolved first (``resolve_kv_cache_layout``).
- request hashing: inside the KV-cache manager in 0.10.0; ``get_request_block_hasher`` + ``Request(block_hasher=)``
  from 0.10.1; ``get_hash_fn_by_name`` in ``vllm.utils`` (0.10.1) then ``vllm.utils.hashing`` (0.11.2).
- ``Request`` and ``ModelRunnerOutput`` arguments change often: given by keyword, only those the class takes;
  0.11.2's ModelRunnerOutput wants numpy arrays of sampled tokens (declared ``list[np.ndarray]``).
- steps in flight: the executor's ``max_concurrent_batches`` up to 0.22.1, ``VllmConfig.max_concurrent_batches``
  from 0.23.0.
"""
from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace

from ..errors import DiagError
from .detect import call, fields, first, has


def scheduler_class(vllm_config):
    """The scheduler class vLLM's engine core instantiates for this config."""
    sc = vllm_config.scheduler_config
    if hasattr(sc, "get_scheduler_cls"):
        return sc.get_scheduler_cls()
    cls = sc.scheduler_cls
    if isinstance(cls, str):
        cls = first("resolve_obj_by_qualname", "vllm.utils.import_utils:resolve_obj_by_qualname",
                    "vllm.utils:resolve_obj_by_qualname")(cls)
    return cls


def scheduler_summary(vllm_config) -> dict:
    """The scheduler knobs that decide what one step holds."""
    sc = vllm_config.scheduler_config
    cls = scheduler_class(vllm_config)
    return {
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "max_num_seqs": sc.max_num_seqs,
        "max_model_len": vllm_config.model_config.max_model_len,
        "chunked_prefill": bool(sc.enable_chunked_prefill),
        "async_scheduling": bool(getattr(sc, "async_scheduling", False)),
        "long_prefill_token_threshold": sc.long_prefill_token_threshold,
        "scheduler_cls": f"{cls.__module__}.{cls.__qualname__}",
    }


def cache_summary(vllm_config) -> dict:
    c = vllm_config.cache_config
    return {
        "block_size": c.block_size,
        "gpu_memory_utilization": c.gpu_memory_utilization,
        "kv_cache_dtype": c.cache_dtype,
        "prefix_caching": bool(c.enable_prefix_caching),
    }


def kv_cache_spec(vllm_config):
    """One decoder layer's KV-cache spec on one rank, as vLLM's attention layer builds it (full attention):
    for MLA, ``MLAAttentionSpec`` with one latent head as MLAAttention.get_kv_cache_spec makes it where vLLM has
    that class (0.11 on), ``FullAttentionSpec(use_mla=True)`` before; either holds no separate V."""
    from vllm.v1 import kv_cache_interface as ki

    mc, pc, cache = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    kv_dtype = first("get_kv_cache_torch_dtype", "vllm.utils.torch_utils:get_kv_cache_torch_dtype",
                     "vllm.utils:get_kv_cache_torch_dtype")
    common = dict(block_size=cache.block_size, head_size=mc.get_head_size(),
                  dtype=kv_dtype(cache.cache_dtype, mc.dtype))
    if mc.use_mla and hasattr(ki, "MLAAttentionSpec"):
        return call("MLAAttentionSpec", ki.MLAAttentionSpec, num_kv_heads=1, cache_dtype_str=cache.cache_dtype,
                    **common)
    return call("FullAttentionSpec", ki.FullAttentionSpec, num_kv_heads=mc.get_num_kv_heads(pc),
                use_mla=mc.use_mla, **common)


def full_attention_kv_specs(vllm_config) -> dict:
    """Layer name -> :func:`kv_cache_spec` for every decoder layer: the layout where the model's own layers cannot
    give theirs."""
    n = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
    return {f"model.layers.{i}.self_attn.attn": kv_cache_spec(vllm_config) for i in range(n)}


def private_config(vllm_config):
    """A copy of the config whose cache and model configs are its own: what vLLM's engine start-up writes
    into them (num_gpu_blocks; max_model_len, which KV sizing may leave changed after a failed check)
    stays out of the scenario's config."""
    cfg = copy.copy(vllm_config)
    cfg.cache_config = copy.copy(vllm_config.cache_config)
    cfg.model_config = copy.copy(vllm_config.model_config)
    return cfg


def _engine_block_sizes(kv_cfg, vllm_config) -> tuple[int, int]:
    """(scheduler block size, hash block size) as EngineCore derives them."""
    from vllm.v1.core import kv_cache_utils as ku

    if hasattr(ku, "resolve_kv_cache_block_sizes"):
        return ku.resolve_kv_cache_block_sizes(kv_cfg, vllm_config)
    pc = vllm_config.parallel_config
    bs = (vllm_config.cache_config.block_size * (getattr(pc, "decode_context_parallel_size", 1) or 1)
          * (getattr(pc, "prefill_context_parallel_size", 1) or 1))
    return bs, bs


def _settle_block_size(kv_cfg, vllm_config) -> None:
    """Where the KV block size is settled after loading the model (attention.block_size_set_after_load), the
    engine core takes it from the sized KV-cache groups before it builds the scheduler: the smallest block size of
    the groups that take part in prefix caching, else of all (vllm/v1/engine/core.py,
    EngineCore._initialize_kv_caches; e.g. FlashMLA's 64 where the resolved config said 16)."""
    from .attention import block_size_set_after_load

    groups = kv_cfg.kv_cache_groups
    if not groups or not block_size_set_after_load():
        return
    sizes = [g.kv_cache_spec.block_size for g in groups if getattr(g.kv_cache_spec, "prefix_cacheable", True)]
    vllm_config.cache_config.block_size = min(sizes or [g.kv_cache_spec.block_size for g in groups])


def _resolve_kv_cache_layout(vllm_config, specs: list) -> None:
    """Where the engine core resolves one KV-cache layout before sizing (0.29.0+), resolve it as it does:
    from the layouts the attention backend supports, recorded in the (private) cache config."""
    if not has("vllm.v1.attention.backends.utils:resolve_kv_cache_layout") \
            or vllm_config.cache_config.kv_cache_layout is not None:
        return
    from vllm.v1.attention.backends import utils as au

    from .attention import attention_backend_class

    supported = [layout.name for layout in au.get_supported_kv_cache_layouts([attention_backend_class(vllm_config)])]
    layout = au.resolve_kv_cache_layout(vllm_config, [supported], specs)
    au.record_kv_cache_layout(vllm_config.cache_config, layout.name)


def kv_cache_config(vllm_config, memory_bytes: int, specs: dict | None = None):
    """vLLM's KVCacheConfig for one rank with ``memory_bytes`` of KV memory, plus the scheduler's
    (block_size, hash_block_size), as EngineCore._initialize_kv_caches makes them. ``specs``: layer name ->
    KV-cache spec, as the model's layers give them (sliding-window, chunked-local, mamba layers: vLLM's hybrid
    grouping); without them every decoder layer gets :func:`kv_cache_spec`. Too little memory for
    max_model_len -> DiagError (vLLM's check). Pass a :func:`private_config`: vLLM may write into it."""
    from vllm.v1.core import kv_cache_utils as ku

    specs = specs or full_attention_kv_specs(vllm_config)
    try:
        _resolve_kv_cache_layout(vllm_config, list(specs.values()))
        if has("vllm.v1.core.kv_cache_planning:get_kv_cache_configs"):
            from vllm.v1.core import kv_cache_planning as kp

            groups = kp.get_global_kv_cache_groups(vllm_config, [specs])
            cfg = ku.generate_scheduler_kv_cache_config(kp.get_kv_cache_configs(vllm_config, [specs],
                                                                                 [memory_bytes], groups))
        elif hasattr(ku, "get_kv_cache_configs"):
            cfg = ku.generate_scheduler_kv_cache_config(ku.get_kv_cache_configs(vllm_config, [specs],
                                                                                [memory_bytes]))
        else:
            cfg = first("KV-cache sizing", "vllm.v1.core.kv_cache_utils:get_kv_cache_config")(
                vllm_config, specs, memory_bytes)
        _settle_block_size(cfg, vllm_config)
        block_size, hash_block_size = _engine_block_sizes(cfg, vllm_config)
    except ValueError as e:
        raise DiagError(f"vLLM's KV-cache sizing: {' '.join(str(e).split())}") from None
    kv_fields = fields("vllm.v1.kv_cache_interface:KVCacheConfig")
    if "hash_block_size" in kv_fields:  # EngineCore sets them on the scheduler's config
        cfg.hash_block_size = hash_block_size
    if "cache_hit_alignment_tokens" in kv_fields:
        cfg.cache_hit_alignment_tokens = ku.resolve_cache_hit_alignment_tokens(cfg, vllm_config, block_size,
                                                                               hash_block_size)
    return cfg, block_size, hash_block_size


def kv_cache_tokens(vllm_config, kv_cfg) -> int:
    """The tokens of context the KV cache holds by vLLM's group-aware count (sliding-window and chunked-local
    groups need fewer blocks per request): its max concurrency x max_model_len, what the engine logs as the
    "KV cache size" where its log takes that count; blocks x block size where this vLLM has no such count."""
    from vllm.v1.core import kv_cache_utils as ku

    if hasattr(ku, "get_kv_cache_capacity"):
        return ku.get_kv_cache_capacity(vllm_config, kv_cfg)[0]
    if hasattr(ku, "get_max_concurrency_for_kv_cache_config"):
        return int(ku.get_max_concurrency_for_kv_cache_config(vllm_config, kv_cfg)
                   * vllm_config.model_config.max_model_len)
    return kv_cfg.num_blocks * vllm_config.cache_config.block_size


def new_scheduler(cfg, kv_cfg, block_size: int, hash_block_size: int):
    """The scheduler class the engine core picks, built as the engine core builds it, on ``cfg`` (a
    :func:`private_config`: the engine writes num_gpu_blocks into it). Returns (scheduler, block hasher, note):
    the note says why the scheduler was built text-only, where vLLM could not build a multimodal model's processor
    (a folder without the processor's or the tokenizer's files)."""
    from vllm.v1.structured_output import StructuredOutputManager

    cfg.cache_config.num_gpu_blocks = kv_cfg.num_blocks
    cfg.model_config.skip_tokenizer_init = True  # no tokenizer files here; only grammar decoding needs one

    def build():
        return call("scheduler", scheduler_class(cfg), vllm_config=cfg, kv_cache_config=kv_cfg,
                    structured_output_manager=StructuredOutputManager(cfg),
                    include_finished_set=cfg.parallel_config.data_parallel_size > 1, log_stats=False,
                    block_size=block_size, hash_block_size=hash_block_size)

    note = None
    try:
        sched = build()
    except (OSError, ValueError) as e:  # a multimodal processor not buildable here: no processor or tokenizer files
        if not _text_only(cfg):
            raise
        sched = build()
        note = (f"scheduled text-only (no encoder cache): vLLM could not build the model's multimodal processor "
                f"({' '.join(str(e).split())[:120]}...); text prompts schedule the same")
    hasher = None
    if cfg.cache_config.enable_prefix_caching and has("vllm.v1.core.kv_cache_utils:get_request_block_hasher"):
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        fn = first("get_hash_fn_by_name", "vllm.utils.hashing:get_hash_fn_by_name",
                   "vllm.utils:get_hash_fn_by_name")(cfg.cache_config.prefix_caching_hash_algo)
        init_none_hash(fn)
        hasher = call("block hasher", get_request_block_hasher, hash_block_size, fn,
                      num_hash_lookahead_tokens=getattr(cfg, "num_hash_lookahead_tokens", 0))
    return sched, hasher, note


def _text_only(cfg) -> bool:
    """Put the private ``cfg`` in vLLM's text-only mode for a multimodal model (every modality's limit 0: what
    ``--language-model-only``, or ``--limit-mm-per-prompt`` with zeros before it, asks for), so that the scheduler
    sizes no encoder cache from the model's processor. False where the model takes no multimodal inputs."""
    mm = getattr(cfg.model_config, "multimodal_config", None)
    if mm is None or not getattr(cfg.model_config, "is_multimodal_model", False):
        return False
    mm = cfg.model_config.multimodal_config = copy.copy(mm)
    if hasattr(mm, "language_model_only"):
        mm.language_model_only = True
    else:
        mm.limit_per_prompt = dict.fromkeys((*mm.limit_per_prompt, "image", "video", "audio"), 0)
    return True


def new_request(req_id: str, prompt_token_ids: list[int], max_tokens: int, block_hasher, cache_salt: str):
    """A V1 Request that generates exactly ``max_tokens`` tokens (EOS ignored); ``cache_salt`` keeps its
    blocks apart from other requests' in the prefix cache."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    none = dict.fromkeys(("multi_modal_inputs", "multi_modal_kwargs", "multi_modal_hashes",
                          "multi_modal_placeholders", "pooling_params", "eos_token_id"))
    return call("Request", Request, request_id=req_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
                cache_salt=cache_salt, block_hasher=block_hasher, **none)


def batch_queue_size(vllm_config) -> int:
    """How many scheduled steps the engine core keeps in flight (with async scheduling 2: step k+1 is
    scheduled before step k's output is processed)."""
    if has("vllm.config:VllmConfig.max_concurrent_batches"):
        return vllm_config.max_concurrent_batches
    from vllm.v1.executor.abstract import Executor

    prop = inspect.getattr_static(Executor.get_class(vllm_config), "max_concurrent_batches")
    fn = getattr(prop, "fget", None) or prop.func  # a property, or a cached_property
    return fn(SimpleNamespace(parallel_config=vllm_config.parallel_config,
                              scheduler_config=vllm_config.scheduler_config))


def runner_output(req_ids: list[str], sampled: list[list[int]]):
    """The ModelRunnerOutput a worker returns for one step (sampled tokens only)."""
    from vllm.v1.outputs import ModelRunnerOutput

    index = {r: i for i, r in enumerate(req_ids)}
    field = getattr(ModelRunnerOutput, "__dataclass_fields__", {}).get("sampled_token_ids")
    if field is not None and "ndarray" in str(field.type):  # 0.11.2: one numpy array per request
        import numpy as np

        sampled = [np.array(t, dtype=np.int64) for t in sampled]
    return call("ModelRunnerOutput", ModelRunnerOutput, req_ids=req_ids, req_id_to_index=index,
                sampled_token_ids=sampled, spec_token_ids=None, logprobs=None, prompt_logprobs_dict={},
                pooler_output=[])
