"""A persistent cache of answers, keyed by everything that decides them, read without importing vLLM.

An answer is kept under a key made of:

- the environment (:func:`environment`): the vLLM version and build (a hash of its installed RECORD), every
  installed distribution's name and version, diaglib's version and a hash of its own source and data
  catalogs (an edited checkout never serves an answer of the code before), the host's NVIDIA devices, and
  the ``VLLM_*`` settings vLLM reads (logging settings aside);
- what the caller names in ``parts``: for a CLI question (:func:`question`) the subcommand and its arguments,
  the scenario file's text (or the command), and the content of every JSON file in each model folder the
  command names (config.json and what vLLM reads beside it).

Entries are JSON files under :func:`root` (``$DIAGLIB_CACHE_DIR``, else ``$XDG_CACHE_HOME/diaglib``, else
``~/.cache/diaglib``), in ``answers/``; a value that is no JSON (a notebook's DataFrame) is kept pickled inside
one (the cache is the user's own, like joblib's). Only successful answers are stored; a corrupt entry counts as a miss.
Subcommands declare themselves with :func:`cacheable`; library code keeps results with :func:`memo`.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .paths import DATA, ROOT

FORMAT = 1  # bump when the layout of an entry changes
# VLLM_* settings that decide no answer: vLLM's logging, and what diaglib itself sets (scenario.prepare_vllm)
_QUIET_ENV = ("VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_CONFIG_PATH", "VLLM_LOGGING_STREAM",
              "VLLM_LOGGING_PREFIX", "VLLM_LOGGING_COLOR", "VLLM_NO_USAGE_STATS", "VLLM_CACHE_ROOT")


def root() -> Path:
    """diaglib's cache folder, by the platform's convention."""
    if os.environ.get("DIAGLIB_CACHE_DIR"):
        return Path(os.environ["DIAGLIB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diaglib"


def answers_dir() -> Path:
    return root() / "answers"


def cacheable(fn: Callable) -> Callable:
    """Mark a CLI subcommand whose one printed answer (JSON and text) may be kept and served again."""
    fn.cacheable = True
    return fn


# --- the key ----------------------------------------------------------------------------------------

def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@functools.cache
def source_hash() -> str:
    """A hash of diaglib's own source and the data its answers read: the catalogs (GPUs, known issues) and the
    model zoo's files (a log or a scenario may name a zoo model by its Hub name)."""
    h = hashlib.sha256()
    files = sorted((ROOT / "diaglib").rglob("*.py")) + sorted(DATA.glob("*.json")) + sorted(
        (DATA / "models").glob("*/*.json"))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def _installed() -> tuple[str, str]:
    """(vLLM version, hash of its RECORD), or ("", "") without vLLM; importlib.metadata only, no import."""
    import importlib.metadata as md

    try:
        dist = md.distribution("vllm")
    except md.PackageNotFoundError:
        return "", ""
    record = dist.read_text("RECORD") or ""
    meta = dist.read_text("METADATA") or ""
    return dist.version, _sha(record + meta)[:20]


@functools.cache
def _distributions() -> str:
    """A hash of every installed distribution (name-version.dist-info folders on sys.path)."""
    names = []
    for entry in sys.path:
        try:
            names += [n for n in os.listdir(entry or ".") if n.endswith((".dist-info", ".egg-info"))]
        except OSError:
            continue
    return _sha("\n".join(sorted(set(names))))[:20]


def _gpu_devices() -> list[str]:
    """The NVIDIA device nodes of this host and which of them are visible: tells a GPU host from a CPU box
    (and one GPU set from another) without loading NVML."""
    import glob

    return sorted(glob.glob("/dev/nvidia[0-9]*")) + [os.environ.get("CUDA_VISIBLE_DEVICES", "")]


@functools.cache
def _diaglib_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("diaglib")
    except md.PackageNotFoundError:
        return "unknown"


def environment() -> dict:
    """What, besides the question, decides every answer of this process."""
    vllm, build = _installed()
    return {"format": FORMAT, "vllm": vllm, "vllm_build": build, "distributions": _distributions(),
            "python": sys.version.split()[0], "diaglib": _diaglib_version(), "diaglib_source": source_hash()[:20],
            "gpu_devices": _gpu_devices(),
            "env": {k: v for k, v in sorted(os.environ.items())
                    if k.startswith("VLLM_") and k not in _QUIET_ENV}}


def model_files(folder: str | Path) -> dict[str, str]:
    """{file name: content hash} of the JSON files of a model folder (config.json and those beside it)."""
    d = Path(folder)
    return {f.name: file_hash(f) for f in sorted(d.glob("*.json")) if f.is_file()}


def model_id(folder: str | Path) -> str:
    """A model folder by its content (the hashes of its JSON files), wherever it lies."""
    return "model-files:" + _sha(json.dumps(model_files(folder), sort_keys=True))[:20]


def file_hash(path: str | Path) -> str:
    """The content hash of one file (a record's data that lives beside its store)."""
    return _sha(Path(path).read_bytes())[:20]


def key(namespace: str, parts: dict) -> str:
    """The cache key of ``parts`` in ``namespace`` for this environment."""
    blob = json.dumps({"namespace": namespace, "environment": environment(), "parts": parts}, sort_keys=True,
                      default=str)
    return _sha(blob)


def _model_words(command: str, models: dict[str, str]) -> tuple[list[str], list[tuple[int, str, Path]]]:
    """The serve argv, and (index, word, resolved folder) for each word of it that is a model folder (a scenario
    mapping, a local path or data/models/NAME), as scenario.load looks them up."""
    from .errors import DiagError
    from .scenario import resolve_model_dir, serve_argv

    argv, found = serve_argv(command), []
    for i, word in enumerate(argv[1:], 1):
        for w in {word, word.partition("=")[2]} - {""}:
            try:
                found.append((i, w, resolve_model_dir(w, models)))
            except (DiagError, OSError, ValueError):
                continue
    return argv, found


def command_models(command: str, models: dict[str, str]) -> dict[str, dict[str, str]]:
    """Every model folder a serve command may name: {resolved folder: model_files}."""
    return {str(d): model_files(d) for _, _, d in _model_words(command, models)[1]}


def command_content(command: str, models: dict[str, str] | None = None) -> dict:
    """A serve command as key parts that do not depend on where its model folders lie: the argv with each word
    naming a model folder replaced by the hash of that folder's files. Records copied elsewhere, with their
    model folders, find the answers kept for them."""
    argv, found = _model_words(command, models or {})
    argv = list(argv)
    for i, w, d in found:
        argv[i] = argv[i].replace(w, model_id(d))
    return {"argv": argv}


def question(args, exclude: tuple[str, ...] = ()) -> dict | None:
    """The key parts of a CLI question (argparse namespace), resolved without vLLM: the subcommand and its
    arguments, the scenario file's text or the command, and the model folders it names. None: not cacheable
    (no scenario can be read here; the command then runs and says why)."""
    from .errors import DiagError
    from .scenario import find_scenario, read_scenario_file

    skip = {"func", "json", "no_cache", "verbose", *exclude}
    asked = {k: v for k, v in sorted(vars(args).items()) if k not in skip and not k.startswith("_")}
    try:
        if getattr(args, "cmd", None) is not None:
            command, models, scenario = args.cmd, {}, None
        else:
            path = find_scenario(getattr(args, "scenario", None))
            data = read_scenario_file(path)
            command, scenario = data["command"], {"path": str(path), "text": _sha(path.read_bytes())}
            models = {k: str((path.parent / v).resolve()) for k, v in (data.get("models") or {}).items()
                      if isinstance(v, str)}
        return {"question": asked, "scenario": scenario, "command": command,
                "models": command_models(command, models)}
    except (DiagError, OSError, ValueError):
        return None


def bytecode_prefix() -> str | None:
    """Where to keep compiled bytecode when this Python would write none (PYTHONDONTWRITEBYTECODE is set, as in
    many containers, and no PYTHONPYCACHEPREFIX): importing vLLM from source every time costs ~20 s of CPU, from
    bytecode ~4 s. A folder of diaglib's cache, so nothing is written beside the sources; DIAGLIB_PYCACHE=0
    leaves Python's setting alone."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return None
    if os.environ.get("DIAGLIB_PYCACHE", "1") == "0":
        return None
    return str(root() / "pycache")


# --- entries ----------------------------------------------------------------------------------------

def _path(k: str) -> Path:
    return answers_dir() / k[:2] / f"{k}.json"


def get(k: str) -> Any | None:
    """The stored value under key ``k``, or None."""
    try:
        entry = json.loads(_path(k).read_text())
        if entry.get("format") != FORMAT:
            return None
        if entry.get("codec") == "pickle":
            return pickle.loads(base64.b64decode(entry["value"]))
        return entry["value"]
    except Exception:  # unreadable, corrupt, or pickled by code that has changed since: a miss
        return None


def put(k: str, value: Any, about: dict | None = None, *, pickled: bool = False) -> None:
    """Store ``value`` under ``k``: JSON-ready, or any picklable object with ``pickled`` (atomically; a full disk,
    a read-only cache or an unpicklable value is no error)."""
    path = _path(k)
    try:
        stored = base64.b64encode(pickle.dumps(value)).decode() if pickled else value
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT, "created": time.time(), "about": about or {},
                           "codec": "pickle" if pickled else "json", "value": stored}, default=str)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except (OSError, pickle.PicklingError, TypeError, AttributeError):
        pass


def memo(namespace: str, parts: dict, compute: Callable[[], Any], *, enabled: bool = True,
         pickled: bool = False) -> Any:
    """``compute()`` (JSON-ready), kept under ``namespace`` + ``parts`` + this environment; the value comes back
    as JSON gives it (tuples as lists), hit or miss. ``pickled``: any picklable value (DataFrames), returned as
    computed. ``enabled=False``: computed, not kept. DIAGLIB_NO_CACHE=1 (what ``--no-cache`` sets): computed
    afresh, and kept."""
    def fresh():
        value = compute()
        return value if pickled else json.loads(json.dumps(value, default=str))  # what a later hit returns

    if not enabled:
        return fresh()
    k = key(namespace, {**parts, "pickled": True} if pickled else parts)
    hit = None if os.environ.get("DIAGLIB_NO_CACHE") else get(k)
    if hit is not None:
        return hit
    value = fresh()
    put(k, value, {"namespace": namespace, "parts": parts, "environment": environment()}, pickled=pickled)
    return value


_HERE: dict[str, Any] = {}  # memo_here's answers, for the life of the process


def memo_here(namespace: str, parts: dict, compute: Callable[[], Any], *, pickled: bool = False) -> Any:
    """:func:`memo`, and the answer kept in this process too: what a sweep asks again for every setting is read
    from disk once (and, with DIAGLIB_NO_CACHE, computed once)."""
    k = key(namespace, {**parts, "pickled": True} if pickled else parts)
    if k not in _HERE:
        _HERE[k] = memo(namespace, parts, compute, pickled=pickled)
    return _HERE[k]


def info() -> dict:
    """Where the cache lives and what it holds."""
    files = [p for p in answers_dir().rglob("*.json")] if answers_dir().is_dir() else []
    spaces: dict[str, int] = {}
    for p in files:
        try:
            ns = json.loads(p.read_text()).get("about", {}).get("namespace", "?")
        except (OSError, ValueError):
            ns = "unreadable"
        spaces[ns] = spaces.get(ns, 0) + 1
    return {"path": str(answers_dir()), "entries": len(files), "bytes": sum(p.stat().st_size for p in files),
            "by_namespace": dict(sorted(spaces.items()))}


def clear() -> dict:
    """Remove every stored answer; returns what was there."""
    before = info()
    shutil.rmtree(answers_dir(), ignore_errors=True)
    return before
