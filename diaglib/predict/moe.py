"""MoE launches per step: the kernels vLLM selects, their config and geometry, every buffer against int32.

The layer is vLLM's FusedMoE built on the meta device for TP rank 0 (diaglib.predict.layers). Two paths are
described for M tokens in one step: the one vLLM selects (``selected``: CUTLASS FP8 for the seed) and the
Triton fused-MoE kernel (``triton``: what forcing the Triton path would run). Workspace shapes, the
Triton config (file, key, values) and sorted_token_ids sizing are vLLM's own answers; the views that
vLLM's kernels carve out of the workspaces, the small index buffers and the launch grids are derived
from vLLM's code and say so in their ``source`` column.
"""
from __future__ import annotations

import contextlib
import math
import os

import pandas as pd

from .. import compat
from ..errors import DiagError
from ..scenario import Scenario
from . import layers

INT32_MAX = 2**31 - 1
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA grid x, y, z
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "int32": 4, "int64": 8}


def _layer(sc: Scenario):
    layer = layers.build_moe_layer(sc)
    if layer is None:
        raise DiagError(f"{sc.hf_config.architectures[0]} has no MoE layers")
    return layer


def _fused_moe_module():
    """vllm...fused_moe.fused_moe (the package re-exports a function of the same name)."""
    import importlib

    return importlib.import_module("vllm.model_executor.layers.fused_moe.fused_moe")


def _check_tokens(num_tokens: int) -> None:
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise DiagError(f"--tokens must be a positive whole number of tokens, not {num_tokens!r}")


def weights(sc: Scenario) -> pd.DataFrame:
    """Per-rank parameters of the first MoE layer: name, shape, dtype, bytes (read off vLLM's layer)."""
    rows = [{"name": n, "shape": tuple(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
             "numel": p.numel(), "bytes": p.numel() * p.element_size()}
            for n, p in _layer(sc).named_parameters()]
    return pd.DataFrame(rows)


# --- the Triton fused-MoE config --------------------------------------------------------------------

_lookup_gpu: list[str | None] = [None]  # the GPU whose config files vLLM's lru_cache holds


def triton_configs(sc: Scenario, counts) -> list[dict]:
    """The fused-MoE Triton config vLLM would pick for each M in ``counts`` on this GPU: file, key, values."""
    counts = list(counts)
    for n in counts:
        _check_tokens(n)
    fm = _fused_moe_module()
    layer = _layer(sc)
    with layers.rank0(sc):
        experts = compat.triton_experts(layer)
        dtype = compat.triton_config_dtype(experts, layer.quant_method.moe.in_dtype)
        E, _, N = layer.w2_weight.shape
        block = getattr(experts, "block_shape", None)
        if _lookup_gpu[0] != sc.gpu.name:  # get_moe_configs is cached per (E, N, dtype), not per GPU name
            fm.get_moe_configs.cache_clear()
            _lookup_gpu[0] = sc.gpu.name
        file_name = fm.get_config_file_name(E, N, dtype, block)
        configs = fm.get_moe_configs(E, N, dtype, *(block or [None, None]))
        picked = [fm.try_get_optimal_moe_config(tuple(layer.w13_weight.shape), tuple(layer.w2_weight.shape),
                                                layer.top_k, dtype, n, block_shape=block) for n in counts]
    folder = os.path.join(os.path.dirname(fm.__file__), "configs")
    out = []
    for n, config in zip(counts, picked):
        key = min(configs, key=lambda k: abs(k - n)) if configs else None  # derived: vLLM's nearest-key rule
        out.append({"file": file_name, "found": configs is not None,
                    "path": os.path.join(folder, file_name) if configs is not None else None,
                    "keys": sorted(configs) if configs else [], "key": key,
                    "source": f"{file_name} key {key}" if configs else "default (get_default_config)",
                    "config": dict(config), "dtype": dtype})
    return out


def triton_config(sc: Scenario, num_tokens: int) -> dict:
    """The fused-MoE Triton config vLLM would pick for M tokens on this GPU: file, key, values or default."""
    return triton_configs(sc, [num_tokens])[0]


@contextlib.contextmanager
def _no_kernel_launch(module):
    """Run vLLM's Python around one custom op with the op itself skipped (its outputs are preallocated)."""
    real = module.ops
    module.ops = type("NoLaunch", (), {"moe_align_block_size": staticmethod(lambda *a, **k: None)})
    try:
        yield
    finally:
        module.ops = real


def sorted_token_ids(sc: Scenario, num_tokens: int, block_m: int) -> dict:
    """Sizes of sorted_token_ids and expert_ids from vLLM's own moe_align_block_size (kernel skipped)."""
    import torch
    from vllm.model_executor.layers.fused_moe import moe_align_block_size as mab

    layer = _layer(sc)
    topk_ids = torch.empty(num_tokens, layer.top_k, dtype=torch.int32, device="meta")
    with _no_kernel_launch(mab):
        ids, experts, _ = mab.moe_align_block_size(topk_ids, block_m, layer.global_num_experts)
    return {"sorted_token_ids": ids.shape[0], "expert_ids": experts.shape[0]}


# --- buffers and grids ------------------------------------------------------------------------------

def _row(path, buffer, shape, dtype, source, note=""):
    dtype = str(dtype).removeprefix("torch.")
    numel = math.prod(shape)
    return {"path": path, "buffer": buffer, "shape": tuple(int(s) for s in shape), "dtype": dtype,
            "numel": numel, "bytes": numel * _BYTES.get(dtype, 0), "max_offset": max(numel - 1, 0),
            "frac_2_31": max(numel - 1, 0) / 2**31, "source": source, "note": note}


def _path_name(experts) -> str:
    name = type(experts).__name__
    return "cutlass" if "Cutlass" in name else "triton" if "Triton" in name else name


def _workspace_rows(path, ws: dict, experts) -> list[dict]:
    src = f"vLLM {type(experts).__name__}.workspace_shapes"
    note = f"per chunk of {ws['M_chunk']} tokens" if ws["M_chunk"] else ""
    return [_row(path, "workspace13", ws["workspace13"], ws["dtype"], src, note),
            _row(path, "workspace2", ws["workspace2"], ws["dtype"], src, note),
            _row(path, "output", ws["output"], ws["dtype"], src)]


def _triton_rows(sc, layer, M: int) -> list[dict]:
    with layers.rank0(sc):
        experts = compat.triton_experts(layer)
        ws = compat.experts_workspaces(experts, layer, M)
    m, topk = ws["M_chunk"], layer.top_k
    N, K = layer.w13_weight.shape[1], layer.hidden_size
    cfg = triton_config(sc, m)["config"]
    align = sorted_token_ids(sc, m, cfg["BLOCK_SIZE_M"])
    act = ws["dtype"]
    d = "derived: fused_experts / TritonExperts.apply views"
    return [*_workspace_rows("triton", ws, experts),
            _row("triton", "sorted_token_ids", (align["sorted_token_ids"],), "int32",
                 "vLLM moe_align_block_size", f"BLOCK_SIZE_M {cfg['BLOCK_SIZE_M']}"),
            _row("triton", "expert_ids", (align["expert_ids"],), "int32", "vLLM moe_align_block_size"),
            _row("triton", "intermediate_cache1", (m, topk, N), act, d, "GEMM1 out (w13)"),
            _row("triton", "intermediate_cache2", (m * topk, N // 2), act, d, "silu_and_mul out"),
            _row("triton", "intermediate_cache3", (m, topk, K), act, d, "GEMM2 out (w2), C stride K x offs_token")]


def _cutlass_rows(sc, layer, experts, M: int) -> list[dict]:
    with layers.rank0(sc):
        ws = compat.experts_workspaces(experts, layer, M)
    m, topk, E = ws["M_chunk"], layer.top_k, layer.local_num_experts
    I2, K = layer.w13_weight.shape[1], layer.hidden_size
    d = "derived: run_cutlass_moe_fp8"
    offsets, index_buffers = compat.cutlass_index_buffers(m * topk)
    rows = [*_workspace_rows("cutlass", ws, experts),
            _row("cutlass", "a1q_permuted", (m * topk, K), "float8_e4m3fn", d, "permuted fp8 input"),
            _row("cutlass", "mm1_out", (m * topk, I2), ws["dtype"], d, "grouped GEMM1 out"),
            _row("cutlass", "act_out", (m * topk, I2 // 2), ws["dtype"], d, "silu_and_mul out"),
            _row("cutlass", "mm2_out", (m * topk, K), ws["dtype"], d, "grouped GEMM2 out"),
            _row("cutlass", "expert_offsets", (E + 1,), offsets, d, "expert first-token offsets"),
            _row("cutlass", "problem_sizes1", (E, 3), "int32", d),
            _row("cutlass", "problem_sizes2", (E, 3), "int32", d)]
    return rows + [_row("cutlass", name, shape, dtype, d, note) for name, shape, dtype, note in index_buffers]


def buffers(sc: Scenario, num_tokens: int) -> pd.DataFrame:
    """Every MoE buffer of one layer for M tokens, on the selected path and on the Triton path.

    Columns: path, buffer, shape, dtype, numel, bytes, max_offset (numel - 1), frac_2_31, source, note.
    """
    _check_tokens(num_tokens)
    layer = _layer(sc)
    with layers.rank0(sc):
        experts = compat.moe_experts(layer, num_tokens)
    common = [_row("input", "hidden_states", (num_tokens, layer.hidden_size), layer.quant_method.moe.in_dtype,
                   "derived: layer input"),
              _row("input", "topk_ids", (num_tokens, layer.top_k), "int32", "derived: router output")]
    path = _path_name(experts) if experts is not None else None
    if path == "cutlass":
        chosen = _cutlass_rows(sc, layer, experts, num_tokens)
    elif path is None or path == "triton":  # the Triton rows below are the selected path's
        chosen = []
    else:
        with layers.rank0(sc):
            chosen = _workspace_rows(path, compat.experts_workspaces(experts, layer, num_tokens), experts)
    return pd.DataFrame(common + chosen + _triton_rows(sc, layer, num_tokens))


def grids(sc: Scenario, num_tokens: int) -> pd.DataFrame:
    """Launch grids of the Triton fused-MoE GEMMs for M tokens against CUDA's grid limits (derived).

    grid x = cdiv(EM, BLOCK_SIZE_M) * cdiv(B.size(1), BLOCK_SIZE_N), EM = len(sorted_token_ids), capped at
    M * topk * BLOCK_SIZE_M when A has fewer rows than BLOCK_SIZE_M (invoke_fused_moe_kernel). CUTLASS grouped
    GEMMs pick their grid inside the C++ kernel; it is not visible from Python.
    """
    _check_tokens(num_tokens)
    layer = _layer(sc)
    chunk = compat.moe_chunk_size()
    m = min(num_tokens, chunk) if chunk else num_tokens
    tc = triton_config(sc, m)
    cfg = tc["config"]
    bm, bn = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"]
    topk = layer.top_k
    sorted_len = sorted_token_ids(sc, m, bm)["sorted_token_ids"]
    rows = []
    # GEMM1 reads A = hidden states (M rows, top_k routes each); GEMM2 reads A = M * top_k rows, top_k 1.
    for gemm, a_rows, b_rows in (("GEMM1 (w13)", m, layer.w13_weight.shape[1]),
                                 ("GEMM2 (w2)", m * topk, layer.w2_weight.shape[1])):
        em = min(sorted_len, m * topk * bm) if a_rows < bm else sorted_len
        x = -(-em // bm) * -(-b_rows // bn)
        rows.append({"kernel": f"fused_moe_kernel {gemm}", "grid": (x, 1, 1), "limit": GRID_LIMITS,
                     "frac_limit": x / GRID_LIMITS[0], "M_chunk": m, "config": tc["source"],
                     "source": "derived: invoke_fused_moe_kernel"})
    return pd.DataFrame(rows)


# --- one step ----------------------------------------------------------------------------------------

def selected(sc: Scenario, num_tokens: int) -> tuple[str, str]:
    """(experts class, path) that vLLM runs for a step of M tokens: path is cutlass, triton or the class name."""
    with layers.rank0(sc):
        experts = compat.moe_experts(_layer(sc), num_tokens)
    return (type(experts).__name__, _path_name(experts)) if experts is not None else (None, None)


def launches(sc: Scenario, num_tokens: int) -> dict:
    """What one MoE layer launches for M tokens: method, backend, chunking, Triton config, buffers, grids."""
    _check_tokens(num_tokens)
    b = layers.moe_backend(sc)
    if b is None:
        raise DiagError(f"{sc.hf_config.architectures[0]} has no MoE layers")
    name, path = selected(sc, num_tokens)
    chunk = compat.moe_chunk_size()
    buf = buffers(sc, num_tokens)
    worst = buf.loc[buf["max_offset"].idxmax()]
    return {
        **b,
        "num_tokens": num_tokens,
        "selected_experts": name,
        "selected_path": path,
        "activation_chunk_size": chunk,
        "num_chunks": -(-num_tokens // chunk) if chunk else 1,
        "triton_config": triton_config(sc, min(num_tokens, chunk) if chunk else num_tokens),
        "offs_token_int64": offs_token_int64(),
        "largest_buffer": {"path": worst["path"], "buffer": worst["buffer"], "shape": worst["shape"],
                           "max_offset": int(worst["max_offset"]), "frac_2_31": float(worst["frac_2_31"])},
        "buffers": buf,
        "grids": grids(sc, num_tokens),
    }


def offs_token_int64() -> bool:
    """Whether the installed fused_moe_kernel casts offs_token to int64 (the fix of the #5938 overflow class)."""
    import inspect

    src = inspect.getsource(_fused_moe_module().fused_moe_kernel.fn)
    return "offs_token = tl.load(sorted_token_ids_ptr + offs_token_id).to(tl.int64)" in src or \
        "offs_token = offs_token.to(tl.int64)" in src


def classic_overflow_tokens(sc: Scenario) -> int:
    """Smallest M with M * top_k * hidden_size > 2^31: the classic fused-MoE offs_token x stride overflow (derived)."""
    layer = _layer(sc)
    return 2**31 // (layer.top_k * layer.hidden_size) + 1


def int32_thresholds(sc: Scenario, upto: int = 2**24) -> pd.DataFrame:
    """For each buffer, the smallest token count M whose largest element offset exceeds INT32_MAX.

    Found by bisection over M evaluating ``buffers`` (vLLM's own sizing) at each probe; None where it never
    crosses below ``upto`` tokens (e.g. buffers capped by activation chunking).
    """
    base = buffers(sc, 1)
    keys = list(zip(base["path"], base["buffer"]))

    def offset(M):
        df = buffers(sc, M)
        return dict(zip(zip(df["path"], df["buffer"]), df["max_offset"]))

    top = offset(upto)
    rows = []
    for key in keys:
        if top.get(key, 0) <= INT32_MAX:
            rows.append({"path": key[0], "buffer": key[1], "tokens": None})
            continue
        lo, hi = 1, upto  # offset(lo) <= INT32_MAX < offset(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if offset(mid)[key] <= INT32_MAX else (lo, mid)
        rows.append({"path": key[0], "buffer": key[1], "tokens": hi})
    return pd.DataFrame(rows)


def grid_over_limit(sc: Scenario, num_tokens: int) -> dict[str, bool]:
    """Per Triton fused-MoE launch: whether its grid passes CUDA's limit in any dimension at M tokens."""
    g = grids(sc, num_tokens)
    return {k: any(d > lim for d, lim in zip(grid, GRID_LIMITS)) for k, grid in zip(g["kernel"], g["grid"])}


def grid_thresholds(sc: Scenario, upto: int = 2**24) -> pd.DataFrame:
    """For each Triton fused-MoE launch, the smallest M whose grid passes CUDA's limits; None below ``upto``."""
    top = grid_over_limit(sc, upto)
    rows = []
    for kernel, over in top.items():
        lo, hi = 1, upto
        while over and hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if grid_over_limit(sc, mid)[kernel] else (mid, hi)
        rows.append({"kernel": kernel, "tokens": hi if over else None, "scanned_up_to": upto})
    return pd.DataFrame(rows)


def format_text(info: dict) -> str:
    """`diaglib moe` as text."""
    tc = info["triton_config"]
    lb = info["largest_buffer"]
    head = [
        ("MoE method", info["method"]),
        ("backend", info["backend"]),
        ("experts at M", f"{info['selected_experts']} ({info['selected_path']} path) for M = {info['num_tokens']}"),
        ("layers", f"{info['num_moe_layers']} MoE layers, first {info['first_layer']}"),
        ("experts", f"{info['global_num_experts']} global / {info['local_num_experts']} local, top-{info['top_k']}"),
        ("weights / rank", f"w13 {tuple(info['w13_weight'])}, w2 {tuple(info['w2_weight'])} {info['weight_dtype']}"),
        ("activation chunk", f"{info['activation_chunk_size']} tokens, {info['num_chunks']} chunk(s)"
         if info["activation_chunk_size"] else "none in this vLLM version"),
        ("Triton config", f"{tc['source']}: " + ", ".join(f"{k}={v}" for k, v in tc["config"].items())),
        ("offs_token int64", "yes (fused_moe_kernel casts it)" if info["offs_token_int64"] else
         "NO: offs_token x stride is int32 in fused_moe_kernel"),
        ("largest offset", f"{lb['path']}.{lb['buffer']} {lb['shape']}: {lb['max_offset']:,} = "
                           f"{lb['frac_2_31']:.3f} x 2^31"),
    ]
    w = max(len(k) for k, _ in head)
    buf = info["buffers"][["path", "buffer", "shape", "dtype", "numel", "frac_2_31", "source"]].to_string(index=False)
    grid = info["grids"][["kernel", "grid", "frac_limit", "config"]].to_string(index=False)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in head) + "\n\nBuffers\n" + buf + "\n\nTriton grids\n" + grid
