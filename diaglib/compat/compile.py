"""Compile and CUDA-graph configuration: compile mode, ranges, capture sizes, and their serve flags.

Eras (decided by what the installed vLLM has):
- compile mode: ``CompilationConfig.level`` (int, names in ``CompilationLevel``) up to 0.10.2;
  ``.mode`` (``CompilationMode``) from 0.11.2 (``level`` kept, deprecated, until 0.17.1).
- compile backend: ``use_inductor`` decides at level PIECEWISE up to 0.10.2; ``backend`` from 0.11.2.
- graph mode: ``cudagraph_mode`` from 0.10.1; 0.10.0 has ``use_cudagraph`` / ``full_cuda_graph`` (derived).
- compile ranges: ``get_compile_ranges()`` from 0.13.0 (split points; ``compile_ranges_endpoints`` from 0.18);
  before, one dynamic-shape graph, shown as the range 1..max_num_batched_tokens.
- largest capture size: ``max_capture_size`` up to 0.10.2, ``max_cudagraph_capture_size`` from 0.11.2.
- capture-size flags: ``--cudagraph-capture-sizes`` / ``--max-cudagraph-capture-size`` from 0.11.2;
  ``--cuda-graph-sizes`` (a scheduler field) up to 0.11.2, where one value N means [1, 2, 4] + 8..N step 8.
"""
from __future__ import annotations

import functools

from .detect import field_default, fields, first, has
from .parsing import serve_options

_CC = "vllm.config:CompilationConfig"


@functools.cache
def has_compilation_mode() -> bool:
    """CompilationConfig.mode (a CompilationMode) instead of the integer level."""
    return "mode" in fields(_CC)


@functools.cache
def has_cudagraph_mode() -> bool:
    """CompilationConfig.cudagraph_mode (a CUDAGraphMode) instead of use_cudagraph / full_cuda_graph."""
    return "cudagraph_mode" in fields(_CC)


@functools.cache
def has_compile_ranges() -> bool:
    """Piecewise graphs compiled per range of token counts (CompilationConfig.get_compile_ranges)."""
    return has(f"{_CC}.get_compile_ranges")


@functools.cache
def inductor_by_flag() -> bool:
    """Whether ``use_inductor`` (not ``backend``) picks Inductor for piecewise compilation."""
    return "use_inductor" in fields(_CC) and field_default(_CC, "use_inductor") is True


@functools.cache
def _vllm_compile_value() -> int:
    """The mode/level number of vLLM's own piecewise compilation (VLLM_COMPILE / PIECEWISE)."""
    return int(first("vLLM's piecewise compile mode", "vllm.config.compilation:CompilationMode.VLLM_COMPILE",
                     "vllm.config:CompilationLevel.PIECEWISE"))


def compile_level(cc) -> int:
    """The compile mode as a number: 0 none, 1 stock torch.compile, 2 Dynamo once, 3 vLLM's piecewise."""
    return int(cc.mode if has_compilation_mode() else cc.level or 0)


def is_piecewise(cc) -> bool:
    return compile_level(cc) == _vllm_compile_value()


def _mode_name(cc) -> str:
    if has_compilation_mode():
        return cc.mode.name
    levels = first("compilation levels", "vllm.config:CompilationLevel")
    names = {v: k for k, v in vars(levels).items() if isinstance(v, int) and not k.startswith("_")}
    return f"{names.get(compile_level(cc), '?')} (level {compile_level(cc)})"


def cudagraph_mode_name(vllm_config) -> str:
    """The configured CUDA-graph mode's name (before the model runner resolves it against attention).

    0.10.0 has no CUDAGraphMode: its GPUModelRunner captures piecewise graphs when compiling piecewise
    with use_cudagraph and without enforce_eager, whole-model graphs with full_cuda_graph (derived)."""
    cc = vllm_config.compilation_config
    if has_cudagraph_mode():
        return cc.cudagraph_mode.name if cc.cudagraph_mode is not None else "NONE"
    if is_piecewise(cc) and cc.use_cudagraph and not vllm_config.model_config.enforce_eager:
        return "FULL" if cc.full_cuda_graph else "PIECEWISE"
    return "NONE"


def max_capture_size(cc) -> int:
    return cc.max_cudagraph_capture_size if "max_cudagraph_capture_size" in fields(_CC) else cc.max_capture_size


def compile_ranges(vllm_config) -> list[tuple[int, int]]:
    """The token ranges piecewise graphs are compiled for (before 0.13.0: one dynamic-shape graph)."""
    cc = vllm_config.compilation_config
    if not is_piecewise(cc):
        return []
    if has_compile_ranges():
        return [(r.start, r.end) for r in cc.get_compile_ranges()]
    return [(1, vllm_config.scheduler_config.max_num_batched_tokens)]


def _compile_sizes(cc) -> list[int]:
    return sorted(int(s) for s in (cc.compile_sizes or []) if str(s).isdigit())


def compilation_summary(vllm_config) -> dict:
    """Compile mode, backend, graph mode, capture sizes, compile ranges and splitting ops."""
    cc = vllm_config.compilation_config
    if inductor_by_flag():
        backend = "inductor" if cc.use_inductor else (cc.backend or "eager")
    else:
        backend = cc.backend
    return {
        "compile_mode": _mode_name(cc),
        "compile_backend": backend,
        "cudagraph_mode": cudagraph_mode_name(vllm_config),
        "cudagraph_capture_sizes": sorted(cc.cudagraph_capture_sizes or []),
        "max_cudagraph_capture_size": max_capture_size(cc),
        "compile_sizes": _compile_sizes(cc),
        "compile_ranges": compile_ranges(vllm_config),
        "splitting_ops": list(cc.splitting_ops or []),
    }


def compile_target(vllm_config, num_tokens: int) -> tuple[str, tuple[int, int] | None]:
    """Which compiled graph a step of ``num_tokens`` (padded) runs: (kind, (start, end)).

    kind: "size" (a graph compiled for exactly this size), "range" (the compile range holding it, vLLM's
    PiecewiseBackend lookup), "dynamic" (before compile ranges: the one dynamic-shape graph, shown as
    1..max_num_batched_tokens), "whole" (compiled without piecewise splitting), "none" (no compilation)
    or "outside" (no compiled range holds it).
    """
    cc = vllm_config.compilation_config
    if compile_level(cc) == 0:
        return "none", None
    if not is_piecewise(cc):
        return "whole", None
    sizes = _compile_sizes(cc)
    if not has_compile_ranges():
        if num_tokens in sizes:
            return "size", (num_tokens, num_tokens)
        return "dynamic", (1, vllm_config.scheduler_config.max_num_batched_tokens)
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
    return "--cudagraph-capture-sizes" if "--cudagraph-capture-sizes" in serve_options() else "--cuda-graph-sizes"


def max_capture_size_flags(size: str) -> list[str]:
    """Serve flags for a largest capture size (with only --cuda-graph-sizes, one value N means 1, 2, 4, 8.. N)."""
    if "--max-cudagraph-capture-size" in serve_options():
        return ["--max-cudagraph-capture-size", size]
    return ["--cuda-graph-sizes", size]
