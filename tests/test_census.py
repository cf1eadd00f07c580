"""The kernel census checked against vLLM's own objects: its model's layers, its MoE sizing, its config."""
from __future__ import annotations

import json

import pytest

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.predict import census, layers, moe

pytestmark = pytest.mark.contract

ZOO = {  # architecture kind -> (serve command, GPU, GPU count)
    "moe": ("vllm serve data/models/tiny-glm-fp8 --enable-chunked-prefill --max-num-batched-tokens 8192",
            "NVIDIA H200", 1),
    "dense": ("vllm serve data/models/Llama-3.1-8B-Instruct --max-num-batched-tokens 131072", "NVIDIA H200", 1),
    "mla": ("vllm serve data/models/DeepSeek-V3 -tp 8 --max-num-batched-tokens 16384", "NVIDIA H200", 8),
    "hybrid": ("vllm serve data/models/Qwen3-Next-80B-A3B-Thinking -tp 4 --max-num-batched-tokens 16384",
               "NVIDIA H200", 4),
}


def _buildable(sc):
    """Skip (naming vLLM's reason) where vLLM's model itself cannot be built on the meta device here."""
    try:
        layers.build_model(sc)
    except Exception as e:  # noqa: BLE001 - the what-if layer does not cover this architecture yet
        pytest.skip(f"{sc.hf_config.architectures[0]}: vLLM's model is not built on meta here: "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo(request):
    from diaglib.scenario import load

    cmd, gpu, count = ZOO[request.param]
    try:
        sc = load(cmd=cmd, gpu=gpu, gpu_count=count)
    except DiagError as e:
        pytest.skip(f"{request.param}: {e}")
    _buildable(sc)
    return sc


@pytest.fixture(scope="module")
def dense():
    from diaglib.scenario import load

    cmd, gpu, count = ZOO["dense"]
    sc = load(cmd=cmd, gpu=gpu, gpu_count=count)
    return sc


def _needs(what: str, fn):
    """Another analyzer's answer (MoE sizing, dispatch), or a skip naming the vLLM API it does not find here."""
    try:
        return fn()
    except (ImportError, AttributeError) as e:
        pytest.skip(f"{what} is not answered under vLLM {compat.installed()} yet: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:140]}")


def _outputs(p: census.Pass) -> dict:
    out = {}
    for name, cls, shapes in p.outputs:
        out.setdefault(name, (cls, shapes))
    return out


def test_every_linear_layer_outputs_tokens_by_its_output_size_per_rank(zoo):
    _linear_outputs_are_tokens_by_output_size(zoo)


def _linear_outputs_are_tokens_by_output_size(zoo):
    """Every linear layer the pass ran outputs N x (its output size per rank)."""
    from vllm.model_executor.layers.linear import LinearBase

    step = census.prefill(4096)
    p = census.record(zoo, step)
    assert p.stopped is None, p.stopped
    seen = _outputs(p)
    aliases: dict = {}
    for n, m in layers.build_model(zoo).named_modules(remove_duplicate=False):
        if isinstance(m, LinearBase):
            aliases.setdefault(id(m), (m, []))[1].append(n)
    assert aliases
    checked = 0
    for m, names in aliases.values():
        name = next((n for n in names if n in seen), None)
        if name is None:
            continue
        checked += 1
        width = getattr(m, "output_size_per_partition", None) or m.output_size  # a replicated router: its size
        assert seen[name][1][0] == (p.padded, width), name
    assert checked >= 0.9 * len(aliases), f"{checked} of {len(aliases)} linear layers ran"


def test_logits_are_requests_by_vocab_per_rank(zoo):
    lm = layers.build_model(zoo).lm_head
    for step in (census.prefill(4096, 3), census.decode(64)):
        p = census.record(zoo, step)
        assert p.stopped is None, p.stopped
        logits = [r for r in p.ops if r.phase == "logits" and r.op == "aten::linear"]
        assert [tuple(t.shape) for role, t in logits[0].tensors if role == "out"] == \
               [(step.reqs, lm.num_embeddings_per_partition)]
        shapes = _outputs(p)["logits_processor"][1]
        assert shapes[0] == (step.reqs, zoo.vllm_config.model_config.get_vocab_size())


def test_moe_tensors_are_the_ones_moe_buffers_sizes(zoo):
    first = _needs("diaglib's MoE analysis", lambda: layers.moe_layers(zoo))
    if not first:
        pytest.skip("no MoE layers")
    name = first[0][0]
    for n in (1024, 8192):
        ops = census.ops(zoo, census.prefill(n))
        opaque = ops[ops["module"].str.startswith(name) & ops["note"].fillna("").str.startswith("inner kernels not")]
        if len(opaque):  # the census says why it could not look inside (e.g. a FlashInfer JIT module)
            pytest.skip(f"{opaque.iloc[0]['op']}: {opaque.iloc[0]['note'][:160]}")
        tt = census.tensors(zoo, census.prefill(n))
        parent = name.rsplit(".", 1)[0]  # the op may run in the module that holds the experts (0.33's RoutedExperts)
        mine = tt[tt["module"].str.startswith(name) | (tt["module"] == parent)]
        have = set(zip(mine["shape"], mine["dtype"]))
        buf = moe.buffers(zoo, n)
        path = moe.selected(zoo, n)[1]
        rows = buf[buf["path"].isin([path, "input"])]
        assert len(rows) > 2
        for r in rows.itertuples():  # the same tensor: shape and dtype, or the same elements in another view
            assert (r.shape, r.dtype) in have or any(d == r.dtype and _numel(s) == r.numel for s, d in have), \
                (n, r.buffer, r.shape, r.dtype)


def _numel(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def test_moe_crossing_is_the_permuted_activation_of_moe_buffers(zoo):
    if not _needs("diaglib's MoE analysis", lambda: layers.moe_layers(zoo)):
        pytest.skip("no MoE layers")
    th = census.thresholds(zoo, "prefill")
    moe_th = moe.int32_thresholds(zoo).dropna(subset=["tokens"])
    path = moe.selected(zoo, zoo.vllm_config.scheduler_config.max_num_batched_tokens)[1]
    selected = moe_th[moe_th["path"] == path]
    mine = th[th["module"].str.contains("experts") & th["tokens"].notna()]
    if len(selected):
        assert int(selected["tokens"].min()) in set(mine["tokens"].astype(int))


def test_profile_run_is_vllms_dummy_batch_and_sampler(zoo):
    sch = zoo.vllm_config.scheduler_config
    step = census.profile(zoo)
    assert step.tokens == sch.max_num_batched_tokens
    assert step.reqs == min(sch.max_num_batched_tokens, sch.max_num_seqs)
    p = census.record(zoo, step)
    assert p.stopped is None, p.stopped
    assert any(r.phase == "sampler" for r in p.ops)
    attn = [r for r in p.ops if r.op.endswith("attention_with_output") and r.root is None]
    assert attn and all(r.phase == "model" for r in attn)


def test_decode_and_mixed_steps_run(zoo):
    for step in (census.decode(32), census.mixed(2048, 8)):
        p = census.record(zoo, step)
        if p.stopped and "device_type=cuda" in p.stopped:  # a kernel wrapper that checks for a real device
            assert "\n" not in p.stopped and p.stopped.startswith("stopped in model.")
            continue
        assert p.stopped is None, p.stopped
        assert p.padded >= step.tokens


def test_dense_gate_up_crossing_is_confirmed_by_passes_on_both_sides(dense):
    """The dense Llama's gate_up_proj output (N x 2 x intermediate per rank) passes 2^31 - 1 elements near 75k."""
    th = census.thresholds(dense, "prefill")
    gate_up = next(m for n, m in layers.build_model(dense).named_modules() if n.endswith("mlp.gate_up_proj"))
    width = gate_up.output_size_per_partition
    row = th[th["module"].str.endswith("mlp.gate_up_proj") & (th["role"] == "out") & (th["op"] == "aten::linear")]
    assert len(row) == 1 and row.iloc[0]["formula"] == f"N x {width}"
    n = int(row.iloc[0]["tokens"])
    assert n == 2**31 // width + 1 == 74_899
    site = row.iloc[0]["site"]
    state = census.prepare(dense).state_storages
    below = census._measure(census.record(dense, census.prefill(n - 1)), state)[(site, "out")]
    above = census._measure(census.record(dense, census.prefill(n)), state)[(site, "out")]
    assert below[1] <= census.INT32_MAX < above[1]


def test_boundary_map_lists_the_dense_crossing(dense):
    from diaglib.predict import boundaries

    bmap = _needs("the boundary map", lambda: boundaries.boundaries(dense))
    rows = bmap[(bmap["kind"] == "int32") & (bmap["tokens"] == 74_899)]
    assert len(rows) == 1 and "28672" in rows.iloc[0]["rule"]
    for r in rows.itertuples():
        assert boundaries.feature_value(dense, r.feature, r.tokens - 1) == "fits int32"
        assert boundaries.feature_value(dense, r.feature, r.tokens) == "over INT32_MAX"


def test_census_leaves_the_scenario_as_vllm_resolved_it(scenario):
    from vllm import forward_context

    cc = scenario.vllm_config.compilation_config
    before = dict(cc.static_forward_context)
    model = layers.build_model(scenario)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    census.record(scenario, census.prefill(2048))
    assert dict(cc.static_forward_context) == before
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    assert forward_context._forward_context is None
    assert census.prepare(scenario).model is not model
    from diaglib import whatif

    if scenario.simulated:  # a census of a scenario on another GPU leaves the impersonated GPU as it was
        from diaglib.scenario import load

        cmd, gpu, count = ZOO["moe"]
        other = load(cmd=cmd, gpu=gpu, gpu_count=count)
        whatif.activate(scenario.gpu)
        census.record(other, census.prefill(1024))
        assert whatif.active_gpu() is scenario.gpu


def test_what_runs_each_op_follows_the_compilation_config(scenario):
    df = census.ops(scenario, census.prefill(2048))
    comp = compat.compilation_summary(scenario.vllm_config)
    attn = df[df["op"] == "vllm::unified_attention_with_output"]
    assert set(attn["runs_as"]) == {"splitting op (eager)"}
    assert "vllm::unified_attention_with_output" in compat.splitting_ops(scenario.vllm_config)
    top = df[(df["kind"] == "aten") & (df["phase"] == "model") & df["parent"].isna()]
    if comp["compile_backend"] == "inductor":
        assert set(top["runs_as"]) <= {"inductor", "inductor extern (cuBLAS)"} and "inductor" in set(top["runs_as"])
        assert set(top.loc[top["runs_as"] == "inductor extern (cuBLAS)", "op"]) <= census._EXTERN
    else:
        assert set(top["runs_as"]) == {f"compiled graph ({comp['compile_backend']} backend)"}
    eager = scenario.derive("--enforce-eager")
    runs = set(census.ops(eager, census.prefill(2048))["runs_as"])
    assert not runs & {"inductor", "splitting op (eager)"} and "eager torch" in runs


def test_grid_table_names_ops_and_arguments_of_this_vllm(scenario):
    import torch

    census.prepare(scenario)  # vLLM's extensions are loaded
    for op, (role, source) in census.GRID_TABLE.items():
        ns, name = op.split("::")
        packet = getattr(getattr(torch.ops, ns), name, None)
        if packet is None:
            continue
        assert role in [a.name for a in packet.default._schema.arguments], op
        assert source.startswith("csrc/")


def test_grid_of_a_per_token_kernel_is_its_rows(scenario):
    df = census.ops(scenario, census.prefill(2048))
    per_token = df[df["grid_source"].fillna("").str.startswith("csrc/")]
    assert len(per_token)
    assert {g[1:] for g in per_token["grid"]} == {(1, 1)}


def test_every_step_kind_rejects_bad_input_in_one_line(scenario):
    with pytest.raises(DiagError):
        census.prefill(0)
    with pytest.raises(DiagError):
        census.prefill(4, reqs=8)
    with pytest.raises(DiagError):
        census.mixed(4, 1)
    with pytest.raises(DiagError):
        census.summary(scenario, census.decode(scenario.vllm_config.scheduler_config.max_num_seqs + 1))


def test_kernels_command_json(capsys):
    from diaglib import cli

    cmd, gpu, count = ZOO["moe"]
    base = ["kernels", "--cmd", cmd, "--gpu", gpu, "--gpu-count", str(count)]
    assert cli.main([*base, "--tokens", "2048", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["step"]["tokens"] == 2048 and data["kernels"] and data["crossings"]
    assert cli.main([*base, "--tokens", "0"]) == 2
    assert "--tokens must be" in capsys.readouterr().err


def test_runner_buffers_are_vllms_input_batch_and_the_runners_own(scenario):
    cfg = scenario.vllm_config
    sch, mc = cfg.scheduler_config, cfg.model_config
    df = census.runner_buffers(scenario).set_index("buffer")
    assert df.attrs["note"] is None
    blocks = -(-mc.max_model_len // cfg.cache_config.block_size)
    gpu = df[df["device"] == "gpu"]
    bt = gpu[gpu.index.str.contains(r"block_table(\.gpu)?$")]  # a CpuGpuBuffer's .gpu, or the tensor itself
    assert len(bt) >= 1 and bt.iloc[0]["shape"] == (sch.max_num_seqs, blocks)
    assert bt.iloc[0]["value_max"] == census.prepare(scenario).num_blocks - 1
    slots = gpu[gpu.index.str.contains(r"slot_mapping(\.gpu)?$")].iloc[0]
    assert slots["shape"] == (sch.max_num_batched_tokens,)
    tokens = df.loc["input_batch.token_ids_cpu_tensor"]
    assert tokens["shape"] == (sch.max_num_seqs, mc.max_model_len) and tokens["device"] == "cpu"
    assert df.loc["runner.query_start_loc", "shape"] == (sch.max_num_seqs + 1,)


def test_known_classes_come_from_the_census_for_a_dense_model(dense):
    from diaglib.predict import known_issues

    m = _needs("the known-issue match", lambda: known_issues.match(dense)).set_index("id")
    assert m.loc["int32-token-offset", "applies"] and m.loc["int32-token-offset", "threshold_tokens"] == 74_899
    assert "gate_up_proj" in m.loc["int32-token-offset", "why"]
    budget = dense.vllm_config.scheduler_config.max_num_batched_tokens
    assert m.loc["profile-run-at-budget", "threshold_tokens"] == budget
    assert not m.loc["moe-grid-limit", "applies"]


def test_launches_name_a_kernel_pattern_for_every_kernel(scenario):
    import re

    step = census.prefill(2048)
    lk = census.launches(scenario, step)
    df = census.ops(scenario, step)
    kernels = df[~df["runs_as"].isin(["no kernel", "host"]) & (df["kind"] != "vllm op")]
    assert len(lk) == len(kernels) and lk["match"].map(bool).all()
    for pattern in lk["match"]:
        re.compile(pattern)
    assert lk.loc[lk["runs_as"] == "inductor", "fusion"].notna().all()


def _kv_storage(layer):
    import torch

    kv, out = layer.kv_cache, set()
    for t in (kv if isinstance(kv, (list, tuple)) else [kv]):
        if isinstance(t, torch.Tensor) and t.numel():
            out.add(t.untyped_storage()._cdata)
    return out


def test_attention_and_the_kv_cache_write_take_the_kv_cache_vllms_runner_lays_out(zoo):
    """Where this vLLM's model runner lays KV caches out by layout (one allocation viewed per layer), the census
    binds vLLM's own views: every layer's cache is [blocks, heads, tokens per block, content] for the blocks of
    vLLM's KVCacheConfig and the bytes per block of the layer's own KV-cache spec, and attention's inner kernels
    and the KV-cache write run (traced, not their fake implementations) on that very cache."""
    import math

    if not compat.runner_lays_out_kv_caches():
        pytest.skip(f"vLLM {compat.installed()}'s model runner reshapes KV caches per backend (get_kv_cache_shape)")
    from vllm.v1.kv_cache_interface import AttentionSpec, UniformTypeKVCacheSpecs
    p = census.prepare(zoo)
    assert not [n for n in p.notes if "KV cache not laid out" in n], p.notes
    kv = p.kv_layout
    assert kv is not None and kv.config.num_blocks == p.num_blocks
    attn = {}
    for gid, group in enumerate(kv.config.kv_cache_groups):
        for name in group.layer_names:
            spec = group.kv_cache_spec
            spec = spec.kv_cache_specs[name] if isinstance(spec, UniformTypeKVCacheSpecs) else spec
            if name in p.registry and isinstance(spec, AttentionSpec):
                attn[name] = (spec, kv.kernel_block_sizes[gid])
    assert attn, "no attention layer got a KV cache"
    placed = {n: tensor for tensor in kv.config.kv_cache_tensors for n in tensor.layers}
    for name, (spec, kbs) in attn.items():
        own = p.registry[name].get_kv_cache_spec(kv.vllm_config)  # the layer's own spec (pages unpadded)
        assert own.block_size == spec.block_size and own.dtype == spec.dtype, name
        t = kv.caches[name]  # [B, H, N, C] as bound (the kernel-block view where the backend splits blocks)
        ratio = spec.block_size // kbs
        assert t.device.type == "meta" and t.dtype == spec.dtype, name
        assert t.shape[0] == kv.config.num_blocks * ratio, (name, tuple(t.shape))
        assert t.shape[-2] * t.shape[0] == kv.config.num_blocks * spec.block_size, (name, tuple(t.shape))
        assert math.prod(t.shape[1:]) * t.element_size() * ratio == own.page_size_bytes, (name, tuple(t.shape))
        assert t.stride(0) * t.element_size() * ratio == placed[name].block_stride, (name, t.stride())
        assert t.untyped_storage().nbytes() >= placed[name].size, name

    ps = census.record(zoo, census.prefill(4096))
    assert ps.stopped is None, ps.stopped
    for op in ("kv_cache_update", "attention_with_output"):
        assert not [n for n in ps.notes if op in n and "inner kernels not traced" in n], ps.notes
    built = {n for n in attn}
    for container in ("kv_cache_update", "attention_with_output"):
        calls = [r for r in ps.base if r.kind == "vllm op" and r.op.endswith(container) and r.root is None]
        assert calls, f"no {container} op ran"
        kernels = [r for r in ps.base if r.root in {c.op for c in calls} and r.kind == "custom"]
        assert kernels, f"{container}: no inner kernel traced"
        touched = {r.module for r in kernels
                   if any(t.untyped_storage()._cdata in _kv_storage(p.registry[n])
                          for _, t in r.tensors for n in built if r.module == n)}
        assert touched == {r.module for r in calls if r.module in built}, (container, touched)
