"""What changes when the same serve command moves to another GPU: vLLM resolves it on both and we diff.

Each side is resolved by the installed vLLM on its (real or what-if) GPU, exactly as ``show`` resolves it;
vLLM keys its choices on the GPU's compute capability (attention backends and their CUDA-graph support,
FlashAttention version, MoE and linear kernels, the KV block size a backend prefers) and on its memory
(scheduler defaults). :func:`compare` lists every aspect side by side and says which ones differ.
"""
from __future__ import annotations

import pandas as pd

from ..scenario import Scenario, load
from . import architecture, layers
from .summarize import _runs


def aspects(sc: Scenario) -> dict[str, str]:
    """The scenario's GPU-dependent choices, one readable value per aspect (read off vLLM's objects)."""
    from .. import compat

    cfg = sc.vllm_config
    c, sch = compat.compilation_summary(cfg), compat.scheduler_summary(cfg)
    caps = c["cudagraph_capture_sizes"]
    f = architecture.facts(sc)
    out = {
        "GPU": f"{sc.gpu.name} (sm {sc.gpu.capability[0]}.{sc.gpu.capability[1]}, {sc.gpu.memory_mib} MiB)",
        "compile ranges": ", ".join(f"[{a}, {b}]" for a, b in c["compile_ranges"]) or "none",
        "compile sizes": ", ".join(map(str, c["compile_sizes"])) or "none",
        "cudagraph mode": str(c["cudagraph_mode"]),
        "capture sizes": f"{len(caps)} sizes, max {c['max_cudagraph_capture_size']}: {_runs(caps)}",
        "max_num_batched_tokens": str(sch["max_num_batched_tokens"]),
        "max_num_seqs": str(sch["max_num_seqs"]),
        "KV block size": str(f["kv_block_size"]["after_load"]),
        "quantization": str(cfg.model_config.quantization or "none"),
    }
    for a in f["attention"]:
        kind = f"attention: {a['layers']} x {a['layer']}" + (f", window {a['sliding_window']}" if a["sliding_window"]
                                                              else "") \
            + (f", chunk {a['attention_chunk_size']}" if a["attention_chunk_size"] else "")
        out[kind] = ", ".join(str(x) for x in (
            architecture.backend_label(a),
            f"CUDA graphs {a['cudagraph_support']}" if a["cudagraph_support"] else None,
            f"decode path up to {a['decode_threshold']}" if a["decode_threshold"] else None) if x)
    moe = layers.moe_backend(sc)
    out["MoE"] = f"{moe['method']} -> {moe['backend']}" if moe else "no MoE layers"
    for lm in f["linear_methods"]:
        out[f"linear: {lm['method']}"] = f"{lm['layers']} layers: {lm['kernels']}"
    return out


def compare_scenarios(a: Scenario, b: Scenario) -> pd.DataFrame:
    """Aspect by aspect, side by side: columns aspect, the two GPU names, changed (True where they differ)."""
    va, vb = aspects(a), aspects(b)
    names = [a.gpu.name, b.gpu.name if b.gpu.name != a.gpu.name else f"{b.gpu.name} (2)"]
    keys = list(va) + [k for k in vb if k not in va]
    rows = [{"aspect": k, names[0]: va.get(k, "-"), names[1]: vb.get(k, "-"), "changed": va.get(k) != vb.get(k)}
            for k in keys]
    return pd.DataFrame(rows, columns=["aspect", *names, "changed"])


def compare(cmd: str, gpu_a: str, gpu_b: str, gpu_count: int | None = None) -> pd.DataFrame:
    """The same serve command resolved by vLLM on ``gpu_a`` and on ``gpu_b`` (``gpu_count`` of each), diffed.

    Answers "what changes if I move from H100 to B200?": attention backend per layer kind, MoE backend,
    linear kernels, compile ranges, capture sizes, KV block size, scheduler defaults."""
    return compare_scenarios(load(cmd=cmd, gpu=gpu_a, gpu_count=gpu_count), load(cmd=cmd, gpu=gpu_b, gpu_count=gpu_count))


def format_text(df: pd.DataFrame, changed_only: bool = False) -> str:
    """The comparison as a table; ``changed_only`` keeps the rows that differ."""
    shown = df[df["changed"]] if changed_only else df
    body = shown.drop(columns=["changed"]).assign(aspect=[("* " if c else "  ") + a for a, c in
                                                          zip(shown["aspect"], shown["changed"])])
    return body.to_string(index=False) + f"\n({int(df['changed'].sum())} of {len(df)} aspects differ; * marks them)"
