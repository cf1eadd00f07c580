"""vLLM's own settings (``VLLM_*`` variables) for one answer: set for a block, the answers vLLM keeps per
process from them recomputed on the way in and out (vllm.envs' getter once its cache is on, the functools caches
of vllm.utils' DeepGEMM and FlashInfer probes, which ones this vLLM has)."""
from __future__ import annotations

import contextlib
import os
import sys


def _forget() -> None:
    """Drop what vLLM kept (only in modules already imported: importing them here would fix vLLM's platform)."""
    envs = sys.modules.get("vllm.envs")
    if envs is not None and hasattr(getattr(envs, "__getattr__", None), "cache_clear"):
        envs.__getattr__.cache_clear()
    for name in ("vllm.utils.deep_gemm", "vllm.utils.flashinfer"):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        for fn in list(vars(mod).values()):
            if callable(getattr(fn, "cache_clear", None)) and getattr(fn, "__module__", None) == name:
                fn.cache_clear()


@contextlib.contextmanager
def with_env(env: dict[str, str]):
    """Set env vars for the block, restoring the previous values after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def vllm_env(env: dict[str, str]):
    """The block runs with ``env``'s VLLM_* settings (others are ignored) as vLLM would read them at start-up."""
    try:
        with with_env({k: str(v) for k, v in env.items() if k.startswith("VLLM_")}):
            _forget()
            yield
    finally:
        _forget()
