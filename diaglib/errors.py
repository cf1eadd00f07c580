"""The one exception type for bad user input (the CLI prints its message alone and exits 2), and how an
exception raised inside vLLM reads as vLLM's own refusal."""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path


class DiagError(Exception):
    """A problem with what the user gave us (a flag, a file, a name), stated in one line."""

    exit_code = 2


_RESOLVING = ("parse_serve_args", "create_config")  # diaglib.scenario: the user's command handed to vLLM


def vllm_refusal(exc: BaseException) -> str | None:
    """`vLLM refused: <its message> (where)` when vLLM's own code raised: one of its checks (an assert, a
    ValueError, NotImplementedError) anywhere, or any exception while it resolved the user's serve command."""
    frames = traceback.extract_tb(exc.__traceback__)
    vllm = sys.modules.get("vllm")
    where = getattr(vllm, "__path__", None)
    if not frames or not where:
        return None
    top = Path(next(iter(where))).resolve()
    last = Path(frames[-1].filename).resolve()
    ours = [f for f in frames if f"{os.sep}diaglib{os.sep}" in f.filename]
    if isinstance(exc, OSError) and any(Path(f.filename).resolve().is_relative_to(top) for f in frames):
        # vLLM (or transformers on its behalf) could not read a file of the model folder, e.g. a multimodal
        # model's preprocessor_config.json: a property of the user's folder, said in one line.
        text = " ".join(str(exc).split())[:300]
        return f"vLLM could not read the model's files: {text} ({last.name}:{frames[-1].lineno})"
    importing = [f for f in frames if f.name == "<module>" and Path(f.filename).resolve().is_relative_to(top)]
    if importing and isinstance(exc, (TypeError, SyntaxError, ImportError, AttributeError, NameError)):
        # one of vLLM's own modules does not import here (e.g. syntax of a newer Python than this one)
        rel = Path(importing[-1].filename).resolve().relative_to(top).as_posix()
        text = " ".join(str(exc).split())[:300]
        return (f"vLLM cannot import its module vllm/{rel}:{importing[-1].lineno} on Python "
                f"{sys.version.split()[0]}: {type(exc).__name__}: {text}")
    resolving = any(f.name in _RESOLVING and f.filename.endswith("scenario.py") for f in ours)
    reader = _config_reader(last)
    if resolving and reader and any(Path(f.filename).resolve().is_relative_to(top) for f in frames):
        # transformers (or huggingface_hub) refused the model's config.json while vLLM read it for the command
        text = " ".join(str(exc).split())[:300]
        return (f"the model's config.json does not read as vLLM reads it: {type(exc).__name__}: {text} "
                f"({reader}/{last.name}:{frames[-1].lineno}, on vLLM's behalf)")
    if not last.is_relative_to(top):
        return None
    if not resolving and not isinstance(exc, (AssertionError, ValueError, NotImplementedError)):
        return None
    asked = f", asked by diaglib's {ours[-1].name}" if ours else ""
    text = " ".join(str(exc).split())
    text = text if isinstance(exc, (AssertionError, ValueError)) and text else f"{type(exc).__name__}: {text}"
    return f"vLLM refused: {text} (vllm/{last.relative_to(top).as_posix()}:{frames[-1].lineno}{asked})"


def _config_reader(path: Path) -> str | None:
    """The library vLLM reads a model's config with that ``path`` belongs to (transformers, huggingface_hub)."""
    for name in ("transformers", "huggingface_hub"):
        where = getattr(sys.modules.get(name), "__path__", None)
        if where and path.is_relative_to(Path(next(iter(where))).resolve()):
            return name
    return None
