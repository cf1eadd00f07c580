"""The memory layout: exact weights from vLLM's meta-device model, KV sizing from vLLM, estimates labelled."""
from __future__ import annotations

import json

import moe_models
import pytest

from diaglib import compat
from diaglib.paths import DATA
from diaglib.predict import layers, memory, moe

pytestmark = pytest.mark.contract


@pytest.fixture(scope="module")
def weights(scenario):
    return memory.weights_by_component(scenario).set_index("component")


def test_weights_are_every_parameter_and_buffer_of_vllms_model(scenario, weights):
    model = layers.build_model(scenario)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory.weights_total_bytes(scenario) == total == weights["bytes"].sum()
    assert "other" not in weights.index  # every GLM-4.6 parameter has a named component
    assert all(memory.component_of(n) != "other" for n, _ in model.named_parameters())


def test_routed_experts_match_the_fused_moe_layers(scenario, weights):
    hf, tp = scenario.hf_config, scenario.vllm_config.parallel_config.tensor_parallel_size
    # the router's e_score_correction_bias is shared with FusedMoE; vLLM's model lists it under the gate
    per_layer = sum(p.numel() * p.element_size() for n, p in layers.build_moe_layer(scenario).named_parameters()
                    if n.startswith(("w13_", "w2_")))
    n_moe = hf.num_hidden_layers - hf.first_k_dense_replace
    assert weights.loc["MoE routed experts", "bytes"] == n_moe * per_layer
    fp8 = n_moe * hf.n_routed_experts * 3 * hf.moe_intermediate_size // tp * hf.hidden_size  # w13 + w2, 1 B each
    assert fp8 == 89 * 160 * 3 * 192 * 5120
    assert weights.loc["MoE routed experts", "bytes"] > fp8  # plus the fp32 per-channel scales


def test_tp_shards_what_vllm_shards(scenario, weights):
    tp4_sc = scenario.derive("-tp", "4")
    tp4 = memory.weights_by_component(tp4_sc).set_index("component")
    assert tp4.loc["norms", "bytes"] == weights.loc["norms", "bytes"]  # replicated
    assert tp4.loc["MoE router", "bytes"] == weights.loc["MoE router", "bytes"]
    p8 = dict(layers.build_model(scenario).named_parameters())
    p4 = dict(layers.build_model(tp4_sc).named_parameters())
    sharded = ("w13_weight", "w2_weight", "embed_tokens.weight", "lm_head.weight", "gate_up_proj.weight",
               "down_proj.weight", "qkv_proj.weight", "o_proj.weight")
    for name, p in p8.items():
        if name.endswith(sharded):
            assert p4[name].numel() == 2 * p.numel(), name


def test_rank_equivalent_standin_at_tp1_has_the_same_weights(scenario, weights, tmp_path):
    """What the GPU engineer compares with vLLM's log on the H200: the one-rank stand-in at TP 1."""
    from diaglib.live.standin import write_standin
    from diaglib.scenario import load

    tp = scenario.vllm_config.parallel_config.tensor_parallel_size
    out = write_standin(scenario.model_dir, tp, tmp_path / "standin")
    sc1 = load(cmd=f"vllm serve {out} -tp 1 --max-model-len 8192", gpu="NVIDIA H200", gpu_count=1)
    standin = memory.weights_by_component(sc1).set_index("component")
    for c in weights.index:
        if c.startswith("buffers"):  # the rotary cache is sized by max_model_len
            continue
        assert standin.loc[c, "bytes"] == weights.loc[c, "bytes"], c


def test_kv_bytes_per_token_is_vllms_spec(scenario):
    mc, pc = scenario.vllm_config.model_config, scenario.vllm_config.parallel_config
    derived = 2 * mc.get_num_kv_heads(pc) * mc.get_head_size() * 2 * mc.get_num_layers(pc)  # K+V, bf16
    assert memory.kv_bytes_per_token(scenario) == derived == 47_104  # vllm-facts.md


@pytest.mark.parametrize("name", ["DeepSeek-V3", "Mixtral-8x22B-Instruct-v0.1"])
def test_kv_bytes_per_token_are_the_meta_models_layer_specs(name):
    """What the KV sizing counts per token equals the KV-cache specs vLLM's own attention layers give on the
    meta model (MLA: one latent vector, no separate V; the rest: K and V)."""
    from diaglib.predict import architecture

    sc = moe_models.zoo(name, moe_models.GPUS[0])
    try:
        kinds = architecture.attention_kinds(sc)
    except (ImportError, AttributeError, TypeError) as e:
        pytest.skip(f"diaglib cannot read vLLM {compat.installed()}'s layer specs here: {e}")
    per_token = sum(k["page_size_bytes"] // k["block_size"] * k["layers"] for k in kinds)
    assert memory.kv_bytes_per_token(sc) == per_token


def test_budget_adds_up_and_labels_estimates(scenario):
    b = memory.budget(scenario).set_index("item")
    usable = b.loc["usable (x gpu_memory_utilization)", "bytes"]
    parts = ["weights", "activation peak (profile run)", "non-torch (NCCL, cuBLAS, context)", "KV cache"]
    assert sum(b.loc[p, "bytes"] for p in parts) == usable
    assert b.loc["weights", "kind"] == "exact"
    assert b.loc["activation peak (profile run)", "kind"] == "estimate"
    kv_cfg, block_size, _ = compat.kv_cache_config(scenario.vllm_config, int(b.loc["KV cache", "bytes"]))
    assert f"{kv_cfg.num_blocks} blocks of {block_size} tokens" in b.loc["KV cache", "how"]


def test_largest_intermediate_against_int32(scenario):
    info = memory.layout(scenario)
    li = info["largest_intermediate"]
    assert li["numel"] == 335_544_320 and not li["over_int32"]
    big = memory.layout(scenario.derive("--max-num-batched-tokens", "60000"))["largest_intermediate"]
    assert big["over_int32"] and big["numel"] > moe.INT32_MAX
    assert "Largest intermediate" in memory.format_text(info)


def test_cli_memory_json(scenario, scenario_name, capsys):
    import json

    from diaglib.cli import main

    assert main(["memory", scenario_name, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    weights = next(r for r in out["budget"] if r["item"] == "weights")
    assert weights["bytes"] == memory.weights_total_bytes(scenario)
    assert out["largest_intermediate"]["numel"] == 335_544_320


def test_cli_memory_bad_gpu_exits_2(scenario_name, capsys):
    from diaglib.cli import main

    assert main(["memory", scenario_name, "--gpu", "NVIDIA Z100"]) == 2
    assert "unknown GPU 'NVIDIA Z100'" in capsys.readouterr().err


def test_dense_model_memory_answers(dense):
    info = memory.layout(dense)
    w = info["weights"].set_index("component")
    assert not any(c.startswith("MoE") for c in w.index) and "other" not in w.index
    assert memory.weights_total_bytes(dense) == sum(p.numel() * p.element_size()
                                                    for p in layers.build_model(dense).parameters()) + \
        sum(b.numel() * b.element_size() for b in layers.build_model(dense).buffers())
    assert not info["buffers"]["buffer"].str.startswith("MoE").any()
    assert "MoE" not in memory.activation_peak_estimate(dense)[1]
    # the profile run's largest transients: the MLP's gate/up output (vLLM's layer, this rank) and the activation
    gate_up = next(m for n, m in layers.build_model(dense).named_modules() if n.endswith("mlp.gate_up_proj"))
    buf = info["buffers"].set_index("buffer")
    tokens = dense.vllm_config.scheduler_config.max_num_batched_tokens
    assert buf.loc["MLP gate/up out", "shape"] == (tokens, gate_up.output_size_per_partition)
    assert buf.loc["MLP activation out", "shape"] == (tokens, gate_up.output_size_per_partition // 2)
    assert {"MLP gate/up out", "MLP activation out"} <= set(memory.activation_peak_estimate(dense)[1].split(" + "))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return moe_models.dense(tmp_path_factory)


@pytest.mark.parametrize("name", list(moe_models.MOE_ZOO))
@pytest.mark.parametrize("gpu", moe_models.GPUS, ids=lambda g: g.split()[1])
def test_zoo_weights_are_vllms_meta_model(name, gpu):
    """weights_total_bytes (what the scheduler's KV sizing can take) is every parameter and buffer of vLLM's model."""
    sc = moe_models.zoo(name, gpu)
    moe_models.moe_layer(sc)  # skips where this vLLM cannot build the model here
    model = layers.build_model(sc)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    w = memory.weights_by_component(sc).set_index("component")
    assert memory.weights_total_bytes(sc) == total == w["bytes"].sum()
    moe_layers = [m for _, m in layers.moe_layers(sc)]
    elsewhere = {id(p) for m in model.modules() if all(m is not x for x in moe_layers)
                 for p in m.parameters(recurse=False)}  # e.g. a router bias vLLM registers on the gate too
    assert w.loc["MoE routed experts", "bytes"] == sum(p.numel() * p.element_size() for m in moe_layers
                                                       for p in m.parameters(recurse=False) if id(p) not in elsewhere)


def test_the_kv_row_of_a_sliding_window_model_names_its_kv_cache_groups():
    """gemma-3: the KV row counts the layers of each spec kind vLLM's model gives (sliding-window and global)
    in vLLM's KV-cache groups."""
    from collections import Counter

    from diaglib.predict.schedule import kv_specs
    from diaglib.scenario import load

    sc = load(cmd="vllm serve data/models/gemma-3-27b-it --max-num-batched-tokens 8192", gpu="NVIDIA H200",
              gpu_count=1)
    how = memory.budget(sc).set_index("item").loc["KV cache", "how"]
    kinds = Counter(type(s).__name__ for s in kv_specs(sc).values())
    assert set(kinds) == {"SlidingWindowSpec", "FullAttentionSpec"}
    for kind, n in kinds.items():
        assert f"{n} layers of {kind} in " in how


@pytest.fixture(scope="module")
def mtp_pair(tmp_path_factory):
    """A small DeepSeek-V3 (its config.json shrunk: MLA, MoE, one MTP layer) with and without its MTP draft."""
    from diaglib.errors import DiagError
    from diaglib.scenario import load

    cfg = json.loads((DATA / "models" / "DeepSeek-V3" / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
               first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
               num_attention_heads=2, num_key_value_heads=2, q_lora_rank=64, vocab_size=1024, num_nextn_predict_layers=1)
    d = tmp_path_factory.mktemp("models") / "small-deepseek-v3"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    cmd = f"vllm serve {d} --max-model-len 4096 --max-num-batched-tokens 1024"
    plain = load(cmd=cmd, gpu="NVIDIA H200", gpu_count=1)
    for method in ("mtp", "deepseek_mtp"):  # the method's name as this release spells it
        try:
            return plain, load(cmd=cmd + f""" --speculative-config '{{"method":"{method}","num_speculative_tokens":1}}'""",
                               gpu="NVIDIA H200", gpu_count=1), cfg
        except DiagError as e:
            why = e
    pytest.skip(f"this vLLM refuses the MTP draft: {why}")


def test_mtp_draft_weights_and_kv_are_vllms_draft_model(mtp_pair):
    """--speculative-config with an MTP draft: the weights add the draft model vLLM's proposer builds (its own
    tensors; the embedding it shares with the target counted once), and vLLM's KV sizing gets the draft's
    attention layer too (one more layer per MTP layer of the checkpoint)."""
    from diaglib.predict.schedule import kv_specs

    plain, spec, cfg = mtp_pair
    target = layers.build_model(spec)
    draft, _ = layers.build_draft(spec)
    assert layers.build_draft(plain) is None
    assert draft.model.embed_tokens is target.model.embed_tokens  # vLLM's proposer shared it
    ids = {id(t) for t in (*target.parameters(), *target.buffers())}
    own = {id(t): t for t in (*draft.parameters(), *draft.buffers()) if id(t) not in ids}
    own_bytes = sum(t.numel() * t.element_size() for t in own.values())
    w = memory.weights_by_component(spec).set_index("component")
    row = f"{memory.DRAFT} ({type(draft).__name__})"
    assert w.loc[row, "bytes"] == own_bytes > 0
    assert memory.weights_total_bytes(spec) == memory.weights_total_bytes(plain) + own_bytes
    assert row in memory.budget(spec).set_index("item").loc["weights", "how"]
    assert len(kv_specs(spec)) == len(kv_specs(plain)) + cfg["num_nextn_predict_layers"]
    assert len(kv_specs(plain)) == cfg["num_hidden_layers"]
    per_layer = memory.kv_bytes_per_token(plain) // cfg["num_hidden_layers"]
    assert memory.kv_bytes_per_token(spec) == memory.kv_bytes_per_token(plain) + per_layer
