"""vLLM's layers built on the meta device for one TP rank: shapes and kernels as vLLM itself chooses them."""
from __future__ import annotations

import json

import pytest
import torch

from diaglib import compat
from diaglib.predict import layers

pytestmark = pytest.mark.contract


def test_moe_layer_is_vllms_fused_moe_with_rank_shapes(scenario):
    hf, tp = scenario.hf_config, scenario.vllm_config.parallel_config.tensor_parallel_size
    layer = layers.build_moe_layer(scenario)
    assert isinstance(layer, compat.moe_layer_class())  # FusedMoE, or the RoutedExperts it holds (0.33+)
    assert layer.w13_weight.device.type == "meta"
    # GLM-4.6: the seed's shapes at TP 8 (vllm-facts.md), which follow from the HF config and TP.
    assert tuple(layer.w13_weight.shape) == (hf.n_routed_experts, 2 * hf.moe_intermediate_size // tp,
                                             hf.hidden_size) == (160, 384, 5120)
    assert tuple(layer.w2_weight.shape) == (hf.n_routed_experts, hf.hidden_size,
                                            hf.moe_intermediate_size // tp) == (160, 5120, 192)
    assert layer.w13_weight.dtype == torch.float8_e4m3fn
    assert tuple(layer.w13_weight_scale.shape) == (160, 384, 1)  # per-channel scales


def test_model_is_cached_and_holds_every_decoder_layer(scenario):
    model = layers.build_model(scenario)
    assert layers.build_model(scenario) is model
    hf = scenario.hf_config
    names = [n for n, _ in layers.moe_layers(scenario)]
    assert len(names) == hf.num_hidden_layers - hf.first_k_dense_replace
    assert names[0].startswith(f"model.layers.{hf.first_k_dense_replace}.mlp.experts")


def test_building_leaves_the_scenario_config_untouched_and_can_repeat(scenario):
    cc = scenario.vllm_config.compilation_config
    before = dict(cc.static_forward_context)
    layers._models.clear()  # rebuild: a second construction on the same config must not collide
    model = layers.build_model(scenario)
    assert dict(cc.static_forward_context) == before
    assert layers.build_model(scenario) is model


def test_parallel_groups_are_restored_after_building(scenario):
    from vllm.distributed import parallel_state as ps

    before = ps._TP
    with layers.rank0(scenario):
        assert ps.get_tensor_model_parallel_world_size() == 8
        assert ps.get_tensor_model_parallel_rank() == 0
    assert ps._TP is before


def test_moe_backend_is_cutlass_fp8_as_vllms_method_says(scenario):
    b = layers.moe_backend(scenario)
    qm = layers.build_moe_layer(scenario).quant_method
    assert b["method"] == type(qm).__name__ == "CompressedTensorsW8A8Fp8MoEMethod"
    if hasattr(qm, "use_cutlass"):  # the 0.10 line's method
        assert qm.use_cutlass and not qm.use_marlin
        assert b["backend"] == "CUTLASS FP8 (cutlass_moe_fp8)"
    else:
        assert qm.fp8_backend.name == "VLLM_CUTLASS"
        assert b["backend"].startswith("VLLM_CUTLASS")
        assert b["experts"] == f"{qm.experts_cls.__name__} -> CutlassExpertsFp8"
    assert b["w13_weight"] == [160, 384, 5120] and b["w2_weight"] == [160, 5120, 192]


def test_tp_changes_the_rank_shapes(scenario):
    tp4 = scenario.derive("-tp", "4")
    b = layers.moe_backend(tp4)
    assert b["w13_weight"] == [160, 2 * scenario.hf_config.moe_intermediate_size // 4, 5120]


def test_dense_model_has_no_moe(tmp_path):
    from diaglib.scenario import load

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
           "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4,
           "num_hidden_layers": 2, "vocab_size": 1024, "max_position_embeddings": 2048,
           "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sc = load(cmd=f"vllm serve {tmp_path} --max-model-len 2048", gpu="NVIDIA H200", gpu_count=1)
    assert layers.moe_backend(sc) is None
    assert layers.build_moe_layer(sc) is None
    assert sum(p.numel() for p in layers.build_model(sc).parameters()) > 0


@pytest.mark.parametrize("tokens", [1, 8192])
def test_selected_experts_match_vllms_own_choice(scenario, tokens):
    layer = layers.build_moe_layer(scenario)
    with layers.rank0(scenario):
        experts = compat.moe_experts(layer, tokens)
    assert type(experts).__name__ == "CutlassExpertsFp8"  # sm90: no small-batch Triton fallback


def test_registered_holds_the_meta_models_layers_and_restores_the_config(scenario):
    cc = scenario.vllm_config.compilation_config
    before = cc.static_forward_context
    ctx = layers.forward_context(scenario)
    with layers.registered(scenario) as registry:
        assert cc.static_forward_context is registry is ctx
    assert cc.static_forward_context is before
    assert all(n in dict(layers.build_model(scenario).named_modules()) for n in ctx)


def test_expert_parallel_builds_with_vllms_expert_map(scenario):
    """EP: vLLM computes the expert map while building and reads it back (logs it, builds routing tables);
    its values are real and give each rank its share of the experts."""
    ep = scenario.derive("--enable-expert-parallel")
    layer = layers.build_moe_layer(ep)
    from diaglib.compat.moe import moe_config

    ep_size = moe_config(layer).moe_parallel_config.ep_size
    assert layer.local_num_experts * ep_size == layer.global_num_experts == scenario.hf_config.n_routed_experts
    emap = getattr(layer, "_expert_map", None)
    emap = emap if emap is not None else layer.expert_map
    assert emap.device.type == "cpu" and int((emap >= 0).sum()) == layer.local_num_experts
    assert layer.w13_weight.device.type == "meta" and layer.w13_weight.shape[0] == layer.local_num_experts
