"""Every difference between the supported vLLM versions, and nothing else.

Other modules never test ``vllm.__version__``; they call a function here. Supported and verified in CI:
0.20.2 (the reference, runs on our H200) and 0.10.1.1 (the seed's version). Any other installed
version is tried with the newest code path and reported as unverified.
"""
from __future__ import annotations

import importlib.metadata

from .errors import DiagError
from .paths import ENVS, VENVS

SUPPORTED = ("0.20.2", "0.10.1.1")
REFERENCE = "0.20.2"


def installed() -> str | None:
    """The vLLM version installed in this Python environment, or None."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_verified(version: str | None = None) -> bool:
    """Whether diaglib's answers for this vLLM version are checked by its tests."""
    return (version or installed()) in SUPPORTED


def _legacy() -> bool:
    """True for the 0.10 line (VllmConfig 'level', V1 scheduler before async scheduling)."""
    v = installed() or ""
    return v.startswith("0.10.")


def venv_python(version: str):
    """The interpreter of the project's environment for ``version`` (scripts/venv.sh makes it)."""
    if not (ENVS / f"vllm-{version}.txt").exists():
        raise DiagError(f"vLLM {version} is not supported; supported: {', '.join(SUPPORTED)}")
    py = VENVS / f"vllm-{version}" / "bin" / "python"
    if not py.exists():
        raise DiagError(f"vLLM {version} is not installed here; create it with: scripts/venv.sh {version}")
    return py


# --- parsing ----------------------------------------------------------------------------------------

def flexible_argument_parser():
    """vLLM's own argument parser class (moved to vllm.utils.argparse_utils after 0.10)."""
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    return FlexibleArgumentParser


# --- the resolved configuration ---------------------------------------------------------------------

def compilation_summary(vllm_config) -> dict:
    """Compile mode, backend, graph mode, capture sizes, compile ranges and splitting ops."""
    cc = vllm_config.compilation_config
    capture = sorted(cc.cudagraph_capture_sizes or [])
    if _legacy():
        mode = {0: "NO_COMPILATION", 1: "DYNAMO_AS_IS", 2: "DYNAMO_ONCE", 3: "PIECEWISE"}.get(cc.level, str(cc.level))
        backend = "inductor" if cc.use_inductor else (cc.backend or "eager")
        ranges = _ranges([], vllm_config.scheduler_config.max_num_batched_tokens) if cc.level == 3 else []
        max_capture = cc.max_capture_size
    else:
        mode = cc.mode.name
        backend = cc.backend
        ranges = [(r.start, r.end) for r in cc.get_compile_ranges()] if cc.mode.value == 3 else []
        max_capture = cc.max_cudagraph_capture_size
    return {
        "compile_mode": mode,
        "compile_backend": backend,
        "cudagraph_mode": cc.cudagraph_mode.name if cc.cudagraph_mode is not None else "NONE",
        "cudagraph_capture_sizes": capture,
        "max_cudagraph_capture_size": max_capture,
        "compile_sizes": sorted(int(s) for s in (cc.compile_sizes or []) if str(s).isdigit()),
        "compile_ranges": ranges,
        "splitting_ops": list(cc.splitting_ops or []),
    }


def _ranges(endpoints: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """0.10.x compiles one dynamic-shape graph: a single range 1..max_num_batched_tokens."""
    edges = [0, *sorted(endpoints), max_tokens]
    return [(a + 1, b) for a, b in zip(edges, edges[1:]) if b > a]


def scheduler_summary(vllm_config) -> dict:
    """The scheduler knobs that decide what one step holds."""
    sc = vllm_config.scheduler_config
    async_ = bool(getattr(sc, "async_scheduling", False))
    cls = sc.scheduler_cls if _legacy() else sc.get_scheduler_cls()
    if not isinstance(cls, str):
        cls = f"{cls.__module__}.{cls.__qualname__}"
    return {
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "max_num_seqs": sc.max_num_seqs,
        "max_model_len": vllm_config.model_config.max_model_len,
        "chunked_prefill": bool(sc.enable_chunked_prefill),
        "async_scheduling": async_,
        "long_prefill_token_threshold": sc.long_prefill_token_threshold,
        "scheduler_cls": cls,
    }


def cache_summary(vllm_config) -> dict:
    c = vllm_config.cache_config
    return {
        "block_size": c.block_size,
        "gpu_memory_utilization": c.gpu_memory_utilization,
        "kv_cache_dtype": c.cache_dtype,
        "prefix_caching": bool(c.enable_prefix_caching),
    }


def attention_backend(vllm_config) -> str:
    """The attention backend class vLLM's selector picks for this model on the (real or what-if) GPU."""
    from vllm.config import set_current_vllm_config

    mc = vllm_config.model_config
    head_size = mc.get_head_size()
    with set_current_vllm_config(vllm_config):
        if _legacy():
            from vllm.attention.selector import get_attn_backend

            cls = get_attn_backend(head_size, mc.dtype, vllm_config.cache_config.cache_dtype,
                                   vllm_config.cache_config.block_size, use_mla=mc.use_mla)
        else:
            from vllm.v1.attention.selector import get_attn_backend

            cls = get_attn_backend(head_size, mc.dtype, vllm_config.cache_config.cache_dtype, use_mla=mc.use_mla)
    return cls.get_name()
