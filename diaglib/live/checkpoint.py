"""A small real checkpoint in the GLM-4.6 layout (Glm4MoeForCausalLM), so that tests go through vLLM's real
weight-loading path: config.json plus model.safetensors, bf16 or compressed-tensors FP8 (static per-channel
weights, dynamic per-token activations, as GLM-4.6-FP8 ships).

``python -m diaglib.live.checkpoint DIR`` writes the FP8 one (the rehearsal scenario's model) into DIR."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DiagError

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class TinyGlm:
    """Sizes of the small model (GLM-4.6's structure: dense first layers, then MoE with a shared expert)."""

    layers: int = 4
    first_dense: int = 1
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 1024
    moe_intermediate: int = 256
    experts: int = 16
    topk: int = 4
    vocab: int = 4096


def config_dict(t: TinyGlm, fp8: bool) -> dict:
    """config.json for the small model, with GLM-4.6-FP8's quantization config when ``fp8``."""
    if t.first_dense >= t.layers or t.topk > t.experts or t.heads % t.kv_heads:
        raise DiagError(f"inconsistent small-model sizes: {asdict(t)}")
    cfg = {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True,
        "attention_dropout": 0.0, "head_dim": t.head_dim, "hidden_act": "silu", "hidden_size": t.hidden,
        "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": t.intermediate,
        "max_position_embeddings": 32768, "moe_intermediate_size": t.moe_intermediate, "norm_topk_prob": True,
        "num_attention_heads": t.heads, "n_group": 1, "topk_group": 1, "n_routed_experts": t.experts,
        "n_shared_experts": 1, "routed_scaling_factor": 2.5, "num_experts_per_tok": t.topk,
        "first_k_dense_replace": t.first_dense, "num_hidden_layers": t.layers, "num_key_value_heads": t.kv_heads,
        "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 1000000, "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_qk_norm": False,
        "vocab_size": t.vocab, "pad_token_id": 0, "eos_token_id": [1],
    }
    if fp8:
        group = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "actorder": None,
                 "block_structure": None, "observer_kwargs": {}}
        cfg["quantization_config"] = {
            "config_groups": {"group_0": {
                "input_activations": {**group, "dynamic": True, "strategy": "token", "observer": None},
                "output_activations": None, "targets": ["Linear"],
                "weights": {**group, "dynamic": False, "strategy": "channel", "observer": "minmax"}}},
            "format": "float-quantized", "global_compression_ratio": None,
            "ignore": ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in range(t.first_dense, t.layers)],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}
    return cfg


def tensors(t: TinyGlm, fp8: bool, seed: int = 0) -> dict:
    """The checkpoint's tensors by name (random, scaled like an initialised model)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out: dict = {}

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def linear(name, n_out, n_in, bias=False):
        w = rand(n_out, n_in)
        if fp8:
            scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
            out[f"{name}.weight"] = (w.float() / scale).to(torch.float8_e4m3fn)
            out[f"{name}.weight_scale"] = scale
        else:
            out[f"{name}.weight"] = w
        if bias:
            out[f"{name}.bias"] = rand(n_out)

    def mlp(prefix, inter):
        linear(f"{prefix}.gate_proj", inter, t.hidden)
        linear(f"{prefix}.up_proj", inter, t.hidden)
        linear(f"{prefix}.down_proj", t.hidden, inter)

    out["model.embed_tokens.weight"] = rand(t.vocab, t.hidden, std=1.0)
    for i in range(t.layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = torch.ones(t.hidden, dtype=torch.bfloat16)
        out[f"{p}.post_attention_layernorm.weight"] = torch.ones(t.hidden, dtype=torch.bfloat16)
        linear(f"{p}.self_attn.q_proj", t.heads * t.head_dim, t.hidden, bias=True)
        linear(f"{p}.self_attn.k_proj", t.kv_heads * t.head_dim, t.hidden, bias=True)
        linear(f"{p}.self_attn.v_proj", t.kv_heads * t.head_dim, t.hidden, bias=True)
        linear(f"{p}.self_attn.o_proj", t.hidden, t.heads * t.head_dim)
        if i < t.first_dense:
            mlp(f"{p}.mlp", t.intermediate)
            continue
        out[f"{p}.mlp.gate.weight"] = rand(t.experts, t.hidden)
        out[f"{p}.mlp.gate.e_score_correction_bias"] = torch.zeros(t.experts, dtype=torch.float32)
        for e in range(t.experts):
            mlp(f"{p}.mlp.experts.{e}", t.moe_intermediate)
        mlp(f"{p}.mlp.shared_experts", t.moe_intermediate)
    out["model.norm.weight"] = torch.ones(t.hidden, dtype=torch.bfloat16)
    out["lm_head.weight"] = rand(t.vocab, t.hidden)
    return out


def write_checkpoint(out_dir: str | Path, sizes: TinyGlm | None = None, *, fp8: bool = True, seed: int = 0) -> Path:
    """Write config.json and model.safetensors of a small GLM-4.6-layout model into ``out_dir``."""
    from safetensors.torch import save_file

    t = sizes or TinyGlm()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_dict(t, fp8)
    save_file({k: v.contiguous() for k, v in tensors(t, fp8, seed).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}) + "\n")
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m diaglib.live.checkpoint DIR")
    print(write_checkpoint(sys.argv[1]))
