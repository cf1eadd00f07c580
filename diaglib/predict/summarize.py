"""What `diaglib show` prints: the parts of vLLM's resolved config that decide token-boundary behaviour."""
from __future__ import annotations

from .. import compat
from ..scenario import Scenario


def config_summary(sc: Scenario) -> dict:
    """The configuration parts of the summary (compile, graphs, scheduler, KV cache, parallelism), read off
    vLLM's resolved config: what `diaglib show` says without building the model."""
    cfg = sc.vllm_config
    pc = cfg.parallel_config
    mc = cfg.model_config
    from vllm.platforms import current_platform as plat

    return {
        "scenario": sc.name,
        "command": sc.command,
        "vllm_version": sc.vllm_version,
        "vllm_verified": sc.verified,
        "vllm_why": sc.vllm_why,
        "gpu": {"name": plat.get_device_name(), "count": sc.gpu.count,
                "memory_mib": plat.get_device_total_memory() // (1 << 20),
                "capability": "{}.{}".format(*plat.get_device_capability()), "simulated": sc.simulated},
        "model": {"path": str(sc.model_dir), "architecture": (mc.architectures or ["?"])[0],
                  "dtype": str(mc.dtype).removeprefix("torch."), "max_model_len": mc.max_model_len},
        "compilation": compat.compilation_summary(cfg),
        "model_runner": compat.runner_kind(cfg),
        "scheduler": compat.scheduler_summary(cfg),
        "cache": compat.cache_summary(cfg),
        "parallel": {"tensor_parallel_size": pc.tensor_parallel_size,
                     "pipeline_parallel_size": pc.pipeline_parallel_size,
                     "data_parallel_size": pc.data_parallel_size,
                     "enable_expert_parallel": bool(pc.enable_expert_parallel)},
        "quantization": getattr(mc, "quantization", None),
    }


def summarize(sc: Scenario) -> dict:
    """A JSON-ready summary of the resolved scenario, read off vLLM's own objects."""
    from . import architecture
    from .layers import moe_backend
    from .memory import weights_total_bytes

    arch = architecture.facts(sc)
    usable = int(sc.gpu.memory_bytes * sc.vllm_config.cache_config.gpu_memory_utilization)
    weights = weights_total_bytes(sc)
    return {**config_summary(sc), "attention_backend": architecture.attention_summary(arch),
            "moe": moe_backend(sc), "weights": {"bytes_per_gpu": weights, "usable_bytes_per_gpu": usable,
                                                "fit": weights < usable}, "architecture": arch}


def format_text(s: dict) -> str:
    """The summary as an aligned, human-readable block."""
    c, sch, cache, par, moe = s["compilation"], s["scheduler"], s["cache"], s["parallel"], s["moe"]
    gpu = s["gpu"]
    caps = c["cudagraph_capture_sizes"]
    rows = [
        ("scenario", s["scenario"]),
        ("command", s["command"]),
        ("vLLM", s["vllm_version"] + f" ({s['vllm_why']})"
         + ("" if s["vllm_verified"] else "  UNVERIFIED: not covered by diaglib's tests")),
        ("GPU", f"{gpu['count']} x {gpu['name']} ({gpu['memory_mib']} MiB, sm {gpu['capability']})"
                + ("  [what-if: no GPU here]" if gpu["simulated"] else "")),
        ("model", f"{s['model']['architecture']} {s['model']['dtype']}, max_model_len {s['model']['max_model_len']}"),
        ("compile", f"mode {c['compile_mode']}, backend {c['compile_backend']}"),
        ("compile ranges", ", ".join(f"[{a}, {b}]" for a, b in c["compile_ranges"])
         + (" (one dynamic-shape graph)" if len(c["compile_ranges"]) == 1 else "") or "none"),
        ("compile sizes", ", ".join(map(str, c["compile_sizes"])) or "none"),
        ("cudagraph mode", c["cudagraph_mode"]),
        ("capture sizes", f"{len(caps)} sizes, max {c['max_cudagraph_capture_size']}: {_runs(caps)}"),
        ("splitting ops", ", ".join(c["splitting_ops"])),
        ("model runner", s["model_runner"]),
        ("scheduler", (f"{sch['scheduler_cls'].rsplit('.', 1)[-1]}, max_num_batched_tokens {sch['max_num_batched_tokens']}, "
                      f"max_num_seqs {sch['max_num_seqs']}, chunked prefill {_onoff(sch['chunked_prefill'])}, "
                      f"async {_onoff(sch['async_scheduling'])}")),
        ("KV cache", (f"block_size {cache['block_size']}, gpu_memory_utilization {cache['gpu_memory_utilization']}, "
                     f"dtype {cache['kv_cache_dtype']}, prefix caching {_onoff(cache['prefix_caching'])}")),
        ("parallel", (f"TP {par['tensor_parallel_size']}, PP {par['pipeline_parallel_size']}, "
                     f"DP {par['data_parallel_size']}, EP {_onoff(par['enable_expert_parallel'])}")),
        ("quantization", s["quantization"] or "none"),
        ("attention", s["attention_backend"]),
        ("MoE", f"{moe['method']} -> {moe['backend']}" if moe else "no MoE layers"),
    ]
    if "weights" in s:
        w = s["weights"]
        text = (f"{w['bytes_per_gpu'] / 2**30:,.1f} GiB per GPU of {w['usable_bytes_per_gpu'] / 2**30:,.1f} GiB "
                "usable (x gpu_memory_utilization)")
        if not w["fit"]:
            text += ("  DOES NOT FIT: vLLM would stop at start-up, loading the model (more GPUs and a larger TP, "
                     "or a smaller checkpoint)")
        rows.append(("weights", text))
    if "architecture" in s:
        from .architecture import format_lines

        rows += format_lines(s["architecture"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _runs(sizes: list[int]) -> str:
    """1, 2, 4, 8..256 step 8, 272..512 step 16: capture sizes as arithmetic runs."""
    out, i = [], 0
    while i < len(sizes):
        j = i
        while j + 2 < len(sizes) and sizes[j + 1] - sizes[j] == sizes[j + 2] - sizes[j + 1]:
            j += 1
        if j > i:
            j += 1
            out.append(f"{sizes[i]}..{sizes[j]} step {sizes[i + 1] - sizes[i]}")
        else:
            out.append(str(sizes[i]))
        i = j + 1
    return ", ".join(out)
