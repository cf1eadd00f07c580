"""How the compatibility layer finds what the installed vLLM offers: by an import, an attribute or a signature.

Callers never compare version strings; each concern module asks these helpers (once, cached) and names
the result as a flag. When none of the known spellings exists, :class:`VllmApiMissing` says in one line
which vLLM API was looked for, so a release nobody has tested fails clearly instead of with a traceback.
"""
from __future__ import annotations

import functools
import importlib
import inspect

from ..errors import DiagError
from .releases import installed


class VllmApiMissing(DiagError):
    """The installed vLLM has none of the APIs diaglib knows for one purpose."""


def _lookup(path: str):
    """``"pkg.module:Attr.sub"`` -> the object (ImportError / AttributeError when absent)."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


@functools.cache
def has(path: str) -> bool:
    """Whether ``"pkg.module:Attr.sub"`` exists in the installed vLLM (a module path alone: importable)."""
    try:
        _lookup(path)
        return True
    except (ImportError, AttributeError):
        return False


def first(what: str, *paths: str):
    """The first of ``paths`` that exists (newest API first); VllmApiMissing naming ``what`` otherwise."""
    for p in paths:
        try:
            return _lookup(p)
        except (ImportError, AttributeError):
            continue
    raise VllmApiMissing(f"vLLM {installed()} has no {what} (looked for {', '.join(paths)})")


@functools.cache
def takes(path: str, param: str) -> bool:
    """Whether the callable at ``path`` accepts a parameter named ``param``."""
    try:
        return param in inspect.signature(_lookup(path)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def _legacy() -> bool:
    """True for the 0.10 line. Being replaced, concern by concern, by what the installed vLLM has."""
    return (installed() or "").startswith("0.10.")
