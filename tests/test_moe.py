"""MoE launches: selection, configs, buffer sizes and grids checked against vLLM's own objects and functions."""
from __future__ import annotations

import inspect
import json
import math
import os

import moe_models
import pytest
import torch

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.predict import layers, moe

pytestmark = pytest.mark.contract


@pytest.fixture(scope="module")
def info8192(scenario):
    return moe.launches(scenario, 8192)


@pytest.fixture(scope="module")
def h200(scenario_name):
    from diaglib.scenario import load

    return load(scenario_name, gpu="NVIDIA H200")


def _buf(df, path, name):
    row = df[(df["path"] == path) & (df["buffer"] == name)]
    assert len(row) == 1, (path, name)
    return row.iloc[0]


def _vllm_workspaces(experts, layer, m):
    """workspace_shapes called the way vLLM's modular kernel calls it in this release (read off its signature)."""
    params = inspect.signature(experts.workspace_shapes).parameters
    N, K = layer.w13_weight.shape[1], layer.hidden_size
    args = (N, K, layer.top_k, layer.global_num_experts, layer.local_num_experts, None)
    if "aq" in params:
        a = torch.empty(m, K, dtype=compat.in_dtype(layer), device="meta")
        return experts.workspace_shapes(a, a, m, *args)[:3]
    return experts.workspace_shapes(m, *args, *((layer.activation,) if "activation" in params else ()))[:3]


def test_selected_experts_are_what_vllms_method_builds(scenario, info8192):
    """The seed on sm90: the CUTLASS FP8 experts, as vLLM's method names them (its experts_cls or its flags)."""
    layer = layers.build_moe_layer(scenario)
    qm = layer.quant_method
    with layers.rank0(scenario):
        sel = compat.moe_selection(layer)
    cls = getattr(qm, "experts_cls", None)
    if cls is not None:
        assert sel["experts"] == cls.__name__ and type(sel["object"]) is cls
        assert sel["backend"] == compat.moe._backend_enum(qm).name
    elif getattr(qm, "use_cutlass", None) is not None:
        assert qm.use_cutlass and sel["experts"] == "CutlassExpertsFp8"
    assert info8192["selected_path"] == "cutlass"
    assert info8192["selected_experts"] == "CutlassExpertsFp8"
    assert info8192["w13_weight"] == [160, 384, 5120] and info8192["w2_weight"] == [160, 5120, 192]


def test_experts_object_is_the_one_vllms_kernel_builder_makes(scenario):
    """Where the release builds its kernel with an oracle make_<q>_moe_kernel, calling it gives the same experts."""
    layer = layers.build_moe_layer(scenario)
    qm = layer.quant_method
    builder = compat.moe._kernel_builder(qm)
    if builder is None:
        pytest.skip("this vLLM's method calls its kernels from apply(): no kernel builder")
    with layers.rank0(scenario):
        sel = compat.moe_selection(layer)
        kernel = compat.call_named(builder, compat.moe._pool(layer, compat.moe._quant_config(layer)))
    kernel = kernel[0] if isinstance(kernel, tuple) else kernel
    assert type(kernel.fused_experts) is type(sel["object"])


def test_weights_are_the_layers_parameters(scenario):
    df = moe.weights(scenario)
    params = dict(layers.build_moe_layer(scenario).named_parameters())
    assert set(df["name"]) == set(params)
    for _, r in df.iterrows():
        assert r["shape"] == tuple(params[r["name"]].shape)
        assert r["bytes"] == params[r["name"]].numel() * params[r["name"]].element_size()


@pytest.mark.parametrize("m", [1, 100, 8192])
def test_every_workspace_is_vllms_workspace_shapes(scenario, m):
    layer = layers.build_moe_layer(scenario)
    df = moe.buffers(scenario, m)
    with layers.rank0(scenario):
        chosen = compat.moe_experts(layer, m)
        triton = compat.triton_experts(layer)
        for path, experts in (("cutlass", chosen), ("triton", triton)):
            chunk = compat.chunk_tokens(experts, m)
            ws13, ws2, _ = _vllm_workspaces(experts, layer, chunk)
            out = _vllm_workspaces(experts, layer, m)[2]
            assert _buf(df, path, "workspace13")["shape"] == tuple(ws13)
            assert _buf(df, path, "workspace2")["shape"] == tuple(ws2)
            assert _buf(df, path, "output")["shape"] == tuple(out)


def test_triton_geometry_at_8192(scenario, info8192):
    """sorted_token_ids is vLLM's moe_align_block_size padding: M x top-k + E x (BLOCK_SIZE_M - 1); caches
    (8192, 8, 384), (65536, 192), (8192, 8, 5120); largest offset 335,544,319."""
    df = info8192["buffers"]
    bm = moe.triton_config(scenario, 8192)["config"]["BLOCK_SIZE_M"]
    assert _buf(df, "triton", "sorted_token_ids")["numel"] == 8192 * 8 + 160 * (bm - 1)
    assert _buf(df, "triton", "intermediate_cache1")["shape"] == (8192, 8, 384)
    assert _buf(df, "triton", "intermediate_cache2")["shape"] == (65536, 192)
    assert _buf(df, "triton", "intermediate_cache3")["shape"] == (8192, 8, 5120)
    assert info8192["largest_buffer"]["max_offset"] == 335_544_319 < 2**31
    assert _buf(df, "cutlass", "workspace13")["shape"] == (65536, 5120)


def test_derived_triton_views_fit_in_vllms_workspaces(scenario):
    """The caches fused_experts carves out must fit in the workspaces vLLM's TritonExperts asks for."""
    for m in (1, 100, 8192):
        df = moe.buffers(scenario, m)
        ws = max(_buf(df, "triton", "workspace13")["numel"], _buf(df, "triton", "workspace2")["numel"])
        for c in ("intermediate_cache1", "intermediate_cache2", "intermediate_cache3"):
            assert _buf(df, "triton", c)["numel"] <= ws


def _vllm_config(sc, m):
    layer = layers.build_moe_layer(sc)
    fm = compat.fused_moe_module()
    with layers.rank0(sc):
        experts = compat.triton_experts(layer)
        return fm.try_get_optimal_moe_config(tuple(layer.w13_weight.shape), tuple(layer.w2_weight.shape),
                                             layer.top_k, compat.triton_config_dtype(experts, torch.bfloat16), m,
                                             block_shape=getattr(experts, "block_shape", None))


@pytest.mark.parametrize("which", ["scenario", "h200"])
def test_triton_config_is_vllms_lookup(request, which):
    """The config equals vLLM's try_get_optimal_moe_config; 'found' is whether vLLM ships the file; between and
    at tuned keys, the reported key's entry in the JSON file is what vLLM's lookup returned."""
    sc = request.getfixturevalue(which)
    folder = os.path.join(os.path.dirname(compat.fused_moe_module().__file__), "configs")
    for m in (1, 3, 1536, 1537, 8191, 8192, 8193):
        tc = moe.triton_config(sc, m)
        assert tc["config"] == _vllm_config(sc, m)
        assert tc["found"] == os.path.exists(os.path.join(folder, tc["file"]))
        if tc["found"]:
            with open(tc["path"]) as f:
                raw = json.load(f)
            assert raw[str(tc["key"])] == {k: v for k, v in tc["config"].items() if k != "SPLIT_K"}
        else:
            assert tc["source"].startswith("default")


def test_config_file_names_the_gpu(scenario, h200, info8192):
    assert info8192["triton_config"]["file"] == "E=160,N=192,device_name=NVIDIA_H20,dtype=fp8_w8a8.json"
    assert moe.triton_config(h200, 8192)["file"] == "E=160,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8.json"
    # switching back to the H20 scenario in the same process answers for the H20 again
    assert moe.triton_config(scenario, 8192)["config"] == _vllm_config(scenario, 8192)


@pytest.mark.parametrize("m", [1, 7, 8192])
def test_grids_follow_the_rule_of_vllms_launch_wrapper(scenario, m):
    """Grids come from vLLM's launch wrapper; they agree with its rule cdiv(EM, BM) x cdiv(N, BN), EM the
    sorted_token_ids length (capped at M x top-k x BM below BM rows), or M x top-k x BM without sorting."""
    layer = layers.build_moe_layer(scenario)
    cfg = moe.triton_config(scenario, m)["config"]
    bm, bn = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"]
    sorted_len = moe.sorted_token_ids(scenario, m, bm)["sorted_token_ids"]
    df = moe.grids(scenario, m)
    for i, (a_rows, topk, n) in enumerate(((m, layer.top_k, layer.w13_weight.shape[1]),
                                           (m * layer.top_k, 1, layer.w2_weight.shape[1]))):
        em = (min(sorted_len, a_rows * topk * bm) if a_rows < bm else sorted_len) if sorted_len else \
            a_rows * topk * bm
        assert df.iloc[i]["grid"] == (math.ceil(em / bm) * math.ceil(n / bn), 1, 1)


def test_offs_token_int64_fix_is_read_from_the_installed_kernel():
    src = inspect.getsource(compat.fused_moe_module().fused_moe_kernel.fn)
    cast = any("offs_token" in line and "tl.int64" in line and "=" in line for line in src.splitlines())
    assert moe.offs_token_int64() is cast


def test_activation_chunking_is_vllms_rule(scenario):
    chunk = compat.moe_chunk_size()
    m = 40_000
    df = moe.buffers(scenario, m)
    rows = _buf(df, "triton", "intermediate_cache3")["shape"][0]
    if chunk is None:
        assert rows == m
    else:
        from vllm import envs

        assert chunk == envs.VLLM_FUSED_MOE_CHUNK_SIZE
        assert rows == min(m, chunk)


def test_int32_threshold_is_exact_by_vllms_sizes(scenario):
    """The classic fused-MoE overflow: M * topk * K > 2^31 first at floor(2^31 / (8 * 5120)) + 1 = 52,429."""
    th = moe.int32_thresholds(scenario)
    layer = layers.build_moe_layer(scenario)
    classic = 2**31 // (layer.top_k * layer.hidden_size) + 1
    row = th[(th["path"] == "triton") & (th["buffer"] == "intermediate_cache3")].iloc[0]
    if moe.triton_chunk_tokens(scenario, classic) < classic:
        assert row["tokens"] is None or row["tokens"] != row["tokens"]  # capped by chunking: never
    else:
        assert row["tokens"] == classic == 52_429
    for _, r in th.dropna(subset=["tokens"]).iterrows():
        t = int(r["tokens"])
        below, above = moe.buffers(scenario, t - 1), moe.buffers(scenario, t)
        assert _buf(below, r["path"], r["buffer"])["max_offset"] <= moe.INT32_MAX
        assert _buf(above, r["path"], r["buffer"])["max_offset"] > moe.INT32_MAX


@pytest.mark.parametrize("bad", [0, -5])
def test_bad_token_count_is_a_diag_error(scenario, bad):
    with pytest.raises(DiagError, match="positive whole number"):
        moe.launches(scenario, bad)


def test_cli_moe_json_is_launches(scenario, scenario_name, capsys):
    from diaglib.cli import main

    assert main(["moe", scenario_name, "--tokens", "8192", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == layers.moe_backend(scenario)["backend"]
    assert out["largest_buffer"]["max_offset"] == 335_544_319
    assert {r["buffer"] for r in out["buffers"]} >= {"sorted_token_ids", "workspace13", "intermediate_cache3"}


def test_cli_moe_bad_tokens_exits_2_with_one_line(scenario_name):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "diaglib", "moe", scenario_name, "--tokens", "0"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == \
        "diaglib: error: --tokens must be a positive whole number of tokens, not 0"


@pytest.mark.parametrize("x_limit", [2**31 - 1, 100_000])
def test_grid_thresholds_are_where_the_grid_passes_the_limit(scenario, monkeypatch, x_limit):
    monkeypatch.setattr(moe, "GRID_LIMITS", (x_limit, 65535, 65535))
    g = moe.grid_thresholds(scenario, upto=2**20)
    for kernel, t in zip(g["kernel"], g["tokens"]):
        if t is None or t != t:  # not reached: the grid at the scan's end is still inside the limits
            assert not moe.grid_over_limit(scenario, 2**20)[kernel]
        else:
            assert moe.grid_over_limit(scenario, int(t))[kernel]
            assert not moe.grid_over_limit(scenario, int(t) - 1)[kernel]
    assert g["tokens"].notna().any() == (x_limit == 100_000)  # GEMM2 (x = 80 N-blocks per M-block) gets there


def test_dense_model_moe_is_one_line_naming_the_model(dense):
    with pytest.raises(DiagError, match=r"^dense-llama \(LlamaForCausalLM\) has no MoE layers$"):
        moe.launches(dense, 8192)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return moe_models.dense(tmp_path_factory)


# --- the zoo's MoE quantizations, on sm90 and sm100 -------------------------------------------------------

@pytest.fixture(scope="module", params=[(n, g) for g in moe_models.GPUS for n in moe_models.MOE_ZOO],
                ids=lambda p: f"{p[0]}-{p[1].split()[1]}")
def zoo(request):
    name, gpu = request.param
    sc = moe_models.zoo(name, gpu)
    layer = moe_models.moe_layer(sc)
    with layers.rank0(sc):
        sel = compat.moe_selection(layer)
    return sc, layer, sel


def test_zoo_selection_is_what_vllms_method_builds(zoo):
    sc, layer, sel = zoo
    qm = layer.quant_method
    cls = getattr(qm, "experts_cls", None)
    enum = compat.moe._backend_enum(qm)
    if cls is not None:  # the class vLLM's oracle chose at init, and vLLM's own kernel builder agrees
        assert sel["experts"] == cls.__name__ and sel["backend"] == enum.name
        assert (sel["kind"] == "monolithic") == bool(cls.is_monolithic())
        builder = compat.moe._kernel_builder(qm)
        if sel["object"] is not None and builder is not None:
            with layers.rank0(sc):
                kernel = compat.call_named(builder, compat.moe._pool(layer, compat.moe._quant_config(layer)))
            assert type((kernel[0] if isinstance(kernel, tuple) else kernel).fused_experts) is cls
    else:  # function era: the flag vLLM's apply() branches on
        flags = [f for f, *_ in compat.moe._LEGACY_RULES if getattr(qm, f, None)]
        rule = next((r for r in compat.moe._LEGACY_RULES if flags and r[0] == flags[0]), None)
        if rule is not None:
            assert sel["experts"] == rule[2]
    assert sel["object"] is not None or sel["note"], "no experts object and no reason given"


def test_zoo_launches_use_vllms_workspaces_and_lookups(zoo):
    sc, layer, sel = zoo
    info = moe.launches(sc, 8192)
    with layers.rank0(sc):
        name, experts = compat.moe_experts_at(layer, 8192)
    assert info["selected_experts"] == name
    if experts is not None and compat.has_workspaces(experts):
        path = moe._path_name(name)
        with layers.rank0(sc):
            ws13 = _vllm_workspaces(experts, layer, compat.chunk_tokens(experts, 8192))[0]
        assert _buf(info["buffers"], path, "workspace13")["shape"] == tuple(ws13)
    else:
        assert info["selected_note"]  # one line saying why nothing more is visible
    tc = info["triton_config"]
    assert tc["applies"] == moe.triton_applies(sc)
    if tc["applies"]:
        assert tc["config"] == _vllm_config(sc, info["triton_config_tokens"])
        assert len(info["grids"]) == 2
    else:
        assert not len(info["grids"]) and "triton" not in set(info["buffers"]["path"])


def test_zoo_moe_weights_are_vllms_parameters(zoo):
    sc, layer, _ = zoo
    df = moe.weights(sc).set_index("name")
    for n, p in layer.named_parameters():
        assert df.loc[n, "shape"] == tuple(p.shape) and df.loc[n, "dtype"] == str(p.dtype).removeprefix("torch.")


def test_sm100_small_batch_triton_fallback_and_its_thresholds():
    """CUTLASS FP8 on sm100 hands steps of at most 8 tokens to Triton (vLLM's fallback); the int32 scan covers
    the CUTLASS buffers that only exist above it."""
    sc = moe_models.tiny("NVIDIA B200")
    assert [moe.selected(sc, n)[0] for n in (8, 9)] == ["TritonExperts", "CutlassExpertsFp8"]
    th = moe.int32_thresholds(sc).set_index(["path", "buffer"])
    t = th.loc[("cutlass", "workspace13"), "tokens"]  # listed although absent at M = 1
    if t is not None and t == t:  # None where activation chunks cap it
        assert _buf(moe.buffers(sc, int(t)), "cutlass", "workspace13")["max_offset"] > moe.INT32_MAX
        assert _buf(moe.buffers(sc, int(t) - 1), "cutlass", "workspace13")["max_offset"] <= moe.INT32_MAX
