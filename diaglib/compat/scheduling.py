"""Scheduler and KV-cache sizing: vLLM's V1 scheduler, its requests and outputs, built as the engine core builds them."""
from __future__ import annotations

import copy
import inspect

from ..errors import DiagError
from .detect import _legacy


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


def batch_queue_size(vllm_config) -> int:
    """How many scheduled steps the engine core keeps in flight: its executor's max_concurrent_batches
    (0.20.2 with async scheduling: 2, so step k+1 is scheduled before step k's output is processed)."""
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
