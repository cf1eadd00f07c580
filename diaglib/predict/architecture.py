"""Per-architecture facts that decide token boundaries, read off vLLM's own objects.

The meta model's layers (their attention backend, KV-cache spec, sliding window, local-attention chunk,
mamba / DeltaNet state), the backends' metadata builders as vLLM's model runner constructs them (CUDA-graph
support, the query length that still takes the decode path, kernel block sizes), the KV block size vLLM
sets once the model is loaded, the speculative config and the checkpoint's MTP layers, and each quantized
layer's block or group size against its per-rank sizes. :func:`facts` gathers them for ``show``;
:func:`boundary_rows` turns the ones that sit at a token count into rows of the boundary map (the columns
of predict/boundaries.py); :func:`feature_value` evaluates their features on either side.
"""
from __future__ import annotations

import functools
import re

import pandas as pd

from .. import compat
from ..errors import DiagError
from ..scenario import Scenario
from . import layers

POWERS_OF_TWO = tuple(2 ** k for k in range(7))  # TP sizes the alignment table checks (1 .. 64)
_ROW_LIMIT = 4  # multiples of a window / chunk listed on the prompt axis


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _on_its_gpu(fn):
    """Run ``fn(sc, ...)`` as rank 0 of the scenario on its GPU: the what-if GPU is process-wide, and vLLM's
    answers (preferred block sizes, CUDA-graph support, kernel choices) depend on it."""
    @functools.wraps(fn)
    def run(sc, *args, **kwargs):
        with layers.rank0(sc):
            return fn(sc, *args, **kwargs)

    return run


@_on_its_gpu
def loaded_config(sc: Scenario):
    """The scenario's config as vLLM runs it after loading the model (block sizes; see compat.config_after_load)."""
    return compat.config_after_load(sc.vllm_config, layers.forward_context(sc))


# --- attention, per layer kind --------------------------------------------------------------------

_SPEC_FIELDS = ("block_size", "num_kv_heads", "head_size", "sliding_window", "attention_chunk_size", "mamba_type")


def attention(sc: Scenario) -> pd.DataFrame:
    """:func:`attention_kinds` as a DataFrame."""
    return pd.DataFrame(attention_kinds(sc))


@_on_its_gpu
def attention_kinds(sc: Scenario) -> list[dict]:
    """One row per kind of attention-like layer (layer class, backend, KV-cache spec), as vLLM's model runner
    groups them: layers, first layer, backend, CUDA-graph support, decode threshold and query lengths,
    kernel block sizes, FlashAttention version and the spec's block size, window, chunk or state."""
    ctx = layers.forward_context(sc)
    cfg = loaded_config(sc)
    backends = compat.layer_backends(ctx)
    with layers.registered(sc):
        specs = compat.layer_kv_cache_specs(cfg, ctx)
    kinds: dict[tuple, list[str]] = {}
    for name, backend in backends.items():
        spec = specs.get(name)
        key = (type(ctx[name]).__name__, backend, type(spec).__name__ if spec is not None else None,
               *(_field(spec, f) for f in ("sliding_window", "attention_chunk_size")))
        kinds.setdefault(key, []).append(name)
    rows = []
    for (cls, backend, spec_name, _, _), names in kinds.items():
        spec = specs.get(names[0])
        with layers.registered(sc), layers.rank0(sc):
            try:
                builder = compat.metadata_builder(backend, spec, names, cfg) if spec is not None else None
            except (ValueError, NotImplementedError, AssertionError, TypeError, AttributeError):
                builder = None  # the class still says what it declares
            support = compat.cudagraph_support(backend, cfg, spec) if spec is not None else None
            traits = compat.backend_traits(backend, builder)
        row = {"layer": cls, "layers": len(names), "first": names[0], "backend": traits["backend"],
               "cudagraph_support": support, "decode_threshold": traits["decode_threshold"],
               "decode_query_len": traits["decode_query_len"], "kernel_block_sizes": traits["kernel_block_sizes"],
               "flash_attn_version": compat.flash_attn_version(ctx[names[0]]), "kv_spec": spec_name}
        row.update({f: _field(spec, f) for f in _SPEC_FIELDS})
        row.update(state=_state(spec), state_shapes=[list(x) for x in getattr(spec, "shapes", None) or []] or None,
                   page_size_bytes=_field(spec, "page_size_bytes"))
        rows.append(row)
    return rows


def _field(spec, name: str):
    value = getattr(spec, name, None) if spec is not None else None
    return value if value is None or isinstance(value, (int, str)) else str(value)


def _state(spec) -> str | None:
    """A mamba / DeltaNet spec's per-request state: its tensors' shapes and dtypes on this rank."""
    shapes, dtypes = getattr(spec, "shapes", None), getattr(spec, "dtypes", None)
    if shapes is None:
        return None
    dtypes = dtypes if isinstance(dtypes, (tuple, list)) else [dtypes] * len(shapes)
    return ", ".join(f"{tuple(s)} {str(d).removeprefix('torch.')}" for s, d in zip(shapes, dtypes))


# --- speculative decoding / MTP -------------------------------------------------------------------

def speculative(sc: Scenario) -> dict:
    """vLLM's speculative config, and the multi-token-prediction draft vLLM would make of this checkpoint's
    own layers (compat.mtp_draft)."""
    spec = sc.vllm_config.speculative_config
    draft = compat.mtp_draft(sc.vllm_config.model_config.hf_config)
    return {"mtp_draft": draft[0] if draft else None,
            "mtp_layers_in_checkpoint": draft[1] if draft else 0,
            "method": getattr(spec, "method", None) if spec else None,
            "num_speculative_tokens": spec.num_speculative_tokens if spec else 0,
            "decode_query_len": compat.uniform_decode_query_len(sc.vllm_config)}


# --- quantization blocks per TP rank --------------------------------------------------------------

def _block(layer) -> tuple[list[int] | None, int | None]:
    """(weight block [n, k], group size along k) of ``layer``'s quantization method, where it has one."""
    qm = getattr(layer, "quant_method", None)
    holders = [qm, getattr(qm, "quant_config", None), getattr(layer, "scheme", None),
               getattr(getattr(layer, "scheme", None), "quant_config", None)]
    block = next((list(b) for h in holders if (b := getattr(h, "weight_block_size", None))), None)
    group = next((g for h in holders if isinstance(g := getattr(h, "group_size", None), int) and g > 0), None)
    return block, group


def _tp_split(layer) -> list[tuple[str, list[int], int, tuple[int, ...]]]:
    """(dimension, per-rank sizes, ranks, blocks that must divide them) for each dimension of a linear or
    MoE layer that tensor parallelism splits, read off vLLM's layer (a dimension whose per-rank size equals
    its whole size is not split; merged layers list one size per merged matrix)."""
    block, group = _block(layer)
    n, k = (block[0], block[1]) if block else (None, group)
    if hasattr(layer, "intermediate_size_per_partition"):  # FusedMoE: gate/up output and down input
        ranks = getattr(layer, "tp_size", 1) or 1
        return [("intermediate", [layer.intermediate_size_per_partition], ranks, tuple(b for b in (n, k) if b))] \
            if ranks > 1 else []
    out = []
    full, per = getattr(layer, "output_size", None), getattr(layer, "output_size_per_partition", None)
    if isinstance(full, int) and per and full // per > 1 and n:
        out.append(("output", list(getattr(layer, "output_partition_sizes", None) or [per]), full // per, (n,)))
    full, per = getattr(layer, "input_size", None), getattr(layer, "input_size_per_partition", None)
    if isinstance(full, int) and per and full // per > 1 and k:
        out.append(("input", [per], full // per, (k,)))
    return out


def quant_alignment(sc: Scenario) -> pd.DataFrame:
    """:func:`quant_alignment_rows` as a DataFrame."""
    return pd.DataFrame(quant_alignment_rows(sc), columns=["layer", "class", "dim", "per_rank", "split_over", "block",
                                                           "aligned", "tp_sizes_aligned"])


@_on_its_gpu
def quant_alignment_rows(sc: Scenario) -> list[dict]:
    """Every quantized linear / MoE layer kind whose weight block or group tensor parallelism splits: per-rank
    sizes against the block on this rank, and the TP sizes (powers of two up to 64) at which the block
    still divides every per-rank size (vLLM's rule when it builds the layer). Indices folded in the names."""
    rows, seen = [], set()
    for name, layer in layers.build_model(sc).named_modules():
        if _block(layer) == (None, None):
            continue
        for dim, sizes, ranks, blocks in _tp_split(layer):
            pattern = re.sub(r"\.\d+\.", ".*.", name)
            if (pattern, dim) in seen:
                continue
            seen.add((pattern, dim))
            whole = [s * ranks for s in sizes]
            ok = [t for t in POWERS_OF_TWO
                  if all(w % t == 0 and all((w // t) % b == 0 for b in blocks) for w in whole)]
            rows.append({"layer": pattern, "class": type(layer).__name__, "dim": dim, "per_rank": sizes,
                         "split_over": ranks, "block": max(blocks),
                         "aligned": all(s % b == 0 for s in sizes for b in blocks), "tp_sizes_aligned": ok})
    return rows


@_on_its_gpu
def linear_methods(sc: Scenario) -> list[dict]:
    """The quantization methods of the model's linear layers, one row per method: how many layers use it
    and the kernel choices it made on this GPU (its kernel objects, ``use_*`` switches that are on, backend
    enums), read off the methods vLLM attached to the meta model's layers."""
    return method_rows(layers.build_model(sc))


def method_rows(model) -> list[dict]:
    """:func:`linear_methods` of a built model (the meta model here, the engine's own on a GPU)."""
    from vllm.model_executor.layers.linear import LinearBase

    rows: dict[tuple[str, str], dict] = {}
    for name, layer in model.named_modules():
        qm = getattr(layer, "quant_method", None)
        if not isinstance(layer, LinearBase) or qm is None:
            continue
        scheme = getattr(layer, "scheme", None)  # compressed-tensors keeps its per-layer scheme on the layer
        method = type(qm).__name__ + (f" ({type(scheme).__name__})" if scheme is not None else "")
        key = (method, ", ".join(d for d in (_method_digest(qm), _method_digest(scheme)) if d != "-") or "-")
        row = rows.setdefault(key, {"method": key[0], "kernels": key[1], "layers": 0, "first": name})
        row["layers"] += 1
    return list(rows.values())


def _method_digest(qm) -> str:
    """The kernel choices a quantization method holds: kernel objects, switches that are on, backend enums."""
    parts = []
    for k, v in (vars(qm) if qm is not None else {}).items():
        if isinstance(v, bool):
            if v and k.startswith("use_"):
                parts.append(k)
        elif k.endswith("backend") and hasattr(v, "name") and hasattr(v, "value"):
            parts.append(f"{k}={v.name}")
        elif type(v).__module__.startswith("vllm") and ("kernel" in type(v).__module__.lower() or "kernel" in k
                                                         or type(v).__name__.endswith(("Kernel", "Op"))):
            parts.append(f"{k}={type(v).__name__}")
    return ", ".join(parts) or "-"


# --- everything, for show --------------------------------------------------------------------------

@_on_its_gpu
def facts(sc: Scenario) -> dict:
    """A JSON-ready summary of the architecture facts that decide token boundaries."""
    att = attention_kinds(sc)
    cfg = loaded_config(sc)
    align = quant_alignment_rows(sc)
    return {
        "attention": att,
        "kv_block_size": {"resolved": sc.vllm_config.cache_config.block_size,
                          "after_load": cfg.cache_config.block_size,
                          "set_after_load": compat.block_size_set_after_load(),
                          "mamba_block_size": getattr(cfg.cache_config, "mamba_block_size", None),
                          "mamba_page_size_padded": getattr(cfg.cache_config, "mamba_page_size_padded", None)},
        "sliding_windows": sorted({a["sliding_window"] for a in att if a["sliding_window"]}),
        "attention_chunk_sizes": sorted({a["attention_chunk_size"] for a in att if a["attention_chunk_size"]}),
        "speculative": speculative(sc),
        "quantization": sc.vllm_config.model_config.quantization,
        "linear_methods": linear_methods(sc),
        "custom_kernels": [c for c in compat.custom_ops(layers.build_model(sc)) if c["enabled"]],
        "other_quant_methods": other_quant_methods(layers.build_model(sc)),
        "quant_alignment": {"layers": len(align), "blocks": sorted({a["block"] for a in align}),
                            "tp": sc.vllm_config.parallel_config.tensor_parallel_size,
                            "misaligned": [a["layer"] for a in align if not a["aligned"]],
                            "tp_sizes_aligned": sorted(set.intersection(*(set(a["tp_sizes_aligned"]) for a in align)))
                            if align else None},
    }


def other_quant_methods(model) -> list[str]:
    """The quantization methods vLLM attached to layers other than linear ones (fused MoE experts, ...)."""
    from vllm.model_executor.layers.linear import LinearBase

    return sorted({type(m.quant_method).__name__ for m in model.modules()
                   if not isinstance(m, LinearBase) and getattr(m, "quant_method", None) is not None})


def unquantized_despite_config(f: dict) -> bool:
    """Whether the config names a quantization but vLLM built every layer unquantized (linear layers and the
    rest: gpt-oss quantizes only its experts, by design)."""
    methods = f["linear_methods"]
    quantized_elsewhere = [m for m in f.get("other_quant_methods", []) if not m.startswith("Unquantized")]
    return bool(f.get("quantization") and methods and not quantized_elsewhere
                and all(m["method"].startswith("UnquantizedLinearMethod") for m in methods))


def backend_label(a: dict) -> str:
    """A layer kind's backend with the FlashAttention version its implementation chose (MLA and other
    backends use FlashAttention for their prefill path only)."""
    v = a["flash_attn_version"]
    if not v:
        return a["backend"]
    return a["backend"] + (f" (FlashAttention {v})" if a["backend"].startswith("FLASH_ATTN")
                           else f" (prefill: FlashAttention {v})")


def attention_summary(f: dict) -> str:
    """The attention backends of :func:`facts` in one line, per layer kind where several differ."""
    names = [backend_label(a) for a in f["attention"]]
    if len(set(names)) <= 1:
        return names[0] if names else "none (no attention layers)"
    return " + ".join(f"{n} x {a['layers']} {a['layer']}" for n, a in zip(names, f["attention"]))


def format_lines(f: dict) -> list[tuple[str, str]]:
    """(label, text) rows for ``diaglib show``."""
    rows = []
    for a in f["attention"]:
        bits = [f"{a['layers']} x {a['layer']}", backend_label(a)]
        if a["cudagraph_support"]:
            bits.append(f"CUDA graphs {a['cudagraph_support']}")
        if a["decode_threshold"] and a["decode_threshold"] > 1:
            bits.append(f"decode path up to {a['decode_threshold']} query tokens")
        if a["sliding_window"]:
            bits.append(f"sliding window {a['sliding_window']}")
        if a["attention_chunk_size"]:
            bits.append(f"local chunks of {a['attention_chunk_size']}")
        if a["state"]:
            bits.append(f"state {a['state']} per request")
        if a["kernel_block_sizes"]:
            bits.append("kernel block sizes " + "/".join(map(str, a["kernel_block_sizes"])))
        rows.append(("attention layers", ", ".join(bits)))
    kv = f["kv_block_size"]
    text = f"{kv['after_load']}"
    if kv["after_load"] != kv["resolved"]:
        text += f" (set by vLLM after loading the model; the resolved config says {kv['resolved']})"
    if kv["mamba_block_size"]:
        text += f", mamba block size {kv['mamba_block_size']}"
    if kv["mamba_page_size_padded"]:
        text += f", mamba page {kv['mamba_page_size_padded']} bytes"
    rows.append(("KV block size", text))
    s = f["speculative"]
    if s["mtp_layers_in_checkpoint"] or s["method"]:
        rows.append(("speculative", (f"{s['method']} with {s['num_speculative_tokens']} tokens, decode steps of "
                                     f"{s['decode_query_len']} tokens per request" if s["method"] else "off")
                     + (f"; the checkpoint has {s['mtp_layers_in_checkpoint']} MTP layer(s) ({s['mtp_draft']})"
                        + ("" if s["method"] else " (unused without --speculative-config)")
                        if s["mtp_layers_in_checkpoint"] else "")))
    for lm in f["linear_methods"]:
        if not lm["method"].startswith("UnquantizedLinearMethod"):
            rows.append(("linear layers", f"{lm['layers']} x {lm['method']}: {lm['kernels']}"))
    if unquantized_despite_config(f):
        rows.append(("linear layers", f"all {sum(m['layers'] for m in f['linear_methods'])} unquantized although "
                     f"the config names {f['quantization']}: vLLM may take the quantized layers from the "
                     "checkpoint's *.safetensors headers, which this folder lacks (GPTQ does)"))
    if f.get("custom_kernels"):
        rows.append(("custom ops", "custom kernels for " + ", ".join(f"{c['custom_op']} ({c['class']}.{c['runs']})"
                                                                     for c in f["custom_kernels"])
                     + "; every other CustomOp runs its forward_native"))
    q = f["quant_alignment"]
    if q["layers"]:
        rows.append(("quant blocks", f"{q['layers']} layer kinds with blocks {'/'.join(map(str, q['blocks']))}, "
                     + ("all aligned" if not q["misaligned"] else f"misaligned: {', '.join(q['misaligned'])}")
                     + f" at TP {q['tp']}; aligned at TP {', '.join(map(str, q['tp_sizes_aligned'] or ['none']))}"))
    return rows


# --- boundary rows ---------------------------------------------------------------------------------

def _row(axis, n, below, above, kind, rule, feature, source, op):
    return {"axis": axis, "tokens": n, "below": below, "above": above, "kind": kind, "rule": rule,
            "feature": feature, "distance": abs(n - op), "source": source}


@_on_its_gpu
def boundary_rows(sc: Scenario) -> pd.DataFrame:
    """The architecture's token boundaries as boundary-map rows (predict/boundaries.py's columns).

    prompt axis: a request's query tokens in one step past each backend's decode threshold (MLA and
    FlashMLA-style backends send small prefill chunks through the decode kernel), the first multiples of
    each sliding window and local-attention chunk, KV blocks at the block size vLLM sets after loading
    the model (where it differs from the resolved one) and mamba blocks where the state is cached per block.
    """
    op = sc.vllm_config.scheduler_config.max_num_batched_tokens
    mml = sc.vllm_config.model_config.max_model_len
    f = facts(sc)
    rows = []
    for a in f["attention"]:
        t = a["decode_threshold"]
        if t and t > 1:
            rows.append(_row("prompt", t + 1, "decode path", "prefill path", "decode threshold",
                             f"{a['backend']}: a request with up to {t} query tokens in a step runs the decode kernel",
                             f"arch:decode_threshold:{t}", f"vLLM {a['backend']} metadata builder "
                             "(reorder_batch_threshold)", op))
    for w in f["sliding_windows"]:
        for k in range(1, min(_ROW_LIMIT, _cdiv(mml, w)) + 1):
            if k * w < mml:
                rows.append(_row("prompt", k * w + 1, k, k + 1, "sliding window",
                                 f"sliding-window layers attend to the last {w} tokens; past {k * w} tokens "
                                 "their KV blocks are freed as the window moves", f"arch:sliding_window:{w}",
                                 "vLLM SlidingWindowSpec", op))
    for c in f["attention_chunk_sizes"]:
        for k in range(1, min(_ROW_LIMIT, _cdiv(mml, c)) + 1):
            if k * c < mml:
                rows.append(_row("prompt", k * c + 1, k, k + 1, "local-attention chunk",
                                 f"chunked local attention: tokens attend within their {c}-token chunk; "
                                 f"token {k * c + 1} starts chunk {k + 1}", f"arch:chunk:{c}",
                                 "vLLM ChunkedLocalAttentionSpec", op))
    kv = f["kv_block_size"]
    if kv["after_load"] != kv["resolved"]:
        bs = kv["after_load"]
        for k in (op // bs, op // bs + 1):
            if 0 < k and k * bs < mml:
                rows.append(_row("prompt", k * bs + 1, k, k + 1, "KV block (after load)",
                                 f"vLLM sets block_size {bs} after loading the model (resolved: {kv['resolved']}); "
                                 f"prompt fills {k} blocks", f"arch:kv_blocks:{bs}",
                                 "vLLM update_block_size_for_backend", op))
    mb = kv["mamba_block_size"]
    if mb and mb < mml:
        for k in (op // mb, op // mb + 1):
            if 0 < k and k * mb < mml:
                rows.append(_row("prompt", k * mb + 1, k, k + 1, "mamba block",
                                 f"mamba / DeltaNet state cached every {mb} tokens", f"arch:kv_blocks:{mb}",
                                 "vLLM CacheConfig.mamba_block_size", op))
    cols = ["axis", "tokens", "below", "above", "kind", "rule", "feature", "distance", "source"]
    return pd.DataFrame(rows, columns=cols)


def feature_value(sc: Scenario, feature: str, n: int):
    """The value of an ``arch:`` boundary feature at ``n`` tokens (derived from the threshold vLLM states)."""
    kind, _, arg = feature.removeprefix("arch:").partition(":")
    if not arg.isdigit():
        raise DiagError(f"unknown architecture boundary feature {feature!r}")
    t = int(arg)
    if kind == "decode_threshold":
        return "decode path" if n <= t else "prefill path"
    if kind in ("sliding_window", "chunk", "kv_blocks"):
        return _cdiv(n, t)
    raise DiagError(f"unknown architecture boundary feature {feature!r}")
