"""Attention selection: the backend vLLM picks for each attention layer on the (real or what-if) GPU.

Two ways in, both vLLM's own. :func:`attention_backend_class` calls vLLM's selector with the resolved
config's values for the parameters the installed selector takes (the model's decoder attention as the
config describes it; for callers without a built model). :func:`layer_backends` reads the backend off
every layer of a built model, as vLLM's model runner does: each layer asked the selector in its
constructor with its own sinks, sliding window, MLA, sparse and attention-type arguments, and mamba /
DeltaNet layers name their own backend. Every era difference is detected by what the installed vLLM has.
"""
from __future__ import annotations

import copy
import functools
import inspect
import types

from .detect import first, has

_SELECTORS = ("vllm.v1.attention.selector", "vllm.attention.selector")


@functools.cache
def _selector_module():
    """The module holding vLLM's attention selector (moved from vllm.attention to vllm.v1.attention)."""
    import importlib

    for name in _SELECTORS:
        if has(f"{name}:get_attn_backend"):
            return importlib.import_module(name)
    first("vLLM's attention selector", *(f"{n}:get_attn_backend" for n in _SELECTORS))


def attention_backend_class(vllm_config):
    """The attention backend class vLLM's selector picks for this model's decoder attention on the (real or
    what-if) GPU, from the resolved config alone (a built model's layers: :func:`layer_backends`)."""
    from vllm.config import set_current_vllm_config

    mc, cache = vllm_config.model_config, vllm_config.cache_config
    values = {"head_size": mc.get_head_size(), "dtype": mc.dtype, "kv_cache_dtype": cache.cache_dtype,
              "block_size": cache.block_size, "is_attention_free": mc.is_attention_free, "use_mla": mc.use_mla}
    select = _selector_module().get_attn_backend
    params = inspect.signature(select).parameters
    with set_current_vllm_config(vllm_config):
        return select(**{k: v for k, v in values.items() if k in params})


def attention_backend(vllm_config) -> str:
    """The name of the backend :func:`attention_backend_class` picks (FlashAttention with its version)."""
    name = backend_name(attention_backend_class(vllm_config))
    if name.startswith("FLASH_ATTN"):
        version = first("vLLM's FlashAttention version helper",
                        "vllm.v1.attention.backends.fa_utils:get_flash_attn_version",
                        "vllm.attention.utils.fa_utils:get_flash_attn_version")
        name += f" (FlashAttention {version()})"
    return name


def fresh_attention_backend(vllm_config) -> str:
    """attention_backend() after clearing vLLM's selector cache (where it does not key on the backend asked for)."""
    cached = getattr(_selector_module(), "_cached_get_attn_backend", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
    return attention_backend(vllm_config)


# --- a built model's layers ----------------------------------------------------------------------

def _mamba_base():
    return first("vLLM's mamba layer base", "vllm.model_executor.layers.mamba.abstract:MambaBase")


def _mamba_backend(layer):
    """The backend vLLM's model runner uses for a mamba-type layer that does not name its own (0.10 line)."""
    if has("vllm.v1.attention.backends.mamba_selectors:get_mamba_attn_backend"):
        from vllm.v1.attention.backends.mamba_selectors import get_mamba_attn_backend

        return get_mamba_attn_backend(layer.mamba_type)
    return first("vLLM's Mamba2 attention backend", "vllm.v1.attention.backends.mamba_attn:Mamba2AttentionBackend")


def layer_backends(layers: dict) -> dict[str, type]:
    """Layer name -> the attention backend class vLLM's model runner uses for it, for every attention-like
    layer among ``layers`` (a built model's forward-context registry: name -> layer)."""
    out = {}
    for name, layer in layers.items():
        get = getattr(layer, "get_attn_backend", None)
        if callable(get):
            out[name] = get()
        elif isinstance(getattr(layer, "attn_backend", None), type):  # 0.10.0's Attention
            out[name] = layer.attn_backend
        elif isinstance(layer, _mamba_base()):
            out[name] = _mamba_backend(layer)
    return out


def attention_groups(layers: dict) -> dict[type, list[str]]:
    """Backend class -> its layer names, deduplicated by full class name as vLLM's model runner groups them."""
    by_name: dict[str, type] = {}
    groups: dict[str, list[str]] = {}
    for name, backend in layer_backends(layers).items():
        key = f"{backend.__module__}.{backend.__qualname__}"
        by_name.setdefault(key, backend)
        groups.setdefault(key, []).append(name)
    return {by_name[k]: v for k, v in groups.items()}


def layer_kv_cache_specs(vllm_config, layers: dict) -> dict:
    """Layer name -> the KV-cache spec vLLM gives it (layers sharing another layer's cache, and those
    without a KV cache, are left out): each layer's own get_kv_cache_spec where layers have it, else
    vLLM's model runner's get_kv_cache_spec run over ``layers`` (the 0.10 line built specs there)."""
    from vllm.config import set_current_vllm_config

    out = {}
    with set_current_vllm_config(vllm_config):
        for name, layer in layers.items():
            if getattr(layer, "kv_sharing_target_layer_name", None):
                continue
            get = getattr(layer, "get_kv_cache_spec", None)
            if callable(get) and (spec := get(vllm_config)) is not None:
                out[name] = spec
        if out or not layers:
            return out
        return _runner_kv_cache_specs(vllm_config, layers)


class _RunnerStandIn(types.SimpleNamespace):
    """What GPUModelRunner.get_kv_cache_spec reads off ``self``; the sub-configs the runner copies from its
    vllm_config in __init__ (speculative_config, parallel_config, ...) are read from that config."""

    def __getattr__(self, name):
        return getattr(self.__dict__["vllm_config"], name)


def _runner_kv_cache_specs(vllm_config, layers: dict) -> dict:
    """vLLM's GPUModelRunner.get_kv_cache_spec on a stand-in runner holding what that method reads."""
    runner = first("vLLM's GPU model runner", "vllm.v1.worker.gpu_model_runner:GPUModelRunner")
    from vllm.utils import STR_DTYPE_TO_TORCH_DTYPE

    mc, cache = vllm_config.model_config, vllm_config.cache_config
    cfg = copy.copy(vllm_config)
    cfg.compilation_config = copy.copy(vllm_config.compilation_config)
    cfg.compilation_config.static_forward_context = layers
    stand_in = _RunnerStandIn(
        vllm_config=cfg, model_config=mc, cache_config=cache, shared_kv_cache_layers={},
        kv_cache_dtype=mc.dtype if cache.cache_dtype == "auto" else STR_DTYPE_TO_TORCH_DTYPE[cache.cache_dtype],
        attention_chunk_size=getattr(mc, "attention_chunk_size", None))
    return runner.get_kv_cache_spec(stand_in)


def config_after_load(vllm_config, layers: dict):
    """A copy of ``vllm_config`` with the KV block size (and mamba page / block sizes) vLLM runs with once
    the model is loaded; ``vllm_config`` is left as resolved.

    Where vLLM's platform has ``update_block_size_for_backend`` (0.18 on), its executor calls it after
    loading the model: the attention backend's preferred block size, aligned with the mamba page size on
    hybrid models. Earlier releases settle these while resolving the config (the copy is unchanged)."""
    from vllm.platforms import current_platform

    cfg = copy.copy(vllm_config)
    cfg.cache_config = copy.copy(vllm_config.cache_config)
    update = getattr(current_platform, "update_block_size_for_backend", None)
    if update is not None:
        cfg.compilation_config = copy.copy(vllm_config.compilation_config)
        cfg.compilation_config.static_forward_context = layers
        update(cfg)
        cfg.compilation_config = vllm_config.compilation_config
    return cfg


def block_size_set_after_load() -> bool:
    """Whether the installed vLLM settles the KV block size after loading the model (see config_after_load)."""
    from vllm.platforms import current_platform

    return hasattr(current_platform, "update_block_size_for_backend")


# --- what a backend class says about itself ------------------------------------------------------

def cudagraph_support(backend, vllm_config, kv_cache_spec) -> str:
    """The CUDA-graph support vLLM's metadata builder of ``backend`` declares (ALWAYS, UNIFORM_BATCH,
    UNIFORM_SINGLE_TOKEN_DECODE, NEVER), asked the way the installed vLLM's model runner asks it."""
    builder = backend.get_builder_cls()
    if hasattr(builder, "get_cudagraph_support"):
        return builder.get_cudagraph_support(vllm_config, kv_cache_spec).name
    if hasattr(builder, "cudagraph_support"):
        return builder.cudagraph_support.name
    return "ALWAYS" if getattr(builder, "full_cudagraph_supported", False) else "NEVER"


def metadata_builder(backend, kv_cache_spec, layer_names: list[str], vllm_config, device=None):
    """vLLM's metadata builder for ``backend`` constructed as the model runner constructs it (on a what-if
    GPU its buffers land on the meta device). Call with the model's layers registered in the config."""
    import torch
    from vllm.config import set_current_vllm_config

    cls = backend.get_builder_cls()
    params = inspect.signature(cls.__init__).parameters
    values = {"kv_cache_spec": kv_cache_spec, "layer_names": layer_names, "vllm_config": vllm_config,
              "device": torch.device("cuda", 0) if device is None else device}
    with set_current_vllm_config(vllm_config):
        return cls(**{k: v for k, v in values.items() if k in params})


def backend_traits(backend, builder=None) -> dict:
    """What vLLM's backend and metadata builder (an instance from :func:`metadata_builder`, else the class)
    declare that shapes token boundaries: the query length up to which a request takes the decode path
    (reorder_batch_threshold), the query lengths its decode kernel takes, the kernel block sizes it
    supports, and whether it is a state-space (mamba) backend. Call under the scenario's config."""
    builder = builder if builder is not None else backend.get_builder_cls()
    sizes = _declared(backend, "get_supported_kernel_block_sizes")
    is_ssm = _declared(backend, "is_ssm")
    qls = getattr(builder, "query_len_support", None)
    return {"backend": backend_name(backend),
            "builder": builder.__name__ if isinstance(builder, type) else type(builder).__name__,
            "decode_threshold": getattr(builder, "reorder_batch_threshold", None),
            "decode_query_len": getattr(qls, "name", None),
            "kernel_block_sizes": [s if isinstance(s, int) else f"multiple of {s.base}" for s in sizes]
            if sizes is not None else None,
            "ssm": bool(is_ssm) if is_ssm is not None else None}


def backend_name(backend) -> str:
    """The name vLLM's attention backend class gives itself (its class name where it gives none)."""
    return _declared(backend, "get_name") or backend.__name__


def _declared(backend, method: str):
    """What ``backend.method()`` answers, None where the class does not have it or leaves it abstract (the
    state-space backends of some releases inherit get_name from the base class, which raises)."""
    fn = getattr(backend, method, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except NotImplementedError:
        return None


def flash_attn_version(layer) -> int | None:
    """The FlashAttention version vLLM's FlashAttention implementation of ``layer`` chose (None: not FA)."""
    return getattr(getattr(layer, "impl", None), "vllm_flash_attn_version", None)
