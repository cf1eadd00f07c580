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


@cache
def catalog() -> dict[str, dict]:
    """The known GPUs by name."""
    raw = json.loads((DATA / "gpus.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def gpu_spec(name: str, count: int = 1, memory_mib: int | None = None) -> GpuSpec:
    """Look a GPU up by name (case and an 'NVIDIA ' prefix optional)."""
    wanted = name.strip().lower().removeprefix("nvidia ").strip()
    for known, spec in catalog().items():
        if known.lower().removeprefix("nvidia ") == wanted:
            if count < 1:
                raise DiagError(f"GPU count must be at least 1, not {count}")
            return GpuSpec(known, tuple(spec["capability"]), memory_mib or spec["memory_mib"], spec["sms"], count)
    raise DiagError(f"unknown GPU {name!r}; known: {', '.join(catalog())} (add it to data/gpus.json)")
