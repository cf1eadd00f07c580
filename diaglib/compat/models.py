"""Model building and MoE layers: vLLM's model on the meta device, its MoE quant methods, experts and workspaces."""
from __future__ import annotations

import dataclasses

from .detect import _legacy


def set_default_torch_dtype(dtype):
    """vLLM's context manager that makes ``dtype`` torch's default while a model is built."""
    try:
        from vllm.utils.torch_utils import set_default_torch_dtype as ctx
    except ImportError:
        from vllm.model_executor.model_loader.utils import (
            set_default_torch_dtype as ctx,
        )
    return ctx(dtype)


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
