"""How vLLM runs one step of N tokens: the padded size, the CUDA-graph runtime mode, the compiled graph.

Answers come from vLLM's own code: its CudagraphDispatcher (keys set up as the model runner does after
resolving the graph mode against the attention backend; the V2 runner's CudaGraphManager where vLLM runs
that one), its padding, and its piecewise backend's compile-range lookup. Version differences live in
diaglib.compat (cudagraphs, compile).
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable

import pandas as pd

from .. import compat
from ..errors import DiagError

_DISPATCHERS: dict[int, tuple[object, object]] = {}


def _config(target):
    """A Scenario or a VllmConfig -> the VllmConfig."""
    return getattr(target, "vllm_config", target)


def dispatcher(target) -> compat.GraphDispatch:
    """vLLM's CUDA-graph dispatch for this scenario/config (built once per config): ``.mode`` is the
    graph mode resolved against the attention backend, ``.runner`` the model runner (V1 / V2)."""
    cfg = _config(target)
    hit = _DISPATCHERS.get(id(cfg))
    if hit is None or hit[0] is not cfg:
        if len(_DISPATCHERS) > 256:
            _DISPATCHERS.clear()
        hit = _DISPATCHERS[id(cfg)] = (cfg, compat.cudagraph_dispatcher(cfg))
    return hit[1]


def derived_note(target) -> str | None:
    """What in this config's dispatch answers is diaglib's mirror of vLLM code (None: all vLLM's own)."""
    return compat.dispatch_derived(dispatcher(target))


def dispatch(target, num_tokens: int, *, num_reqs: int | None = None, max_query_len: int | None = None,
             decode: bool = False, has_prefill: bool | None = None) -> dict:
    """Padded size, CUDA-graph runtime mode and compiled graph for a step of ``num_tokens`` tokens.

    The batch shape matters (a uniform decode batch may get a FULL graph where a mixed one gets
    PIECEWISE): give ``num_reqs`` and ``max_query_len`` (the most tokens any one request has in the
    step), or ``decode=True`` for ``num_tokens`` requests decoding one token each. Default: one request
    contributing all ``num_tokens`` (a prefill chunk). ``has_prefill`` (whether a request in the step is
    still prefilling; default: judged from the batch shape) matters to the V2 model runner only.
    """
    cfg = _config(target)
    gd = dispatcher(cfg)
    num_reqs, max_query_len = _batch_shape(cfg, num_tokens, num_reqs, max_query_len, decode, gd.uniform_query_len)
    num_tokens, num_reqs, max_query_len = int(num_tokens), int(num_reqs), int(max_query_len)
    padded, mode, uniform, desc = compat.dispatch_batch(gd, num_tokens, num_reqs, max_query_len,
                                                        False if decode else has_prefill)
    kind, rng = compat.compile_target(cfg, padded)
    return {
        "num_tokens": num_tokens,
        "num_reqs": num_reqs,
        "max_query_len": max_query_len,
        "uniform_decode": bool(uniform),
        "padded_tokens": int(padded),
        "padding": int(padded) - num_tokens,
        "cudagraph_mode": mode,
        "cudagraph_mode_config": gd.mode,
        "model_runner": gd.runner,
        "batch_descriptor": desc,
        "compile_kind": kind,
        "compile_range": rng,
        "vllm_version": compat.installed(),
        "derived": compat.dispatch_derived(gd),
    }


def dispatch_table(target, counts: Iterable[int], *, decode: bool = False) -> pd.DataFrame:
    """:func:`dispatch` for many token counts (single-request steps, or uniform decode steps), one row each."""
    rows = [dispatch(target, int(n), decode=decode) for n in counts]
    if not rows:
        raise DiagError("no token counts given")
    return pd.DataFrame(rows)


def _batch_shape(cfg, num_tokens, num_reqs, max_query_len, decode, uq) -> tuple[int, int]:
    budget = cfg.scheduler_config.max_num_batched_tokens
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 1:
        raise DiagError(f"a step needs at least 1 token, got {num_tokens!r}")
    if num_tokens > budget:
        raise DiagError(f"a step of {num_tokens} tokens cannot happen: max_num_batched_tokens is {budget}")
    if decode:
        if num_reqs is not None or max_query_len is not None:
            raise DiagError("give either decode=True or num_reqs/max_query_len, not both")
        if num_tokens % uq:
            raise DiagError(f"a uniform decode step has a multiple of {uq} tokens, not {num_tokens}")
        return num_tokens // uq, uq
    if num_reqs is None and max_query_len is None:
        return 1, num_tokens
    if num_reqs is None or max_query_len is None:
        raise DiagError("give both num_reqs and max_query_len (or neither)")
    if not 1 <= num_reqs <= num_tokens:
        raise DiagError(f"num_reqs must be between 1 and num_tokens ({num_tokens}), got {num_reqs}")
    if not 1 <= max_query_len <= num_tokens or max_query_len * num_reqs < num_tokens:
        raise DiagError(f"max_query_len {max_query_len} does not fit {num_reqs} requests sharing "
                        f"{num_tokens} tokens")
    if num_tokens - max_query_len < num_reqs - 1:
        raise DiagError(f"{num_reqs} requests cannot share {num_tokens} tokens with one holding {max_query_len}")
    return num_reqs, max_query_len
