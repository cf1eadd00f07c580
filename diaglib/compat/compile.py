"""Compile and CUDA-graph configuration: compile mode, ranges, capture sizes, and their serve flags."""
from __future__ import annotations

from .detect import _legacy


def compilation_summary(vllm_config) -> dict:
    """Compile mode, backend, graph mode, capture sizes, compile ranges and splitting ops."""
    cc = vllm_config.compilation_config
    capture = sorted(cc.cudagraph_capture_sizes or [])
    if _legacy():
        names = {0: "NO_COMPILATION", 1: "DYNAMO_AS_IS", 2: "DYNAMO_ONCE", 3: "PIECEWISE"}
        mode = f"{names.get(cc.level, '?')} (level {cc.level})"
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


def compile_target(vllm_config, num_tokens: int) -> tuple[str, tuple[int, int] | None]:
    """Which compiled graph a step of ``num_tokens`` (padded) runs: (kind, (start, end)).

    kind: "size" (a graph compiled for exactly this size), "range" (0.20: the compile range holding it),
    "dynamic" (0.10.x: the one dynamic-shape graph; its range is 1..max_num_batched_tokens by
    convention), "whole" (compiled without piecewise splitting) or "none" (no compilation).
    """
    cc = vllm_config.compilation_config
    sizes = [int(s) for s in (cc.compile_sizes or []) if str(s).isdigit()]
    if _legacy():
        if cc.level == 0:
            return "none", None
        if cc.level != 3:
            return "whole", None
        if num_tokens in sizes:
            return "size", (num_tokens, num_tokens)
        return "dynamic", (1, vllm_config.scheduler_config.max_num_batched_tokens)
    if cc.mode.value == 0:
        return "none", None
    if cc.mode.value != 3:
        return "whole", None
    from types import SimpleNamespace

    from vllm.compilation.piecewise_backend import PiecewiseBackend
    from vllm.config.utils import Range

    ranges = cc.get_compile_ranges()
    entries = {Range(start=s, end=s): Range(start=s, end=s) for s in sizes}
    entries.update({r: r for r in ranges})
    # PiecewiseBackend's own lookup, given the state its constructor builds from the config.
    backend = SimpleNamespace(compile_sizes=sizes, compile_ranges=ranges, range_entries=entries)
    hit = PiecewiseBackend._find_range_for_shape(backend, num_tokens)
    if hit is None:
        return "outside", None
    return ("size" if hit.is_single_size() and hit not in ranges else "range"), (hit.start, hit.end)


def capture_sizes_flag() -> str:
    """The serve flag that lists CUDA-graph capture sizes."""
    return "--cuda-graph-sizes" if _legacy() else "--cudagraph-capture-sizes"


def max_capture_size_flags(size: str) -> list[str]:
    """Serve flags for a largest capture size (0.10.x: one --cuda-graph-sizes value means 1, 2, 4, 8.. N)."""
    return ["--cuda-graph-sizes", size] if _legacy() else ["--max-cudagraph-capture-size", size]
