"""The GPU catalog (data/gpus.json): what a named GPU reports to vLLM."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

from .errors import DiagError
from .paths import DATA


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model as NVML and torch describe it, times how many the host has."""

    name: str
    capability: tuple[int, int]
    memory_mib: int
    sms: int
    count: int = 1

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024 * 1024

    @property
    def shared_memory_per_block_optin(self) -> int:
        """The most shared memory one block may opt in to, by compute capability (CUDA C++ Programming Guide,
        "Technical Specifications per Compute Capability": 163 KB on 8.0, 227 KB on 9.0 and 10.x, 99 KB on
        8.6, 8.7, 8.9 and 12.x); kernels size their tiles by it (Triton's MXFP4 MoE matmul asks torch)."""
        kb = {(8, 0): 163, (9, 0): 227, (10, 0): 227, (10, 3): 227}.get(tuple(self.capability), 99)
        return kb * 1024


@cache
def catalog() -> dict[str, dict]:
    """The known GPUs by name."""
    raw = json.loads((DATA / "gpus.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def gpu_spec(name: str, count: int = 1, memory_mib: int | None = None) -> GpuSpec:
    """Look a GPU up by name: case and an 'NVIDIA ' prefix optional; a unique start of a catalog name will do
    ("H100" -> "NVIDIA H100 80GB HBM3")."""
    if not isinstance(name, str):
        raise DiagError(f"a GPU is named by text (e.g. \"NVIDIA H200\"), not {name!r}")
    wanted = _key(name)
    names = {_key(known): known for known in catalog()}
    known = names.get(wanted)
    if known is None:
        starts = [k for key, k in names.items() if wanted and key.startswith(wanted)]
        if len(starts) > 1:
            raise DiagError(f"GPU {name!r} is ambiguous: {', '.join(starts)}")
        known = starts[0] if starts else None
    if known is None:
        raise DiagError(f"unknown GPU {name!r}; known: {', '.join(catalog())} (add it to data/gpus.json)")
    for what, v in (("GPU count", count), ("GPU memory (MiB)", memory_mib)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise DiagError(f"{what} must be a whole number, not {v!r}")
    if count < 1:
        raise DiagError(f"GPU count must be at least 1, not {count}")
    if memory_mib is not None and memory_mib < 1:
        raise DiagError(f"GPU memory must be at least 1 MiB, not {memory_mib}")
    spec = catalog()[known]
    return GpuSpec(known, tuple(spec["capability"]), memory_mib or spec["memory_mib"], spec["sms"], count)


def _key(name: str) -> str:
    return name.strip().lower().removeprefix("nvidia ").strip()
