"""Attention selection: the backend vLLM's selector picks on the (real or what-if) GPU."""
from __future__ import annotations

from .detect import _legacy


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


def fresh_attention_backend(vllm_config) -> str:
    """attention_backend() after clearing vLLM's selector cache (it does not key on VLLM_ATTENTION_BACKEND)."""
    if _legacy():
        from vllm.attention.selector import _cached_get_attn_backend

        _cached_get_attn_backend.cache_clear()
    return attention_backend(vllm_config)
