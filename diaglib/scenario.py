"""A scenario: a `vllm serve` command, the GPUs it runs on and the vLLM that resolves it.

`load()` reads a scenario file (data/scenarios/*.toml) or takes a command line, parses it with vLLM's
own `vllm serve` parser and resolves it with vLLM's own `create_engine_config`, yielding vLLM's
`VllmConfig`. Without a GPU, the what-if layer (diaglib.whatif) stands in for the named GPU first.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import logging
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from . import compat, whatif
from .errors import DiagError
from .gpus import GpuSpec, gpu_spec
from .paths import DATA, DEFAULT_SCENARIO, SCENARIOS

DEFAULT_GPU = "NVIDIA H20"
DEFAULT_GPU_COUNT = 8


@dataclass
class Scenario:
    """A serve command resolved by the installed vLLM on a real or what-if GPU."""

    name: str
    command: str
    gpu: GpuSpec
    model_dir: Path
    argv: list[str]
    args: argparse.Namespace
    engine_args: Any
    vllm_config: Any
    vllm_version: str
    simulated: bool
    vllm_why: str = "installed in this environment"
    source: Path | None = None
    models: dict[str, str] = field(default_factory=dict)

    @property
    def hf_config(self):
        return self.vllm_config.model_config.hf_config

    @property
    def verified(self) -> bool:
        """Whether this vLLM version is one diaglib's tests cover."""
        return compat.is_verified(self.vllm_version)

    def key_parts(self) -> dict:
        """What decides an answer about this scenario besides diaglib's environment (diaglib.cache): its name,
        its command with each model folder by its files, and the GPU."""
        from . import cache

        return {"name": self.name, **cache.command_content(self.command, self.models), "gpu": asdict(self.gpu)}

    def derive(self, *flags: str, name: str | None = None) -> "Scenario":
        """The same scenario with serve flags appended (later flags win, as on vLLM's command line)."""
        command = self.command + " " + " ".join(shlex.quote(f) for f in flags)
        sc = from_command(command, gpu=self.gpu, models=self.models, name=name or self.name, source=self.source)
        sc.vllm_why = self.vllm_why
        return sc


# --- entry points -----------------------------------------------------------------------------------

def load(spec: str | Path | None = None, *, cmd: str | None = None, gpu: str | None = None,
         gpu_count: int | None = None, vllm: str | None = None) -> Scenario:
    """Resolve a scenario file (path or name under data/scenarios) or a serve command line.

    ``gpu``/``gpu_count`` override the file's GPU. The vLLM that answers is the one installed here; ``vllm``
    (``--vllm``) or the file's ``vllm = "X"`` line may ask for a version, which must then be the installed one
    (the CLI hands over to the project's environment for it first). ``Scenario.vllm_why`` says which rule chose.
    """
    if cmd is not None and spec is not None:
        raise DiagError("give either a scenario file or --cmd, not both")
    if cmd is not None:
        data = {"name": "command line", "command": cmd, "gpu": {}, "models": {}}
        path = None
    else:
        path = find_scenario(spec)
        data = read_scenario_file(path)
    wanted, why = answering_vllm(vllm, data.get("vllm"))
    have = compat.installed()
    if have is None:
        raise DiagError("vLLM is not installed in this Python environment")
    if wanted != have:
        raise DiagError(f"{why}, but this environment has vLLM {have}; run diaglib with --vllm {wanted}")
    g = data.get("gpu", {})
    same_gpu = gpu is None or gpu_spec(gpu).name == gpu_spec(g.get("name", DEFAULT_GPU)).name
    spec_gpu = gpu_spec(gpu or g.get("name", DEFAULT_GPU), gpu_count or g.get("count", DEFAULT_GPU_COUNT),
                        g.get("memory_mib") if same_gpu else None)
    models = {k: str((path.parent / v).resolve()) if path else v for k, v in data.get("models", {}).items()}
    sc = from_command(data["command"], gpu=spec_gpu, models=models, name=data.get("name", "scenario"), source=path)
    sc.vllm_why = why
    return sc


def answering_vllm(flag: str | None, pinned: str | None) -> tuple[str | None, str]:
    """(version, why): the vLLM that must answer. ``--vllm`` first, then a scenario file's pin, else the one
    installed in this environment."""
    if flag:
        return flag, f"--vllm {flag} asks for vLLM {flag}"
    if pinned:
        return pinned, f"the scenario file names vLLM {pinned}"
    return compat.installed(), "installed in this environment"


def find_scenario(spec: str | Path | None) -> Path:
    """A scenario file by path, or by name under data/scenarios (default: the seed scenario)."""
    if spec is None:
        return DEFAULT_SCENARIO
    p = Path(spec)
    for cand in (p, SCENARIOS / p, SCENARIOS / f"{p}.toml"):
        if cand.is_file():
            return cand.resolve()
    names = ", ".join(sorted(f.stem for f in SCENARIOS.glob("*.toml")))
    raise DiagError(f"scenario {str(spec)!r} not found (a .toml file, or one of: {names})")


def read_scenario_file(path: Path) -> dict:
    """Parse and check a scenario file."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise DiagError(f"{path}: malformed scenario file: {e}") from None
    if not isinstance(data.get("command"), str):
        raise DiagError(f"{path}: a scenario needs a `command = \"vllm serve ...\"` line")
    for key, kind in (("gpu", dict), ("models", dict), ("vllm", str), ("name", str)):
        if key in data and not isinstance(data[key], kind):
            raise DiagError(f"{path}: `{key}` must be a {'table' if kind is dict else 'string'}")
    return data


def from_command(command: str, *, gpu: GpuSpec, models: dict[str, str] | None = None,
                 name: str = "command line", source: Path | None = None) -> Scenario:
    """Resolve one `vllm serve ...` command line for ``gpu`` through vLLM's parser and config code."""
    argv = serve_argv(command)
    if len(argv) > 1 and not argv[1].startswith("-"):  # the positional model: a bad folder is said before vLLM loads
        resolve_model_dir(argv[1], models or {})
    simulated = prepare_vllm(gpu)
    args = parse_serve_args(argv)
    tag = args.model_tag or getattr(args, "model", None)
    model_dir = resolve_model_dir(tag, models or {})
    args.model = str(model_dir)
    if getattr(args, "served_model_name", None) is None and tag != str(model_dir):
        args.served_model_name = [tag]
    config = create_config(args, gpu)
    check_field_types(config[1].model_config.hf_config)
    return Scenario(name=name, command=command, gpu=gpu, model_dir=model_dir, argv=argv, args=args,
                    engine_args=config[0], vllm_config=config[1], vllm_version=compat.installed(),
                    simulated=simulated, source=source, models=dict(models or {}))


# --- steps ------------------------------------------------------------------------------------------

def prepare_vllm(gpu: GpuSpec) -> bool:
    """Get vLLM ready to answer for ``gpu``: the what-if layer when no GPU exists. True if simulated."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if whatif.active_gpu() is None and ("vllm" in sys.modules or whatif.real_gpu_present()):
        return False
    # vLLM keeps what it learnt about model classes under VLLM_CACHE_ROOT in files named by class only: with
    # several vLLM versions on one host each overwrites the others' and re-inspects in a subprocess (~25 s)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(base / "vllm" / f"whatif-{compat.installed()}"))
    # humming (a kernel library newer vLLM releases import) starts two background JIT builds when imported;
    # no what-if answer launches a kernel, so they would only take the CPUs from the answer
    os.environ.setdefault("HUMMING_DISABLE_PARALLEL_BUILD", "1")
    whatif.activate(gpu)
    _quiet_vllm_logging()
    return True


def _quiet_vllm_logging() -> None:
    """vLLM logs to stdout; keep stdout for our output and send its records to stderr."""
    import vllm  # noqa: F401  (configures vLLM's logger)

    for h in logging.getLogger("vllm").handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout:
            h.setStream(sys.stderr)


def serve_argv(command: str) -> list[str]:
    """`vllm serve MODEL --flags` -> the argv vLLM's CLI parser sees after the program name."""
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise DiagError(f"cannot split the serve command: {e}") from None
    if words[:1] == ["vllm"]:
        words = words[1:]
    if words[:1] != ["serve"]:
        raise DiagError(f"expected a `vllm serve MODEL [flags]` command, got {command!r}")
    return words


class _ParseError(Exception):
    pass


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """Parse with vLLM's own `vllm serve` parser; an unknown or malformed flag becomes a DiagError."""
    parser, serve = compat.serve_parser()

    def fail(message: str):
        raise _ParseError(message)

    parser.error = serve.error = fail
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
    except _ParseError as e:
        raise DiagError(_explain_parse_error(str(e), serve)) from None
    except SystemExit:
        raise DiagError(f"vLLM's serve parser rejected: {' '.join(argv)}") from None
    return args


def _explain_parse_error(message: str, serve: argparse.ArgumentParser) -> str:
    m = re.match(r"unrecognized arguments: (.*)", message)
    if not m:
        return f"bad serve argument: {message}"
    known = [o for a in serve._actions for o in a.option_strings]
    parts = []
    for word in m.group(1).split():
        if not word.startswith("-"):
            continue
        flag = word.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        parts.append(f"{flag}" + (f" (did you mean {close[0]}?)" if close else ""))
    return "unknown serve flag: " + ", ".join(parts or [m.group(1)])


def resolve_model_dir(tag: str | None, models: dict[str, str]) -> Path:
    """The local folder holding the model's config.json (a path, a scenario mapping, or data/models/NAME)."""
    if not tag:
        raise DiagError("the serve command names no model")
    candidates = [Path(models[tag])] if tag in models else []
    candidates += [Path(tag), DATA / "models" / Path(tag).name]
    for d in candidates:
        if d.is_dir():
            break
    else:
        raise DiagError(f"model {tag!r}: no local folder found (tried {', '.join(map(str, candidates))}); "
                        "put its config.json in data/models/NAME/ or map it in the scenario's [models]")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise DiagError(f"model folder {d} has no config.json")
    try:
        data = json.loads(cfg.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DiagError(f"{cfg}: not UTF-8 text (byte {e.start}): config.json must be JSON text") from None
    except json.JSONDecodeError as e:
        raise DiagError(f"{cfg}: malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise DiagError(f"{cfg}: the top level is a JSON {type(data).__name__}; a config.json holds one object")
    return d.resolve()


def check_field_types(hf_config) -> None:
    """A config.json number given as text (``"hidden_size": "big"``), which older transformers accept and the
    model's shapes then fail on: said against the config class's own default, in one line."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    try:
        default = type(text)()
    except Exception:  # a config class that needs arguments: nothing to compare with
        return
    for key, value in vars(text).items():
        d = getattr(default, key, None)
        if isinstance(value, str) and isinstance(d, (int, float)) and not isinstance(d, bool):
            raise DiagError(f"config.json: {key} is {value!r}, not a number ({type(text).__name__}'s default is {d})")


def _forget_env_writes() -> None:
    """vLLM's config resolution sometimes sets a VLLM_* value on vllm.envs itself (e.g. the MLA backend it picks
    for Blackwell), which in a server lasts the process; here each resolution starts from the environment."""
    import vllm.envs as envs

    names = getattr(envs, "environment_variables", {})
    for name in [k for k in vars(envs) if k in names]:
        delattr(envs, name)


def create_config(args: argparse.Namespace, gpu: GpuSpec):
    """vLLM's EngineArgs and resolved VllmConfig, as `vllm serve` builds them."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "data_parallel_size_local"):
        v = getattr(args, name, None)
        if isinstance(v, int) and v < 1:  # vLLM divides by these before it checks them
            raise DiagError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    tp = getattr(args, "tensor_parallel_size", 1) or 1
    pp = getattr(args, "pipeline_parallel_size", 1) or 1
    dp_local = getattr(args, "data_parallel_size_local", None) or getattr(args, "data_parallel_size", 1) or 1
    if tp * pp * dp_local > gpu.count:
        raise DiagError(f"TP {tp} x PP {pp} x DP {dp_local} needs {tp * pp * dp_local} GPUs, "
                        f"but the scenario has {gpu.count} x {gpu.name}")
    _forget_env_writes()
    try:
        with whatif.scenario_gpu_count(gpu):
            engine_args = AsyncEngineArgs.from_cli_args(args)
            vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        raise DiagError(f"vLLM rejected the configuration: {_explain_rejection(e)}") from None
    return engine_args, vllm_config


def _explain_rejection(e: Exception) -> str:
    """One line from vLLM's exception; pydantic validation errors name the field and the reason."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            parts = []
            for err in errors():
                loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
                msg = err.get("msg", "").removeprefix("Value error, ")
                parts.append(f"{loc}: {msg}" if loc else msg)
            return "; ".join(p.splitlines()[0] for p in parts) or str(e)
        except Exception:  # not a pydantic error after all
            pass
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
