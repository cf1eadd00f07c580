"""The predicted per-GPU memory layout: weights (exact), KV cache (vLLM's sizing), activations (estimate).

Weights come from vLLM's model built on the meta device for TP rank 0 (diaglib.predict.layers): every parameter
and buffer with its real shape and dtype, before process_weights_after_loading. KV blocks come from
vLLM's own KV-cache sizing given the memory left. The profile-run activation peak, the CUDA-graph pool
and non-torch memory cannot be measured without a GPU: they are estimates and say so (``kind``).
"""
from __future__ import annotations

import pandas as pd

from .. import compat
from ..errors import DiagError
from ..scenario import Scenario
from . import layers, moe

GiB = 2**30
NON_TORCH_BYTES = 1 * GiB  # guess: CUDA context extras, NCCL and cuBLAS workspaces outside torch's allocator

_COMPONENTS = (  # (substring of the module path, component), first match wins, after the module-type rules
    ("shared_expert", "MoE shared experts"), (".experts.", "MoE routed experts"), ("attn", "attention"),
    ("attention", "attention"), (".gate.", "MoE router"), (".router.", "MoE router"), ("mlp", "dense MLP"),
    ("feed_forward", "dense MLP"),
    ("vision", "vision encoder"), ("visual", "vision encoder"), ("multi_modal", "vision encoder"),
    ("norm", "norms"),
)


def component_of(name: str, module=None) -> str:
    """The component a parameter of vLLM's model belongs to: by the class of the module that owns it
    (vLLM's MoE layer, embedding, LM head, norm), else by its module path."""
    if module is not None:
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        if isinstance(module, compat.moe_layer_class()):
            return "MoE routed experts"
        if isinstance(module, ParallelLMHead):
            return "lm_head"
        if isinstance(module, VocabParallelEmbedding):
            return "embedding"
        if "norm" in type(module).__name__.lower():
            return "norms"
    if "embed_tokens" in name:
        return "embedding"
    if "lm_head" in name:
        return "lm_head"
    return next((c for key, c in _COMPONENTS if key in name), "other")


def _owned(model, kind: str):
    """(name, tensor, owning module) for every parameter or buffer of the model, each once: a tensor vLLM
    registers on two modules (e.g. a router bias on the gate and the MoE layer) belongs to the non-MoE one."""
    moe_cls = compat.moe_layer_class()
    owners: dict[int, tuple[str, object, object]] = {}
    for mod_name, mod in model.named_modules():
        items = mod._parameters if kind == "parameters" else mod._buffers
        for n, t in items.items():
            if t is None:
                continue
            if id(t) not in owners or isinstance(owners[id(t)][2], moe_cls) and not isinstance(mod, moe_cls):
                owners[id(t)] = (f"{mod_name}.{n}" if mod_name else n, t, mod)
    return list(owners.values())


DRAFT = "speculative draft"  # the weights component of the draft model vLLM's proposer builds


def weights_by_component(sc: Scenario) -> pd.DataFrame:
    """Exact per-rank weight bytes by component, from vLLM's model on the meta device (buffers included).

    Columns: component, numel, bytes, GiB, dtypes. Works for any scenario, e.g. a one-rank stand-in at TP 1.
    """
    model = layers.build_model(sc)
    rows = [{"component": component_of(n, m), "numel": p.numel(), "bytes": p.numel() * p.element_size(),
             "dtype": str(p.dtype).removeprefix("torch.")} for n, p, m in _owned(model, "parameters")]
    rows += [{"component": "buffers (rotary caches etc.)", "numel": b.numel(), "bytes": b.numel() * b.element_size(),
              "dtype": str(b.dtype).removeprefix("torch.")} for _, b, _ in _owned(model, "buffers")]
    try:
        draft = layers.build_draft(sc)
    except DiagError as e:  # the target's weights still answer
        rows.append({"component": f"{DRAFT} not counted ({e})", "numel": 0, "bytes": 0, "dtype": "-"})
        draft = None
    if draft is not None:  # its own tensors: what vLLM's proposer shares with the target is counted once
        target = {id(t) for t in (*model.parameters(), *model.buffers())}
        name = f"{DRAFT} ({type(draft[0]).__name__})"
        rows += [{"component": name, "numel": t.numel(), "bytes": t.numel() * t.element_size(),
                  "dtype": str(t.dtype).removeprefix("torch.")}
                 for kind in ("parameters", "buffers") for _, t, _ in _owned(draft[0], kind) if id(t) not in target]
    df = pd.DataFrame(rows, columns=["component", "numel", "bytes", "dtype"])
    out = df.groupby("component", sort=False).agg(numel=("numel", "sum"), bytes=("bytes", "sum"),
                                                  dtypes=("dtype", lambda s: ", ".join(sorted(set(s)))))
    out = out.sort_values("bytes", ascending=False).reset_index()
    out["GiB"] = out["bytes"] / GiB
    return out[["component", "numel", "bytes", "GiB", "dtypes"]]


def weights_total_bytes(sc: Scenario) -> int:
    """Exact per-rank weight bytes (parameters + buffers) of vLLM's model for this scenario."""
    return int(weights_by_component(sc)["bytes"].sum())


def kv_bytes_per_token(sc: Scenario) -> int:
    """KV-cache bytes per token on one rank, all layers: each layer's KV spec page size / block size (the
    specs of vLLM's model, schedule.kv_specs; every decoder layer as full attention where there are none)."""
    from .schedule import kv_specs

    specs = kv_specs(sc) or compat.full_attention_kv_specs(sc.vllm_config)
    return sum(s.page_size_bytes // s.block_size for s in specs.values())


def large_buffers(sc: Scenario, num_tokens: int | None = None) -> pd.DataFrame:
    """The large transient buffers of one step at ``num_tokens`` (default max_num_batched_tokens), largest first.

    MoE buffers are vLLM's sizes (diaglib.predict.moe); the others are derived from the model's shapes.
    Columns: buffer, shape, dtype, numel, bytes, frac_int32 (numel / INT32_MAX), source.
    """
    cfg = sc.vllm_config
    mc, pc = cfg.model_config, cfg.parallel_config
    n = num_tokens or cfg.scheduler_config.max_num_batched_tokens
    heads, kv, hd = mc.get_num_attention_heads(pc), mc.get_num_kv_heads(pc), mc.get_head_size()
    hidden, act = mc.get_hidden_size(), str(mc.dtype).removeprefix("torch.")
    reqs = min(cfg.scheduler_config.max_num_seqs, n)
    d = "derived: model shapes"
    rows = [("hidden_states", (n, hidden), act, d), ("residual", (n, hidden), act, d),
            ("qkv_proj out", (n, (heads + 2 * kv) * hd), act, d), ("attention out", (n, heads * hd), act, d),
            ("logits (profile run: one per request)", (reqs, mc.get_vocab_size()), "float32",
             f"derived: {reqs} dummy requests x vocab, fp32 in the sampler"),
            ("input_ids", (n,), "int32", "derived: model-runner buffer"),
            ("positions", (n,), "int64", "derived: model-runner buffer")]
    if width := _gate_up_width(sc):
        src = "vLLM's model: its widest merged gate/up projection, this rank"
        rows += [("MLP gate/up out", (n, width), act, src), ("MLP activation out", (n, width // 2), act, src)]
    df = pd.DataFrame([{"buffer": b, "shape": s, "dtype": t, "numel": _prod(s), "source": src}
                       for b, s, t, src in rows])
    df["bytes"] = df["numel"] * df["dtype"].map({"bfloat16": 2, "float16": 2, "float32": 4, "int32": 4, "int64": 8})
    if layers.build_moe_layer(sc) is not None:
        m = moe.buffers(sc, n)
        m = m[m["path"].isin([moe.selected(sc, n)[1], "triton"])]
        m = m.assign(buffer="MoE " + m["path"] + "." + m["buffer"])[["buffer", "shape", "dtype", "numel", "bytes",
                                                                       "source"]]
        df = pd.concat([df, m], ignore_index=True)
    df["frac_int32"] = df["numel"] / moe.INT32_MAX
    return df.sort_values("bytes", ascending=False).reset_index(drop=True)


def _gate_up_width(sc: Scenario) -> int:
    """Per-rank output width of the widest merged gate/up projection of vLLM's model (a column-parallel linear
    with two equal output partitions, which a gated activation halves); 0 where the model has none (MoE layers
    have their own buffers)."""
    widths = [sum(sizes) for _, m in layers.build_model(sc).named_modules()
              if len(sizes := list(getattr(m, "output_partition_sizes", None) or ())) == 2 and sizes[0] == sizes[1]]
    return max(widths, default=0)


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def activation_peak_estimate(sc: Scenario) -> tuple[int, str]:
    """Profile-run activation peak (ESTIMATE): selected-path MoE workspaces + per-layer transients (the dense
    MLP's gate/up output and its activation among them) + logits."""
    buf = large_buffers(sc).set_index("buffer")
    parts = [b for b in ("hidden_states", "residual", "qkv_proj out", "attention out", "MLP gate/up out",
                         "MLP activation out", "logits (profile run: one per request)") if b in buf.index]
    total = int(buf.loc[parts, "bytes"].sum())
    if layers.build_moe_layer(sc) is not None:
        path = moe.selected(sc, sc.vllm_config.scheduler_config.max_num_batched_tokens)[1]
        ws = [w for w in (f"MoE {path}.{b}" for b in ("workspace13", "workspace2", "output", "a1q_permuted"))
              if w in buf.index]
        total += int(buf.loc[ws, "bytes"].sum())
        parts.append(f"{path} MoE workspaces" if ws else f"{path} MoE workspaces not visible (not counted)")
    return total, "estimate: " + " + ".join(parts)


def kv_memory_estimate(sc: Scenario, weights: int) -> tuple[int, int, str]:
    """(KV-cache bytes per GPU, activation peak, how) by this budget: GPU memory x gpu_memory_utilization -
    ``weights`` - the profile run's activation peak (estimate) - the non-torch allowance (guess). The
    activation estimate is kept per scenario, in this process and in diaglib's cache, so a sweep resolving the
    same settings again (here, in its workers, or next time) reuses it."""
    from .. import cache

    act, how = cache.memo_here("activation", sc.key_parts(), lambda: list(activation_peak_estimate(sc)))
    act = int(act)
    util = sc.vllm_config.cache_config.gpu_memory_utilization
    return int(sc.gpu.memory_bytes * util) - weights - act - NON_TORCH_BYTES, act, how


def budget(sc: Scenario) -> pd.DataFrame:
    """The predicted per-GPU budget: item, bytes, GiB, kind (exact / vLLM / estimate / guess), how.

    KV memory = GPU memory x gpu_memory_utilization - weights - activation peak - non-torch; vLLM's
    KV-cache sizing turns it into blocks and tokens. The CUDA-graph pool is captured after the KV cache
    is allocated and comes out of the remaining headroom.
    """
    cfg = sc.vllm_config
    util = cfg.cache_config.gpu_memory_utilization
    total = sc.gpu.memory_bytes
    parts = weights_by_component(sc)
    weights = int(parts["bytes"].sum())
    how = "vLLM model on the meta device, this rank"
    for _, d in parts[parts["component"].str.startswith(DRAFT)].iterrows():
        how += (f", with its {d['component']}: {d['GiB']:.2f} GiB (what vLLM's proposer shares with the target "
                "counted once)" if d["bytes"] else f"; {d['component']}")
    kv, act, act_how = kv_memory_estimate(sc, weights)
    rows = [("GPU memory", total, "exact", f"{sc.gpu.name}, {sc.gpu.memory_mib} MiB"),
            ("usable (x gpu_memory_utilization)", int(total * util), "vLLM", f"x {util}"),
            ("weights", weights, "exact", how),
            ("activation peak (profile run)", act, "estimate", act_how),
            ("non-torch (NCCL, cuBLAS, context)", NON_TORCH_BYTES, "guess", "fixed allowance")]
    if kv > 0:
        from .schedule import kv_specs

        kv_cfg, block_size, _ = compat.kv_cache_config(compat.private_config(cfg), kv, kv_specs(sc))
        rows += [("KV cache", kv, "estimate", f"{kv_blocks_text(kv_cfg, block_size)}, "
                  f"{compat.kv_cache_tokens(cfg, kv_cfg):,} tokens of context at {kv_bytes_per_token(sc):,} "
                  "B/token (vLLM sizing)")]
    else:
        rows += [("KV cache", 0, "estimate", f"nothing left for the KV cache ({kv / GiB:,.1f} GiB by this "
                  "budget): vLLM would stop at start-up, its KV-cache check finding no room for one request")]
    graphs = cudagraph_pool_estimate(sc, act)
    rows += [("CUDA-graph pool", graphs, "estimate", "activations at the largest capture size, shared pool"),
             ("free after start-up", total - int(total * util) - graphs, "estimate",
              "GPU memory - usable - CUDA-graph pool")]
    df = pd.DataFrame(rows, columns=["item", "bytes", "kind", "how"])
    df["GiB"] = df["bytes"] / GiB
    return df[["item", "bytes", "GiB", "kind", "how"]]


def kv_blocks_text(kv_cfg, block_size: int) -> str:
    """vLLM's KV blocks in words: 'N blocks of 16 tokens', or, for several KV-cache groups, the groups by spec
    kind ('52 layers of SlidingWindowSpec in 6, 10 layers of FullAttentionSpec in 1') and the scheduler's
    block size."""
    groups = getattr(kv_cfg, "kv_cache_groups", None) or []
    if len(groups) <= 1:
        return f"{kv_cfg.num_blocks} blocks of {block_size} tokens"
    kinds: dict[str, list[int]] = {}
    for g in groups:
        kinds.setdefault(type(g.kv_cache_spec).__name__, []).append(len(g.layer_names))
    return (f"{kv_cfg.num_blocks} blocks shared by {len(groups)} KV-cache groups ("
            + ", ".join(f"{sum(n)} layers of {k} in {len(n)}" for k, n in kinds.items())
            + f"; scheduler block size {block_size})")


def cudagraph_pool_estimate(sc: Scenario, activation_bytes: int) -> int:
    """CUDA-graph memory pool (ESTIMATE): the activation peak scaled to the largest capture size."""
    comp = compat.compilation_summary(sc.vllm_config)
    if comp["cudagraph_mode"] == "NONE" or not comp["cudagraph_capture_sizes"]:
        return 0
    mnbt = sc.vllm_config.scheduler_config.max_num_batched_tokens
    return int(activation_bytes * min(1.0, comp["max_cudagraph_capture_size"] / mnbt))


def layout(sc: Scenario) -> dict:
    """Budget, weights by component, large buffers at max_num_batched_tokens, and the largest numel vs int32."""
    buf = large_buffers(sc)
    top = buf.loc[buf["numel"].idxmax()]
    return {"budget": budget(sc), "weights": weights_by_component(sc), "buffers": buf,
            "largest_intermediate": {"buffer": top["buffer"], "shape": top["shape"], "numel": int(top["numel"]),
                                     "frac_int32": float(top["frac_int32"]),
                                     "over_int32": bool(top["numel"] > moe.INT32_MAX)}}


def format_text(info: dict) -> str:
    """`diaglib memory` as text."""
    b = info["budget"].assign(GiB=lambda d: d["GiB"].map("{:.2f}".format))
    w = info["weights"].assign(GiB=lambda d: d["GiB"].map("{:.3f}".format))
    buf = info["buffers"].head(12).assign(frac_int32=lambda d: d["frac_int32"].map("{:.4f}".format))
    li = info["largest_intermediate"]
    return ("Per-GPU budget\n" + b[["item", "GiB", "kind", "how"]].to_string(index=False)
            + "\n\nWeights by component (exact, this rank)\n" + w.to_string(index=False)
            + "\n\nLarge buffers at max_num_batched_tokens\n"
            + buf[["buffer", "shape", "dtype", "bytes", "frac_int32", "source"]].to_string(index=False)
            + f"\n\nLargest intermediate: {li['buffer']} {li['shape']} = {li['numel']:,} elements = "
              f"{li['frac_int32']:.3f} x INT32_MAX"
            + (" (OVER: Inductor 32-bit indexing class)" if li["over_int32"] else ""))
