"""Model building: the context vLLM's loader builds a model in (torch's default dtype).

MoE layers and kernels live in :mod:`.moe`.
"""
from __future__ import annotations

from .detect import first


def set_default_torch_dtype(dtype):
    """vLLM's context manager that makes ``dtype`` torch's default while a model is built
    (vllm.utils.torch_utils from 0.11; vllm.model_executor.model_loader.utils before)."""
    return first("set_default_torch_dtype", "vllm.utils.torch_utils:set_default_torch_dtype",
                 "vllm.model_executor.model_loader.utils:set_default_torch_dtype")(dtype)
