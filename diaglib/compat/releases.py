"""The vLLM releases diaglib supports, which one is installed here, and where the project keeps the others."""
from __future__ import annotations

import functools
import importlib.metadata

from ..errors import DiagError
from ..paths import ENVS, VENVS

REFERENCE = "0.20.2"  # runs on our H200
CI = ("0.10.1.1", "0.20.2", "0.33.0")  # the seed's, the reference, the newest: the full suite runs under each


def supported() -> tuple[str, ...]:
    """Every supported release, oldest first: the newest patch of each minor line (one envs/vllm-X.txt each)."""
    def key(v: str):
        return tuple(int(p) for p in v.split("."))

    return tuple(sorted((p.stem.removeprefix("vllm-") for p in ENVS.glob("vllm-*.txt")), key=key))


@functools.cache
def installed() -> str | None:
    """The vLLM version installed in this Python environment, or None (read once: ~2 ms a lookup)."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_verified(version: str | None = None) -> bool:
    """Whether diaglib's answers for this vLLM version are checked by its tests (the version matrix)."""
    return (version or installed()) in supported()


def venv_python(version: str):
    """The interpreter of the project's environment for ``version`` (scripts/venv.sh makes it)."""
    if version not in supported():
        raise DiagError(f"vLLM {version} is not supported; supported: {', '.join(supported())}")
    py = VENVS / f"vllm-{version}" / "bin" / "python"
    if not py.exists():
        raise DiagError(f"vLLM {version} is not installed here; create it with: scripts/venv.sh {version}")
    return py
