"""Append-only JSONL store of live records: one line per engine start or probe.

Each record is written, flushed and fsynced before the next probe starts, so a crash or ``kill -9`` of
the driving process loses nothing already measured, and a re-run skips what the store already holds.
A torn line (the writer died mid-write) is skipped on reading and closed before the next append.
"""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from ..errors import DiagError
from ..secrets import REDACTED, SECRET_NAME, scrub

_LOCK = threading.Lock()
# Environment variables worth keeping in a record (everything else is left out, not just redacted).
_ENV_KEEP = re.compile(r"^(VLLM_|CUDA_|TORCH|PYTORCH_|NCCL_|TRITON_|HF_|TRANSFORMERS_|OMP_NUM_THREADS$)")


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """The vLLM/CUDA/torch-relevant part of an environment, with secret-looking values redacted."""
    out = {}
    for k in sorted(env):
        if not _ENV_KEEP.match(k):
            continue
        out[k] = REDACTED if SECRET_NAME.search(k) else scrub(str(env[k]))
    return out


def append(path: str | Path, record: Mapping) -> None:
    """Append one record as a JSON line and make it durable before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str, ensure_ascii=True, allow_nan=False) + "\n"
    with _LOCK:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line  # end a torn line left by a writer that died mid-write
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def read(path: str | Path) -> list[dict]:
    """All complete records, oldest first; torn lines (a writer killed mid-write) are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    if path.is_dir():
        raise DiagError(f"{path} is a folder, not a live-record file")
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def done_keys(path: str | Path, run: str) -> set[str]:
    """Keys of the probes of ``run`` the store already holds (any outcome)."""
    return {r["key"] for r in read(path) if r.get("type") == "probe" and r.get("run") == run}


_PROBE_COLUMNS = ["run", "key", "outcome", "detail", "kernel", "surfaced_at", "caller", "gpu", "engine_id",
                  "engine_seq", "engine_started", "engine_ready_s", "probe_s", "prompts", "total_tokens",
                  "n_steps", "observed_tokens", "observed_modes", "peak_allocated_gib", "nvml_peak_mib"]


def probes(records: Iterable[dict] | str | Path, run: str | None = None) -> pd.DataFrame:
    """One row per probe: outcome, timings and the observed per-step tokens (as tuples)."""
    recs = read(records) if isinstance(records, (str, Path)) else list(records)
    rows = []
    for r in recs:
        if r.get("type") != "probe" or (run is not None and r.get("run") != run):
            continue
        steps = r.get("steps") or []
        rows.append({
            **{k: r.get(k) for k in _PROBE_COLUMNS if k in r},
            "prompts": tuple(r.get("probe", {}).get("prompts", ())),
            "total_tokens": sum(r.get("probe", {}).get("prompts", ())),
            "n_steps": len(steps),
            "observed_tokens": tuple(s["total"] for s in steps),
            "observed_modes": tuple(f.get("mode") for f in r.get("forwards") or []),
            "peak_allocated_gib": (r.get("memory") or {}).get("peak_allocated_gib"),
            "nvml_peak_mib": max((m for _, m in r.get("nvml") or []), default=None),
        })
    return pd.DataFrame(rows, columns=_PROBE_COLUMNS)


def engines(records: Iterable[dict] | str | Path, run: str | None = None) -> pd.DataFrame:
    """One row per engine start: how long it took and the memory figures vLLM logged."""
    recs = read(records) if isinstance(records, (str, Path)) else list(records)
    rows = [{"run": r.get("run"), "engine_id": r.get("engine_id"), "gpu": r.get("gpu"),
             "outcome": r.get("outcome"), "ready_s": r.get("ready_s"), **(r.get("logged") or {})}
            for r in recs if r.get("type") == "engine" and (run is None or r.get("run") == run)]
    return pd.DataFrame(rows)
