"""What a live run shows: NVML memory timeline, the memory figures vLLM logs, the torch allocator's state,
and a kernel-launch table from a torch profiler trace with the MoE kernels picked out."""
from __future__ import annotations

import gzip
import json
import re
import threading
import time
from pathlib import Path

import pandas as pd

GiB = 1 << 30

# --- NVML ------------------------------------------------------------------------------------------


def gpu_count() -> int:
    """GPUs NVML sees on this host (0 without NVML or a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


class NvmlTimeline:
    """Samples one GPU's used memory (MiB) every ``period`` seconds in a thread; a no-op without NVML."""

    def __init__(self, index: int | None, period: float = 0.1):
        self.index, self.period = index, period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "NvmlTimeline":
        if self.index is None:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:
            return self
        t0 = time.monotonic()

        def loop():
            while not self._stop.is_set():
                try:
                    used = pynvml.nvmlDeviceGetMemoryInfo(handle).used >> 20
                except Exception:
                    break
                self.samples.append((round(time.monotonic() - t0, 3), int(used)))
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def downsampled(self, n: int = 200) -> list[tuple[float, int]]:
        """At most ``n`` samples, always keeping the peak and the last one."""
        s = self.samples
        if len(s) <= n:
            return list(s)
        step = len(s) / n
        keep = {int(i * step) for i in range(n)} | {len(s) - 1, max(range(len(s)), key=lambda i: s[i][1])}
        return [s[i] for i in sorted(keep)]


# --- what vLLM logs ----------------------------------------------------------------------------------

_NUM = r"([0-9][0-9,]*\.?[0-9]*)"
_FIGURES = {
    "weights_gib": rf"Model loading took {_NUM} GiB",
    "weights_load_s": rf"Model loading took {_NUM} GiB(?: memory)? and {_NUM} seconds",
    "kv_cache_gib": rf"Available KV cache memory: {_NUM} GiB",
    "kv_cache_tokens": rf"GPU KV cache size: {_NUM} tokens",
    "max_concurrency": rf"Maximum concurrency for {_NUM} tokens per request: {_NUM}x",
    "graph_capture_s": rf"Graph capturing finished in {_NUM} secs",
    "graph_pool_gib": rf"Graph capturing finished in {_NUM} secs, took {_NUM} GiB",
    "graph_pool_estimated_gib": rf"CUDA graph pool memory: {_NUM} GiB \(actual\), {_NUM} GiB \(estimated\)",
    "graph_estimate_gib": rf"Estimated CUDA graph memory: {_NUM} GiB total",
    "init_engine_s": rf"init engine \(profile, create kv cache, warmup model\) took {_NUM} s",
    "compile_s": rf"init engine .*? took {_NUM} s \(compilation: {_NUM} s",
    "torch_compile_s": rf"torch\.compile takes {_NUM} s in total",
    "load_weights_s": rf"Loading weights took {_NUM} seconds",
}
# which group holds the figure (the last one of a pattern with two numbers, except where named)
_GROUP = {"weights_load_s": 2, "max_concurrency": 2, "graph_pool_gib": 2, "graph_pool_estimated_gib": 2,
          "compile_s": 2}
_TEXT = {"moe_backend": r"(Using \S+ (?:Fp8|Unquantized|Int8|NvFp4|Mxfp4|MxFp8|WNA16) MoE backend[^\n]*)",
         "moe_config": r"(Using (?:default )?(?:MoE )?config[^\n]*MoE layer[^\n]*)",
         "attention_backend": r"(Using \S*(?:FLASH|Flash|FLASHINFER|TRITON_ATTN|Attention|MLA)\S* (?:attention )?backend[^\n]*)"}


def logged_figures(log: str) -> dict:
    """The memory and time figures vLLM logged during start-up (the first of each), as numbers."""
    out: dict = {}
    for name, pattern in _FIGURES.items():
        m = re.search(pattern, log)
        if m:
            out[name] = float(m.group(_GROUP.get(name, 1)).replace(",", ""))
    for name, pattern in _TEXT.items():
        m = re.search(pattern, log)
        if m:
            out[name] = m.group(1).strip()[:300]
    return out


# --- the torch allocator (child side) ----------------------------------------------------------------

def memory_summary() -> dict:
    """Allocator figures now and since the last peak reset, and the snapshot's segments by pool.

    Works after a CUDA fault too (the allocator's state is host-side); device queries are skipped then.
    """
    import torch

    out: dict = {}
    try:
        st = torch.cuda.memory_stats()
        out.update(allocated_gib=st.get("allocated_bytes.all.current", 0) / GiB,
                   peak_allocated_gib=st.get("allocated_bytes.all.peak", 0) / GiB,
                   reserved_gib=st.get("reserved_bytes.all.current", 0) / GiB,
                   peak_reserved_gib=st.get("reserved_bytes.all.peak", 0) / GiB,
                   alloc_retries=st.get("num_alloc_retries", 0), ooms=st.get("num_ooms", 0))
    except Exception as e:  # noqa: BLE001 - a broken context must not hide the probe's outcome
        out["stats_error"] = f"{type(e).__name__}: {e}"[:200]
    try:
        segs = torch.cuda.memory_snapshot()
        pools: dict[str, list[float]] = {}
        for s in segs:
            key = "graph_pool" if s.get("segment_pool_id", (0, 0)) != (0, 0) else s.get("segment_type", "?")
            p = pools.setdefault(key, [0, 0.0, 0.0])
            p[0] += 1
            p[1] += s.get("total_size", 0) / GiB
            p[2] += s.get("allocated_size", 0) / GiB
        out["segments"] = {k: {"n": n, "reserved_gib": round(r, 4), "allocated_gib": round(a, 4)}
                           for k, (n, r, a) in pools.items()}
    except Exception as e:  # noqa: BLE001
        out["snapshot_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


# --- profiler kernel table ---------------------------------------------------------------------------

# By name: routing, permutation, grouped GEMMs and un-permutation of the fused-MoE paths (Triton, CUTLASS).
MOE_KERNEL = re.compile(r"moe|expert|group_gemm|grouped|topk|permute|expandInputRows|finalizeMoe|"
                        r"problem_sizes|align_block|shuffle_rows", re.I)


def kernel_table(trace: str | Path | dict) -> pd.DataFrame:
    """Kernel launches of a torch profiler chrome trace, grouped by (name, grid, block).

    Columns: name, grid, block, launches, total_us, mean_us, moe (name looks like a MoE kernel).
    """
    if isinstance(trace, dict):
        data = trace
    else:
        p = Path(trace)
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt") as f:
            data = json.load(f)
    rows = []
    for ev in data.get("traceEvents", []):
        if ev.get("cat") != "kernel":
            continue
        args = ev.get("args", {})
        rows.append((ev.get("name", "?"), str(args.get("grid")), str(args.get("block")), float(ev.get("dur", 0))))
    df = pd.DataFrame(rows, columns=["name", "grid", "block", "dur_us"])
    if df.empty:
        return pd.DataFrame(columns=["name", "grid", "block", "launches", "total_us", "mean_us", "moe"])
    g = df.groupby(["name", "grid", "block"], as_index=False).agg(launches=("dur_us", "size"),
                                                                  total_us=("dur_us", "sum"))
    g["mean_us"] = g.total_us / g.launches
    g["moe"] = g.name.str.contains(MOE_KERNEL)
    return g.sort_values("total_us", ascending=False, ignore_index=True)
