"""How the compatibility layer finds what the installed vLLM offers: by an import, an attribute or a signature.

Callers never compare version strings; each concern module asks these helpers (once, cached) and names
the result as a flag (``has_compile_ranges()``). When none of the known spellings exists,
:class:`VllmApiMissing` says in one line which vLLM API was looked for, so a release nobody has tested
fails clearly instead of with a traceback.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect

from ..errors import DiagError
from .releases import installed


class VllmApiMissing(DiagError):
    """The installed vLLM has none of the APIs diaglib knows for one purpose."""


def missing(what: str, looked_for: str) -> VllmApiMissing:
    """The one-line error for an API this vLLM lacks."""
    return VllmApiMissing(f"vLLM {installed()} has no {what} (looked for {looked_for})")


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
    raise missing(what, ", ".join(paths))


@functools.cache
def takes(path: str, param: str) -> bool:
    """Whether the callable at ``path`` accepts a parameter named ``param``."""
    try:
        return param in inspect.signature(_lookup(path)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


@functools.cache
def fields(path: str) -> frozenset[str]:
    """The field names of the (pydantic or plain) dataclass at ``path``; empty when absent."""
    try:
        cls = _lookup(path)
    except (ImportError, AttributeError):
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else frozenset()


def field_default(path: str, name: str):
    """The declared default of dataclass field ``name`` at ``path`` (dataclasses.MISSING when none)."""
    f = next((f for f in dataclasses.fields(_lookup(path)) if f.name == name), None)
    if f is None:
        return dataclasses.MISSING
    default = f.default
    return getattr(default, "default", default)  # a pydantic Field(default=...) carries it inside


def _accepted(fn) -> set[str] | None:
    """The keyword names ``fn`` accepts (None: any). A class whose __init__ passes ``**kwargs`` on (e.g.
    AsyncScheduler to Scheduler) accepts what its bases' __init__ accept, up to the first without them."""
    def named(params):
        return {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def open_ended(params):
        return any(p.kind is p.VAR_KEYWORD for p in params.values())

    params = inspect.signature(fn).parameters
    names = named(params)
    if not open_ended(params):
        return names
    for base in (fn.__mro__[1:-1] if inspect.isclass(fn) else ()):  # not object
        if "__init__" in base.__dict__:
            params = inspect.signature(base.__dict__["__init__"]).parameters
            names |= named(params)
            if not open_ended(params):
                return names
    return None


@functools.lru_cache(maxsize=512)
def _signature(fn) -> tuple[inspect.Signature, set[str] | None]:
    """``fn``'s signature and the keywords it accepts, read once per callable (a sweep calls vLLM's
    constructors thousands of times)."""
    return inspect.signature(fn), _accepted(fn)


_BOUND: set[tuple] = set()  # (callable, positional count, keywords) that bound once: binding again says the same


def call(what: str, fn, /, *args, **kwargs):
    """``fn(*args, **kw)`` with only the keyword arguments its signature accepts (a release that lacks a
    parameter does not need it); a required parameter diaglib does not give -> VllmApiMissing naming it."""
    try:
        sig, accepted = _signature(fn)
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if accepted is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    shape = (fn, len(args), tuple(kwargs))
    if shape not in _BOUND:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            raise VllmApiMissing(f"vLLM {installed()}'s {what} does not take what diaglib gives: {e}") from None
        _BOUND.add(shape)
    return fn(*args, **kwargs)

