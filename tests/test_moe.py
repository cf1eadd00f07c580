"""MoE launches: configs, buffer sizes and grids checked against vLLM's own functions and the seed's figures."""
from __future__ import annotations

import json

import pytest
import torch

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.predict import layers, moe


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


def test_selected_backend_is_cutlass_fp8(info8192):
    assert info8192["selected_path"] == "cutlass"
    assert info8192["selected_experts"] == "CutlassExpertsFp8"
    assert info8192["w13_weight"] == [160, 384, 5120] and info8192["w2_weight"] == [160, 5120, 192]


def test_weights_are_the_layers_parameters(scenario):
    df = moe.weights(scenario)
    params = dict(layers.build_moe_layer(scenario).named_parameters())
    assert set(df["name"]) == set(params)
    for _, r in df.iterrows():
        assert r["shape"] == tuple(params[r["name"]].shape)
        assert r["bytes"] == params[r["name"]].numel() * params[r["name"]].element_size()


def test_triton_geometry_at_8192_matches_vllm_facts(scenario, info8192):
    """vllm-facts.md: sorted_token_ids 75,616 (BM 64, 0.10.1.1 default) / 85,856 (BM 128, 0.20.2 on H20:
    default config); caches (8192, 8, 384), (65536, 192), (8192, 8, 5120); largest offset 335,544,319."""
    df = info8192["buffers"]
    bm = info8192["triton_config"]["config"]["BLOCK_SIZE_M"]
    n = _buf(df, "triton", "sorted_token_ids")["numel"]
    assert n == 8192 * 8 + 160 * (bm - 1)  # the derived formula agrees with vLLM's moe_align_block_size
    assert n == (75_616 if compat._legacy() else 85_856)
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


def test_triton_config_key_is_the_one_vllm_uses(h200):
    """Between and at tuned keys, the reported key's entry in the JSON file is what vLLM's lookup returned."""
    checked = 0
    for m in (1, 3, 8191, 8192, 8193, 1536, 1537):
        tc = moe.triton_config(h200, m)
        if not tc["found"]:
            assert tc["source"].startswith("default")
            continue
        raw = json.loads(open(tc["path"]).read())
        assert raw[str(tc["key"])] == {k: v for k, v in tc["config"].items() if k != "SPLIT_K"}
        checked += 1
    assert checked == (0 if compat._legacy() else 7)


def test_h20_has_no_tuned_file_for_e160_n192(scenario, info8192):
    tc = info8192["triton_config"]
    assert tc["file"] == "E=160,N=192,device_name=NVIDIA_H20,dtype=fp8_w8a8.json"
    assert not tc["found"]
    if compat._legacy():
        assert {k: tc["config"][k] for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M")} == \
            {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8}


def test_h200_config_comes_from_vllms_lookup(h200, scenario):
    tc = moe.triton_config(h200, 8192)
    if compat._legacy():
        assert not tc["found"]  # 0.10.1.1 ships E=160,N=192 only for A800 and H20-3e
        return
    assert tc["file"] == "E=160,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8.json" and tc["found"]
    assert tc["key"] == 4096 == max(tc["keys"])
    c = tc["config"]
    assert (c["BLOCK_SIZE_M"], c["BLOCK_SIZE_N"], c["BLOCK_SIZE_K"], c["GROUP_SIZE_M"], c["num_warps"],
            c["num_stages"]) == (128, 128, 128, 1, 8, 3)
    # switching back to the H20 scenario in the same process answers for the H20 again
    assert not moe.triton_config(scenario, 8192)["found"]


def _vllm_grid(scenario, monkeypatch, m, gemm, cfg):
    """Call vLLM's own kernel-launch wrapper on meta tensors and record the grid it would launch."""
    from vllm.triton_utils import tl

    fm = moe._fused_moe_module()
    invoke = getattr(fm, "dispatch_fused_moe_kernel", None) or fm.invoke_fused_moe_kernel
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **meta: seen.setdefault("grid", grid(meta))

    monkeypatch.setattr(fm, "fused_moe_kernel", Recorder())
    layer = layers.build_moe_layer(scenario)
    topk, meta = layer.top_k, "meta"
    sizes = moe.sorted_token_ids(scenario, m, cfg["BLOCK_SIZE_M"])
    if gemm == 1:
        A, B, Bs = torch.empty(m, layer.hidden_size, device=meta), layer.w13_weight, layer.w13_weight_scale
        C, k = torch.empty(m, topk, B.shape[1], device=meta), topk
    else:
        A, B, Bs = torch.empty(m * topk, layer.w2_weight.shape[2], device=meta), layer.w2_weight, \
            layer.w2_weight_scale
        C, k = torch.empty(m, topk, B.shape[1], device=meta), 1
    A = A.to(torch.float8_e4m3fn)
    invoke(A, B, C, torch.empty(A.shape[0], 1, device=meta), Bs, None, torch.empty(m, topk, device=meta),
           torch.empty(sizes["sorted_token_ids"], dtype=torch.int32, device=meta),
           torch.empty(sizes["expert_ids"], dtype=torch.int32, device=meta), torch.empty(1, device=meta),
           gemm == 2, k, dict(cfg), tl.bfloat16, True, False, False, False, True, None)
    return seen["grid"]


@pytest.mark.parametrize("m", [1, 7, 8192])
def test_grids_match_vllms_launch_wrapper(scenario, monkeypatch, m):
    cfg = moe.triton_config(scenario, m)["config"]
    cfg.pop("SPLIT_K", None)
    df = moe.grids(scenario, m)
    for gemm in (1, 2):
        assert df.iloc[gemm - 1]["grid"][0] == _vllm_grid(scenario, monkeypatch, m, gemm, cfg)[0]


def test_offs_token_int64_fix_is_read_from_the_installed_kernel():
    assert moe.offs_token_int64() is (not compat._legacy())


def test_activation_chunking_caps_the_workspaces(scenario):
    chunk = compat.moe_chunk_size()
    m = 40_000
    df = moe.buffers(scenario, m)
    if chunk is None:
        assert _buf(df, "triton", "intermediate_cache3")["shape"][0] == m
    else:
        assert chunk == 32768
        assert _buf(df, "triton", "intermediate_cache3")["shape"][0] == chunk


def test_int32_threshold_is_exact_by_vllms_sizes(scenario):
    """The classic fused-MoE overflow: M * topk * K > 2^31 first at floor(2^31 / (8 * 5120)) + 1 = 52,429."""
    th = moe.int32_thresholds(scenario)
    layer = layers.build_moe_layer(scenario)
    classic = 2**31 // (layer.top_k * layer.hidden_size) + 1
    row = th[(th["path"] == "triton") & (th["buffer"] == "intermediate_cache3")].iloc[0]
    if compat.moe_chunk_size():
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
                       capture_output=True, text=True, timeout=600)
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
