"""The vLLM releases diaglib supports, which one is installed here, and where the project keeps the others."""
from __future__ import annotations

import functools
import importlib.metadata
import re

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


@functools.cache
def requirements() -> dict[str, str]:
    """What the installed vLLM's package metadata requires here: distribution -> version specifier (extras
    left out, environment markers evaluated for this Python), e.g. {"flashinfer-python": "==0.6.8.post1"}."""
    from packaging.requirements import InvalidRequirement, Requirement

    out = {}
    for text in importlib.metadata.requires("vllm") or () if installed() else ():
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out[req.name] = str(req.specifier)
    return out


_FAILED_IMPORT = re.compile(r"No module named '([\w.]+)'|cannot import name '(\w+)' from '([\w.]+)'")


def failed_import(message: str) -> tuple[str, str | None] | None:
    """(module, the name it lacks or None) of an import error's message ("No module named 'x'", "cannot import
    name 'y' from 'x'"), else None."""
    m = _FAILED_IMPORT.search(message or "")
    if m is None:
        return None
    return (m.group(1), None) if m.group(1) else (m.group(3), m.group(2))


def required_by_module(module: str) -> tuple[str, str] | None:
    """(distribution, specifier) when the top-level ``module`` comes from a distribution vLLM requires, else None.
    Read off this environment's installed distributions; where none provides the module (the environment that
    lacks it), by the naming convention of PyPI names: the module itself, or ``MODULE-python`` / ``python-MODULE``
    (flashinfer from flashinfer-python)."""
    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    top = module.split(".")[0]
    need = {norm(k): (k, v) for k, v in requirements().items()}
    provided = importlib.metadata.packages_distributions().get(top, ())
    for dist in provided:
        hit = need.get(norm(dist))
        if hit:
            return hit
    if provided:
        return None
    return next((need[n] for n in (norm(top), f"{norm(top)}-python", f"python-{norm(top)}") if n in need), None)
