"""MoE launches per step: the kernels vLLM selects, their config and geometry, every buffer against int32.

The layer is vLLM's MoE layer built on the meta device for TP rank 0 (diaglib.predict.layers). Two paths are
described for M tokens in one step: the one vLLM selects (``selected``: what the quant method's experts run
at M) and the Triton fused-MoE kernel (``triton``: what forcing the Triton path would run), the latter only
where vLLM's Triton kernel takes the layer's weights (unquantized, FP8, int8/int4 weight-only). Workspace
shapes, the Triton config (file, key, values), sorted_token_ids sizing and the launch grids are vLLM's own
answers (its workspace_shapes, try_get_optimal_moe_config, moe_align_block_size and kernel-launch wrapper);
the views vLLM's kernels carve out of the workspaces and the small index buffers are derived from vLLM's
code and say so in their ``source`` column. Selected paths without workspace_shapes (monolithic kernels,
functions) are named, with one line saying why nothing more is visible.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import pandas as pd

from .. import compat
from ..errors import DiagError
from ..scenario import Scenario
from . import layers

INT32_MAX = 2**31 - 1
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA grid x, y, z
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "uint8": 1, "int32": 4, "int64": 8}


def model_name(sc: Scenario) -> str:
    """The served model as the user named it, with vLLM's architecture."""
    mc = sc.vllm_config.model_config
    return f"{Path(str(mc.model)).name} ({(mc.architectures or ['?'])[0]})"


def _layer(sc: Scenario):
    layer = layers.build_moe_layer(sc)
    if layer is None:
        raise DiagError(f"{model_name(sc)} has no MoE layers")
    return layer


def _check_tokens(num_tokens: int) -> None:
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise DiagError(f"--tokens must be a positive whole number of tokens, not {num_tokens!r}")


def weights(sc: Scenario) -> pd.DataFrame:
    """Per-rank parameters of the first MoE layer: name, shape, dtype, bytes (read off vLLM's layer)."""
    rows = [{"name": n, "shape": tuple(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
             "numel": p.numel(), "bytes": p.numel() * p.element_size()}
            for n, p in _layer(sc).named_parameters()]
    return pd.DataFrame(rows)


def triton_applies(sc: Scenario) -> bool:
    """Whether vLLM's Triton fused-MoE kernel takes this layer's weights (else no Triton rows, config or grids)."""
    layer = _layer(sc)
    with layers.rank0(sc):
        return compat.triton_runs_layer(layer)


def _triton(sc: Scenario, layer):
    with layers.rank0(sc):
        return compat.triton_experts(layer)


# --- the Triton fused-MoE config --------------------------------------------------------------------

def triton_configs(sc: Scenario, counts) -> list[dict]:
    """The fused-MoE Triton config vLLM would pick for each M in ``counts`` on this GPU: file, key, values.

    ``applies`` is False (and the rest empty) where vLLM's Triton kernel does not take the layer's weights.
    """
    counts = list(counts)
    for n in counts:
        _check_tokens(n)
    layer = _layer(sc)
    if not triton_applies(sc):
        why = f"not used: vLLM's Triton fused-MoE kernel does not take {layer.w13_weight.dtype} weights".replace(
            "torch.", "")
        return [{"applies": False, "file": None, "found": False, "path": None, "keys": [], "key": None,
                 "source": why, "config": {}, "dtype": None} for _ in counts]
    with layers.rank0(sc):
        fm = compat.triton_config_lookup(sc.gpu.name)
        experts = compat.triton_experts(layer)
        dtype = compat.triton_config_dtype(experts, compat.in_dtype(layer))
        E, _, N = layer.w2_weight.shape
        block = getattr(experts, "block_shape", None)
        file_name = fm.get_config_file_name(E, N, dtype, block)
        configs = fm.get_moe_configs(E, N, dtype, *(block or [None, None]))
        picked = [fm.try_get_optimal_moe_config(tuple(layer.w13_weight.shape), tuple(layer.w2_weight.shape),
                                                layer.top_k, dtype, n, block_shape=block) for n in counts]
    folder = os.path.join(os.path.dirname(fm.__file__), "configs")
    out = []
    for n, config in zip(counts, picked):
        key = min(configs, key=lambda k: abs(k - n)) if configs else None  # derived: vLLM's nearest-key rule
        out.append({"applies": True, "file": file_name, "found": configs is not None,
                    "path": os.path.join(folder, file_name) if configs is not None else None,
                    "keys": sorted(configs) if configs else [], "key": key,
                    "source": f"{file_name} key {key}" if configs else "default (get_default_config)",
                    "config": dict(config), "dtype": dtype})
    return out


def triton_config(sc: Scenario, num_tokens: int) -> dict:
    """The fused-MoE Triton config vLLM would pick for M tokens on this GPU: file, key, values or default."""
    return triton_configs(sc, [num_tokens])[0]


@contextlib.contextmanager
def _patched(module, name: str, value):
    real = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, real)


def _align_module():
    import importlib

    return importlib.import_module("vllm.model_executor.layers.fused_moe.moe_align_block_size")


def _expert_assignment(sc: Scenario, num_tokens: int, config: dict):
    """vLLM's own (sorted_token_ids or None, expert_ids, num_tokens_post_padded) for M tokens, custom op skipped.

    From 0.20 TritonExperts assigns through _prepare_expert_assignment (no sorting for few tokens per expert);
    before, through moe_align_block_size.
    """
    import torch

    layer = _layer(sc)
    topk_ids = torch.empty(num_tokens, layer.top_k, dtype=torch.int32, device="meta")
    fm, mab = compat.fused_moe_module(), _align_module()
    no_op = type("NoLaunch", (), {"moe_align_block_size": staticmethod(lambda *a, **k: None)})
    with _patched(mab, "ops", no_op):
        prepare = getattr(fm, "_prepare_expert_assignment", None)
        if prepare is not None:
            experts = _triton(sc, layer)
            qc = getattr(experts, "quant_config", None)
            return prepare(topk_ids, config, num_tokens, layer.top_k, layer.w13_weight.shape[0], None,
                           use_int8_w8a16=bool(getattr(qc, "use_int8_w8a16", False)),
                           use_int4_w4a16=bool(getattr(qc, "use_int4_w4a16", False)),
                           block_shape=getattr(experts, "block_shape", None))
        return mab.moe_align_block_size(topk_ids, config["BLOCK_SIZE_M"], layer.global_num_experts)


def sorted_token_ids(sc: Scenario, num_tokens: int, block_m: int) -> dict:
    """Sizes of sorted_token_ids (0: no sorting, naive block assignment) and expert_ids, from vLLM's own code."""
    ids, experts, _ = _expert_assignment(sc, num_tokens, {"BLOCK_SIZE_M": block_m})
    return {"sorted_token_ids": 0 if ids is None else ids.shape[0], "expert_ids": experts.shape[0]}


# --- buffers and grids ------------------------------------------------------------------------------

def _row(path, buffer, shape, dtype, source, note=""):
    dtype = str(dtype).removeprefix("torch.")
    numel = math.prod(shape)
    return {"path": path, "buffer": buffer, "shape": tuple(int(s) for s in shape), "dtype": dtype,
            "numel": numel, "bytes": numel * _BYTES.get(dtype, 0), "max_offset": max(numel - 1, 0),
            "frac_2_31": max(numel - 1, 0) / 2**31, "source": source, "note": note}


def _path_name(name: str | None) -> str | None:
    """cutlass (CUTLASS FP8 experts, whose views are derived below), triton (TritonExperts), else the name."""
    if name is None:
        return None
    return "cutlass" if name == "CutlassExpertsFp8" else "triton" if name == "TritonExperts" else name


def _workspace_rows(path, ws: dict, experts) -> list[dict]:
    src = f"vLLM {type(experts).__name__}.workspace_shapes"
    note = f"per chunk of {ws['M_chunk']} tokens" if ws["chunked"] else ""
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
    note = f"BLOCK_SIZE_M {cfg['BLOCK_SIZE_M']}" + ("" if align["sorted_token_ids"] else
                                                  ", naive block assignment: no sorting at this M")
    return [*_workspace_rows("triton", ws, experts),
            _row("triton", "sorted_token_ids", (align["sorted_token_ids"],), "int32",
                 "vLLM expert assignment (moe_align_block_size)", note),
            _row("triton", "expert_ids", (align["expert_ids"],), "int32",
                 "vLLM expert assignment (moe_align_block_size)"),
            _row("triton", "intermediate_cache1", (m, topk, N), act, d, "GEMM1 out (w13)"),
            _row("triton", "intermediate_cache2", (m * topk, N // 2), act, d, "activation out"),
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
            _row("cutlass", "act_out", (m * topk, I2 // 2), ws["dtype"], d, "activation out"),
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
        name, experts = compat.moe_experts_at(layer, num_tokens)
    act = compat.in_dtype(layer)
    common = [_row("input", "hidden_states", (num_tokens, layer.hidden_size), act, "derived: layer input"),
              _row("input", "topk_ids", (num_tokens, layer.top_k), "int32", "derived: router output")]
    path = _path_name(name)
    if path == "cutlass" and experts is not None:
        chosen = _cutlass_rows(sc, layer, experts, num_tokens)
    elif experts is None or path == "triton" or not compat.has_workspaces(experts):
        chosen = []  # the Triton rows below are the selected path's; otherwise nothing is visible
    else:
        with layers.rank0(sc):
            chosen = _workspace_rows(path, compat.experts_workspaces(experts, layer, num_tokens), experts)
    triton = _triton_rows(sc, layer, num_tokens) if triton_applies(sc) else []
    return pd.DataFrame(common + chosen + triton)


class _GridRecorder:
    """Stands in for the Triton kernel: ``kernel[grid](...)`` records the grid vLLM's wrapper computes."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            g = tuple(grid(meta) if callable(grid) else grid)
            self.grids.append(g + (1,) * (3 - len(g)))
        return launch


def _scale(layer, w: str):
    for name in (f"{w}_weight_scale_inv", f"{w}_weight_scale"):
        t = getattr(layer, name, None)
        if t is not None:
            return t
    return None


def _launch_grid(sc, layer, experts, m: int, gemm: int, config: dict) -> tuple:
    """The grid vLLM's fused-MoE launch wrapper computes for one GEMM at M tokens (kernel not launched)."""
    import torch
    from vllm.triton_utils import tl

    fm = compat.fused_moe_module()
    wrapper = compat.fused_moe_launcher()
    act = compat.in_dtype(layer)
    topk, block = layer.top_k, getattr(experts, "block_shape", None)
    fp8 = layer.w13_weight.dtype == torch.float8_e4m3fn
    w = layer.w13_weight if gemm == 1 else layer.w2_weight
    rows, k_in = (m if gemm == 1 else m * topk), w.shape[2]
    per_token = bool(getattr(experts, "per_act_token_quant", False))
    a_scale = None
    if fp8:
        cols = -(-k_in // block[1]) if block else 1
        a_scale = torch.empty(rows, cols, device="meta") if (block or per_token) else torch.empty(1, device="meta")
    ids, expert_ids, padded = _expert_assignment(sc, m, config)
    on_input = bool(getattr(layer, "apply_router_weight_on_input", False))
    pool = {"A": torch.empty(rows, k_in, dtype=torch.float8_e4m3fn if fp8 else act, device="meta"), "B": w,
            "C": torch.empty(m, topk, w.shape[1], dtype=act, device="meta"), "A_scale": a_scale,
            "B_scale": _scale(layer, "w13" if gemm == 1 else "w2") if fp8 else None, "B_zp": None,
            "topk_weights": torch.empty(m, topk, device="meta"), "sorted_token_ids": ids, "expert_ids": expert_ids,
            "num_tokens_post_padded": padded if padded is not None else torch.empty(1, dtype=torch.int32,
                                                                                    device="meta"),
            "mul_routed_weight": on_input if gemm == 1 else not on_input, "top_k": topk if gemm == 1 else 1,
            "config": dict(config), "compute_type": tl.bfloat16 if act == torch.bfloat16 else tl.float16,
            "use_fp8_w8a8": fp8, "use_int8_w8a8": False, "use_int8_w8a16": False, "use_int4_w4a16": False,
            "per_channel_quant": per_token, "block_shape": block, "B_bias": None}
    rec = _GridRecorder()
    with _patched(fm, "fused_moe_kernel", rec):
        compat.call_named(wrapper, pool)
    if not rec.grids:
        raise DiagError(f"vLLM's {wrapper.__name__} launched no fused_moe_kernel for M = {m}")
    return rec.grids[-1]


def grids(sc: Scenario, num_tokens: int) -> pd.DataFrame:
    """Launch grids of the Triton fused-MoE GEMMs for M tokens, from vLLM's own launch wrapper, against
    CUDA's grid limits. Empty where vLLM's Triton kernel does not take the layer's weights. CUTLASS and other
    grouped GEMMs pick their grid inside C++; it is not visible from Python."""
    _check_tokens(num_tokens)
    cols = ["kernel", "grid", "limit", "frac_limit", "M_chunk", "config", "source"]
    layer = _layer(sc)
    if not triton_applies(sc):
        return pd.DataFrame(columns=cols)
    with layers.rank0(sc):
        experts = compat.triton_experts(layer)
        m = compat.chunk_tokens(experts, num_tokens)
    tc = triton_config(sc, m)
    rows = []
    for gemm, label in ((1, "GEMM1 (w13)"), (2, "GEMM2 (w2)")):
        with layers.rank0(sc):
            grid = _launch_grid(sc, layer, experts, m, gemm, tc["config"])
        rows.append({"kernel": f"fused_moe_kernel {label}", "grid": grid, "limit": GRID_LIMITS,
                     "frac_limit": max(g / lim for g, lim in zip(grid, GRID_LIMITS) if g > 1 or lim == GRID_LIMITS[0]),
                     "M_chunk": m,
                     "config": tc["source"], "source": "vLLM fused-MoE launch wrapper (kernel not launched)"})
    return pd.DataFrame(rows, columns=cols)


# --- one step ----------------------------------------------------------------------------------------

def selected(sc: Scenario, num_tokens: int) -> tuple[str | None, str | None]:
    """(experts, path) that vLLM runs for a step of M tokens: path is cutlass, triton or the experts' name."""
    with layers.rank0(sc):
        name = compat.moe_experts_at(_layer(sc), num_tokens)[0]
    return name, _path_name(name)


def launches(sc: Scenario, num_tokens: int) -> dict:
    """What one MoE layer launches for M tokens: method, backend, chunking, Triton config, buffers, grids."""
    _check_tokens(num_tokens)
    b = layers.moe_backend(sc)
    if b is None:
        raise DiagError(f"{model_name(sc)} has no MoE layers")
    name, path = selected(sc, num_tokens)
    layer = _layer(sc)
    with layers.rank0(sc):
        experts = compat.moe_experts(layer, num_tokens)
        chunk = compat.chunk_tokens(experts, num_tokens) if experts is not None else num_tokens
    buf = buffers(sc, num_tokens)
    worst = buf.loc[buf["max_offset"].idxmax()]
    visible = experts is not None and compat.has_workspaces(experts)
    return {
        **b,
        "num_tokens": num_tokens,
        "selected_experts": name,
        "selected_path": path,
        "selected_note": "" if visible else (b["note"] or f"{name}: no workspace_shapes visible from Python"),
        "activation_chunk_size": compat.moe_chunk_size(),
        "selected_chunk_tokens": chunk,
        "num_chunks": -(-num_tokens // chunk),
        "triton_config": triton_config(sc, triton_chunk_tokens(sc, num_tokens)),
        "triton_config_tokens": triton_chunk_tokens(sc, num_tokens),
        "offs_token_int64": offs_token_int64(),
        "largest_buffer": {"path": worst["path"], "buffer": worst["buffer"], "shape": worst["shape"],
                           "max_offset": int(worst["max_offset"]), "frac_2_31": float(worst["frac_2_31"])},
        "buffers": buf,
        "grids": grids(sc, num_tokens),
    }


def triton_chunk_tokens(sc: Scenario, num_tokens: int) -> int:
    """Tokens per chunk the Triton path would take for M tokens (M itself where it does not apply)."""
    if not triton_applies(sc):
        return num_tokens
    layer = _layer(sc)
    with layers.rank0(sc):
        return compat.chunk_tokens(compat.triton_experts(layer), num_tokens)


def offs_token_int64() -> bool:
    """Whether the installed fused_moe_kernel casts offs_token to int64 (the fix of the #5938 overflow class)."""
    import inspect

    src = inspect.getsource(compat.fused_moe_module().fused_moe_kernel.fn)
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
    def offset(M):
        df = buffers(sc, M)
        return dict(zip(zip(df["path"], df["buffer"]), df["max_offset"]))

    top = offset(upto)
    keys = list(dict.fromkeys([*offset(1), *top]))  # the selected path may change with M (sm100 small-batch)
    rows = []
    for key in keys:
        if top.get(key, 0) <= INT32_MAX:
            rows.append({"path": key[0], "buffer": key[1], "tokens": None})
            continue
        lo, hi = 1, upto  # offset(lo) <= INT32_MAX < offset(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if offset(mid).get(key, 0) <= INT32_MAX else (lo, mid)
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
    return pd.DataFrame(rows, columns=["kernel", "tokens", "scanned_up_to"])


def format_text(info: dict) -> str:
    """`diaglib moe` as text."""
    tc = info["triton_config"]
    lb = info["largest_buffer"]
    chunk = info["activation_chunk_size"]
    head = [
        ("MoE method", info["method"]),
        ("backend", info["backend"]),
        ("experts at M", f"{info['selected_experts']} ({info['selected_path']} path) for M = {info['num_tokens']}"),
        ("layers", f"{info['num_moe_layers']} MoE layers, first {info['first_layer']}"),
        ("experts", f"{info['global_num_experts']} global / {info['local_num_experts']} local, top-{info['top_k']}"),
        ("weights / rank", f"w13 {tuple(info['w13_weight'])}, w2 {tuple(info['w2_weight'])} {info['weight_dtype']}"),
        ("activation chunk", f"{chunk} tokens (VLLM_FUSED_MOE_CHUNK_SIZE), {info['num_chunks']} chunk(s) on the "
                             "selected path" if chunk else "none in this vLLM version"),
        ("Triton config", f"{tc['source']}: " + ", ".join(f"{k}={v}" for k, v in tc["config"].items())
         if tc["applies"] else tc["source"]),
        ("offs_token int64", "yes (fused_moe_kernel casts it)" if info["offs_token_int64"] else
         "NO: offs_token x stride is int32 in fused_moe_kernel"),
        ("largest offset", f"{lb['path']}.{lb['buffer']} {lb['shape']}: {lb['max_offset']:,} = "
                           f"{lb['frac_2_31']:.3f} x 2^31"),
    ]
    if info["selected_note"]:
        head.insert(3, ("selected path", info["selected_note"]))
    w = max(len(k) for k, _ in head)
    buf = info["buffers"][["path", "buffer", "shape", "dtype", "numel", "frac_2_31", "source"]].to_string(index=False)
    g = info["grids"]
    grid = g[["kernel", "grid", "frac_limit", "config"]].to_string(index=False) if len(g) else \
        "none: the Triton fused-MoE kernel does not run this layer"
    return "\n".join(f"{k:<{w}}  {v}" for k, v in head) + "\n\nBuffers\n" + buf + "\n\nTriton grids\n" + grid
