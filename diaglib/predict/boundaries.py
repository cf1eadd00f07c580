"""The boundary map: every token count where vLLM's behaviour changes abruptly, with the rule behind it.

Three axes are scanned. ``step``: tokens in one forward step, 1..max_num_batched_tokens (CUDA-graph
padding and mode, compile range, the MoE kernels and the Triton MoE config, the scheduler budget).
``prompt``: the length of one prompt, 1..max_model_len (prefill chunks, KV-block multiples,
max_model_len). ``knob``: token counts per step beyond the budget, reachable only by raising
max_num_batched_tokens (MoE activation chunks, int32 offsets of MoE buffers, and every op of the kernel
census: diaglib.predict.census). Each row's ``feature`` can
be evaluated on either side with :func:`feature_value`, which asks vLLM (dispatch, MoE lookups, the
prompt-length check) or, where marked ``derived``, applies a rule read off vLLM's code.
Rows are ranked by distance from the operating point (max_num_batched_tokens).
"""
from __future__ import annotations

import pandas as pd

from .. import compat
from ..errors import DiagError
from ..scenario import Scenario
from . import census, layers, moe
from .dispatch import dispatch

BLOCK_WINDOW = 2  # KV-block edges listed on each side of the operating point


def _mnbt(sc: Scenario) -> int:
    return sc.vllm_config.scheduler_config.max_num_batched_tokens


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def feature_value(sc: Scenario, feature: str, n: int):
    """The value of one boundary feature at ``n`` tokens (see the module docstring for the features)."""
    mnbt = _mnbt(sc)
    if feature == "budget":
        return "schedulable" if n <= mnbt else "over budget"
    if feature in ("cudagraph", "compile_range"):
        if n > mnbt:
            return "over budget"
        d = dispatch(sc, n)
        if feature == "compile_range":
            return (d["compile_kind"], d["compile_range"])
        return (d["cudagraph_mode"], d["padded_tokens"] if d["cudagraph_mode"] != "NONE" else None)
    if feature == "moe_experts":
        return moe.selected(sc, n)[0]
    if feature == "triton_config":
        return _config_id(moe.triton_config(sc, n))
    if feature == "moe_chunks":
        chunk = compat.moe_chunk_size()
        return _cdiv(n, chunk) if chunk else 1
    if feature.startswith("census:"):
        return census.feature_value(sc, feature, n)
    if feature.startswith("grid:"):
        return moe.grid_over_limit(sc, n)[feature[5:]]
    if feature.startswith("int32:"):
        path, buffer = feature[6:].split(".", 1)
        df = moe.buffers(sc, n)
        row = df[(df["path"] == path) & (df["buffer"] == buffer)]  # none: that path is not selected at n
        return "over INT32_MAX" if len(row) and row.iloc[0]["max_offset"] > moe.INT32_MAX else "fits int32"
    if feature == "prefill_chunks":  # derived: the scheduler grants at most max_num_batched_tokens per step
        return _cdiv(n, mnbt)
    if feature == "kv_blocks":  # derived: blocks of block_size tokens
        return _cdiv(n, sc.vllm_config.cache_config.block_size)
    if feature == "max_model_len":
        try:
            compat.check_prompt_len(sc.vllm_config, n)
        except DiagError:
            return "rejected"
        return "accepted"
    raise DiagError(f"unknown boundary feature {feature!r}")


_SHORT = {"BLOCK_SIZE_M": "BM", "BLOCK_SIZE_N": "BN", "BLOCK_SIZE_K": "BK", "GROUP_SIZE_M": "GM",
          "num_warps": "warps", "num_stages": "stages"}


def _config_id(tc: dict) -> str:
    """The Triton config vLLM picked, every key of it (a change of warps or stages alone is a change too; another
    key of the tuned file holding the same config is none)."""
    c = tc["config"]
    keys = [k for k in _SHORT if k in c] + sorted(k for k in c if k not in _SHORT)
    return " ".join(f"{_SHORT.get(k, k)}={c[k]}" for k in keys)


def _changes(values: list, start: int = 1):
    """(n, before, after) wherever consecutive values differ; values[i] belongs to n = start + i."""
    return [(start + i, values[i - 1], values[i]) for i in range(1, len(values)) if values[i] != values[i - 1]]


def _row(axis, n, below, above, kind, rule, feature, source, op):
    return {"axis": axis, "tokens": n, "below": below, "above": above, "kind": kind, "rule": rule,
            "feature": feature, "distance": abs(n - op), "source": source}


def _step_rows(sc: Scenario, op: int) -> list[dict]:
    mnbt = _mnbt(sc)
    steps = [dispatch(sc, n) for n in range(1, mnbt + 1)]
    rows = []
    graph = [(d["cudagraph_mode"], d["padded_tokens"] if d["cudagraph_mode"] != "NONE" else None) for d in steps]
    for n, a, b in _changes(graph):
        kind = "capture size" if a[0] == b[0] else "cudagraph mode"
        rule = (f"padded to the next capture size: {a[1]} -> {b[1]}" if kind == "capture size" else
                f"CUDA graph {a[0]} -> {b[0]}" + (f" (largest capture size {a[1]})" if b[1] is None else
                                                  f", padded {a[1]} -> {b[1]}"))
        rows.append(_row("step", n, a, b, kind, rule, "cudagraph", "vLLM CudagraphDispatcher", op))
    compiled = [(d["compile_kind"], d["compile_range"]) for d in steps]
    for n, a, b in _changes(compiled):
        rows.append(_row("step", n, a, b, "compile range", f"compiled graph {a[1]} -> {b[1]} (looked up at the "
                         f"padded size {steps[n - 1]['padded_tokens']})", "compile_range",
                         "vLLM piecewise backend range lookup", op))
    last = compiled[-1]
    if last[1] is not None and last[1][1] == mnbt:
        rows.append(_row("step", mnbt + 1, last, "over budget", "compile range",
                         f"the last compiled range {last[1]} ends at the budget", "compile_range",
                         "vLLM piecewise backend range lookup", op))
    rows.append(_row("step", mnbt + 1, "schedulable", "over budget", "budget",
                     f"max_num_batched_tokens {mnbt}: no step holds more (also the profile-run size)", "budget",
                     "vLLM SchedulerConfig", op))
    layer = layers.build_moe_layer(sc)
    if layer is None:
        return rows
    path = moe.selected(sc, mnbt)[1]
    what_if = "" if path == "triton" else f" (only if the Triton path is forced; selected: {path})"
    configs = [_config_id(tc) for tc in moe.triton_configs(sc, range(1, mnbt + 1))] if moe.triton_applies(sc) else []
    for n, a, b in _changes(configs):
        rows.append(_row("step", n, a, b, "MoE config", f"Triton MoE config {a} -> {b}" + what_if, "triton_config",
                         "vLLM try_get_optimal_moe_config", op))
    lo, hi = feature_value(sc, "moe_experts", 1), feature_value(sc, "moe_experts", mnbt)
    if lo != hi:  # one switch (e.g. the small-batch Triton fallback on sm100): find it by bisection
        a, b = 1, mnbt
        while b - a > 1:
            mid = (a + b) // 2
            a, b = (mid, b) if feature_value(sc, "moe_experts", mid) == lo else (a, mid)
        rows.append(_row("step", b, lo, hi, "MoE kernel", f"experts {lo} -> {hi}", "moe_experts",
                         "vLLM experts selection", op))
    return rows


def _knob_rows(sc: Scenario, op: int) -> list[dict]:
    rows = census.boundary_rows(sc)
    if layers.build_moe_layer(sc) is None:
        return rows
    chunk = compat.moe_chunk_size()
    if chunk:
        rows.append(_row("knob", chunk + 1, 1, 2, "MoE chunking",
                         f"VLLM_FUSED_MOE_CHUNK_SIZE {chunk}: a second activation chunk per MoE layer",
                         "moe_chunks", "vLLM envs (derived chunk count)", op))
    for kernel, t in zip(*moe.grid_thresholds(sc).dropna(subset=["tokens"])[["kernel", "tokens"]].values.T):
        rows.append(_row("knob", int(t), False, True, "grid limit", f"{kernel}: launch grid passes CUDA's limit",
                         f"grid:{kernel}", "derived: invoke_fused_moe_kernel grid", op))
    th = moe.int32_thresholds(sc).dropna(subset=["tokens"])
    for (path, buffer), t in zip(zip(th["path"], th["buffer"]), th["tokens"].astype(int)):
        rows.append(_row("knob", t, "fits int32", "over INT32_MAX", "int32",
                         f"{path}.{buffer}: largest element offset passes 2^31 - 1", f"int32:{path}.{buffer}",
                         "vLLM buffer sizes (moe.buffers)", op))
    return rows


def _prompt_rows(sc: Scenario, op: int) -> list[dict]:
    mnbt, mml = _mnbt(sc), sc.vllm_config.model_config.max_model_len
    bs = sc.vllm_config.cache_config.block_size
    rows = []
    if sc.vllm_config.scheduler_config.enable_chunked_prefill:
        for k in range(1, _cdiv(mml, mnbt)):
            n = k * mnbt + 1
            rows.append(_row("prompt", n, k, k + 1, "prefill chunk",
                             f"a prompt alone takes ceil(P / {mnbt}) prefill steps; the last chunk here is 1 token",
                             "prefill_chunks", "derived: scheduler token budget", op))
    first = max(1, op // bs - BLOCK_WINDOW + 1)
    for k in range(first, op // bs + BLOCK_WINDOW + 1):
        n = k * bs + 1
        if n <= mml:
            rows.append(_row("prompt", n, k, k + 1, "KV block",
                             f"prompt fills {k} blocks of {bs}; one more starts a block",
                             "kv_blocks", "derived: block_size", op))
    edge = mml if feature_value(sc, "max_model_len", mml) == "rejected" else mml + 1
    rows.append(_row("prompt", edge, "accepted", "rejected", "max_model_len",
                     f"max_model_len {mml}: vLLM rejects prompts of {edge} tokens or more", "max_model_len",
                     "vLLM prompt-length check", op))
    return rows


def boundaries(sc: Scenario) -> pd.DataFrame:
    """Every discontinuity on the step, prompt and knob axes, ranked by distance from max_num_batched_tokens.

    Columns: axis, tokens (the first count on the new side), below, above, kind, rule, feature, distance,
    source.
    """
    op = _mnbt(sc)
    rows = _step_rows(sc, op) + _prompt_rows(sc, op) + _knob_rows(sc, op)
    df = pd.DataFrame(rows).sort_values(["distance", "tokens", "axis"], kind="stable").reset_index(drop=True)
    return df


def around(sc: Scenario, counts=None, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """What happens at each token count (default: budget - 1, budget, budget + 1), as a step and as a prompt.

    ``edge`` names the boundaries (from ``df``, the boundary map) that ``n`` is the last count before.
    """
    mnbt = _mnbt(sc)
    counts = list(counts or (mnbt - 1, mnbt, mnbt + 1))
    layer = layers.build_moe_layer(sc)
    rows = []
    for n in counts:
        if n < 1:
            raise DiagError(f"token counts must be positive, got {n}")
        row = {"tokens": n}
        if df is not None:
            last = df[df["tokens"] == n + 1]
            row["last before"] = ", ".join(f"{a} {k}" for a, k in zip(last["axis"], last["kind"])) or "-"
        row["step"] = feature_value(sc, "budget", n)
        if n <= mnbt:
            d = dispatch(sc, n)
            row.update(cudagraph=d["cudagraph_mode"], padded=str(d["padded_tokens"]),
                       compile=f"{d['compile_kind']} {d['compile_range']}")
            if layer is not None:
                lb = moe.launches(sc, n)["largest_buffer"]
                row.update(moe_largest=f"{lb['buffer']} {lb['shape']} {lb['frac_2_31']:.3f} x 2^31")
                if moe.triton_applies(sc):
                    row.update(triton_config=feature_value(sc, "triton_config", n))
        row.update(prompt_chunks=feature_value(sc, "prefill_chunks", n), kv_blocks=feature_value(sc, "kv_blocks", n),
                   prompt=feature_value(sc, "max_model_len", n))
        rows.append(row)
    return pd.DataFrame(rows)


def summary(sc: Scenario, df: pd.DataFrame) -> dict:
    """The operating point, the nearest boundaries and the distance to the classic fused-MoE int32 overflow."""
    op = _mnbt(sc)
    out = {"operating_point": op, "nearest": df.iloc[0][["axis", "tokens", "kind"]].to_dict() if len(df) else None,
           "census": census.status(sc)}
    if layers.build_moe_layer(sc) is not None:
        out.update(moe_selected=moe.selected(sc, op)[0], moe_activation_chunk=compat.moe_chunk_size())
    if layers.build_moe_layer(sc) is not None and moe.triton_applies(sc):
        classic = moe.classic_overflow_tokens(sc)
        grid = moe.grid_thresholds(sc)
        out.update(grid_limit_tokens=None if grid["tokens"].isna().all() else int(grid["tokens"].min()),
                   grid_scanned_up_to=int(grid["scanned_up_to"].max()))
        out.update(classic_moe_overflow_tokens=classic, classic_moe_overflow_distance=classic - op,
                   classic_moe_overflow_ratio=round(classic / op, 2), offs_token_int64=moe.offs_token_int64())
    return out


def format_text(df: pd.DataFrame, near: pd.DataFrame, info: dict, limit: int | None = 25) -> str:
    """The table around the operating point, the classic-overflow distance and the ranked boundary map.

    Capture-size edges (one per CUDA-graph capture size) are folded into one line unless ``limit`` is None.
    """
    cap = df[df["kind"] == "capture size"]
    shown = df if limit is None else df[(df["kind"] != "capture size") | (df.index == (cap.index.min()
                                                                                       if len(cap) else -1))]
    more = 0 if limit is None else max(0, len(shown) - limit)
    shown = shown if limit is None else shown.head(limit)
    lines = [f"Operating point: max_num_batched_tokens = {info['operating_point']}", "",
             near.to_string(index=False), ""]
    if "classic_moe_overflow_tokens" in info:
        t, op = info["classic_moe_overflow_tokens"], info["operating_point"]
        state = ("fixed in this vLLM (offs_token int64)" if info["offs_token_int64"] else
                 f"capped by {info['moe_activation_chunk']}-token activation chunks" if info["moe_activation_chunk"]
                 and info["moe_activation_chunk"] < t else "UNFIXED in this vLLM")
        grid = (f"first at {info['grid_limit_tokens']:,} tokens per step" if info["grid_limit_tokens"] else
                f"none below {info['grid_scanned_up_to']:,} tokens per step")
        lines += [f"Classic fused-MoE int32 overflow (M x top_k x hidden > 2^31): {t:,} tokens per step, "
                  f"{t - op:,} above the operating point ({t / op:.1f}x); {state}",
                  f"Triton fused-MoE grid limits (x < 2^31, y/z < 65536): {grid}", ""]
    if "census" in info:
        lines += [info["census"].capitalize(), ""]
    lines += ["Boundaries, nearest first", shown[["axis", "tokens", "distance", "kind", "rule"]].to_string(index=False)]
    if limit is not None and len(cap) > 1:
        lines.append(f"(+ {len(cap) - 1} more capture-size edges: every capture size + 1; --all lists them)")
    if more:
        lines.append(f"(+ {more} more boundaries further away; --all lists them)")
    return "\n".join(lines)
