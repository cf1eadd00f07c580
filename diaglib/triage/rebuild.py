"""The serve command a log shows, rebuilt and resolved through the installed vLLM.

Flags come from the log's ``non-default args`` (exactly what the user passed; each argument's spelling is
the installed vLLM's own serve parser's), then from ``Chunked prefill is enabled with
max_num_batched_tokens=N`` and the engine config line's parallel sizes. The command is resolved by
diaglib.scenario (vLLM's parser and ``create_engine_config``, on a what-if GPU); the resolved config is
printed as the engine prints it (``VllmConfig.__str__``) and compared field by field with the log's
engine line: where the log's vLLM is the installed one, a field that differs becomes a flag and the
command is resolved again; every difference left is listed. Nothing is executed.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
from dataclasses import dataclass, field

from .. import compat
from ..errors import DiagError
from ..gpus import gpu_spec
from . import values
from .parse import LogFacts

DEFAULT_GPU = "NVIDIA H20"
# serve arguments whose values are secrets (whole words of the dest: max_num_batched_tokens is not one)
SECRET_ARG = re.compile(r"(?:^|_)(?:api_key|key|token|hf_token|password|secret|credentials?|auth)(?:$|_)")
# VllmConfig.__str__ fields (every release prints these names) -> the serve argument (its dest) that sets them
ENGINE_FIELDS = {
    "tensor_parallel_size": "tensor_parallel_size", "pipeline_parallel_size": "pipeline_parallel_size",
    "data_parallel_size": "data_parallel_size", "decode_context_parallel_size": "decode_context_parallel_size",
    "dtype": "dtype", "max_seq_len": "max_model_len", "quantization": "quantization",
    "enforce_eager": "enforce_eager", "kv_cache_dtype": "kv_cache_dtype",
    "enable_prefix_caching": "enable_prefix_caching", "enable_chunked_prefill": "enable_chunked_prefill",
    "chunked_prefill_enabled": "enable_chunked_prefill", "trust_remote_code": "trust_remote_code",
    "seed": "seed", "skip_tokenizer_init": "skip_tokenizer_init",
}
# compilation_config keys compared with the log's (and passed back as --compilation-config JSON)
COMPILATION_KEYS = ("mode", "level", "backend", "use_inductor", "cudagraph_mode", "use_cudagraph",
                    "cudagraph_capture_sizes", "max_cudagraph_capture_size", "compile_sizes", "full_cuda_graph")
# ignored: not engine arguments (the CLI's own), or fields that name this machine's files
INTERNAL = {"subparser", "dispatch_function", "model_tag", "model", "served_model_name", "tokenizer"}
_ENUM = re.compile(r"^[A-Z]\w*\.[A-Z][A-Z0-9_]*$")  # an enum repr as values.value reads it: Class.MEMBER


@dataclass
class Rebuilt:
    """The rebuilt command, where each part came from, and what could not be recovered."""

    model: str | None
    model_dir: str | None = None
    flags: list[tuple[list[str], str]] = field(default_factory=list)  # (serve argv words, where from)
    gpu: str | None = None
    gpu_count: int | None = None
    recovered: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)
    scenario: object = None
    error: str | None = None

    @property
    def command(self) -> str | None:
        """The serve command as the log shows it (the model as the log names it)."""
        return self._command(self.model)

    @property
    def local_command(self) -> str | None:
        """The same with the model folder given by --model-dir (what diaglib's other commands can load here)."""
        return self._command(self.model_dir or self.model)

    def _command(self, model: str | None) -> str | None:
        if not model:
            return None
        return shlex.join(["vllm", "serve", model] + [w for f, _ in self.flags for w in f])

    def as_dict(self) -> dict:
        sc = self.scenario
        return {"command": self.command, "local_command": self.local_command, "model": self.model,
                "model_dir": self.model_dir, "gpu": self.gpu, "gpu_count": self.gpu_count,
                "flags": [{"argv": f, "from": src} for f, src in self.flags], "recovered": self.recovered,
                "assumed": self.assumed, "missing": self.missing, "differs": self.differs, "error": self.error,
                "resolved_by": sc.vllm_version if sc is not None else None}


@functools.cache
def serve_actions() -> dict[str, argparse.Action]:
    """The installed vLLM's ``vllm serve`` arguments by dest (its own parser)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand

    parser = compat.flexible_argument_parser()(prog="vllm")
    serve = ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    return {a.dest: a for a in serve._actions if a.option_strings}


def _long(action: argparse.Action) -> str:
    """The argument's longest spelling (``--tensor-parallel-size`` rather than ``-tp``)."""
    return max(action.option_strings, key=len)


def _switch(action: argparse.Action, on: bool) -> str | None:
    """The spelling of a switch that sets it to ``on``, found by applying each spelling as vLLM's parser would."""
    for opt in sorted(action.option_strings, key=len, reverse=True):
        ns = argparse.Namespace()
        try:
            action(None, ns, [], option_string=opt)
        except (TypeError, ValueError, AttributeError):
            continue
        if getattr(ns, action.dest, None) is on:
            return opt
    return None


def _plain(v):
    """A value read from the log as JSON-ready data (calls as dicts, enum reprs as member names)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, str) and _ENUM.match(v):
        return values.enum_member(v)  # CUDAGraphMode.FULL -> FULL
    return v


def argv_for(dest: str, value) -> tuple[list[str] | None, str | None]:
    """Serve argv words that set ``dest`` to ``value`` on the installed vLLM, or (None, why not)."""
    action = serve_actions().get(dest)
    if action is None:
        return None, f"vLLM {compat.installed()}'s serve parser has no argument {dest!r}"
    if value is None:
        return None, f"{dest}=None in the log (a default of None cannot be passed as a flag)"
    if action.nargs == 0:  # a switch: store_true / store_false / --x / --no-x / --enable-x / --disable-x
        on = bool(value) if not isinstance(value, str) else value.lower() in ("true", "1", "yes")
        flag = _switch(action, on)
        return ([flag], None) if flag else (None, f"{dest}={value}: no serve flag sets it (it is the default)")
    flag = _long(action)
    if isinstance(value, (dict, values.Call)):
        return [flag, json.dumps(_plain(value), separators=(",", ":"))], None
    if isinstance(value, (list, tuple)):
        items = [str(_plain(x)) for x in value]
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            return ([flag, *items], None) if items else (None, f"{dest}: empty list")
        return [flag, json.dumps(_plain(list(value)))], None
    text = str(value)
    if dest == "dtype":
        text = text.removeprefix("torch.")
    return [flag, text], None


def _absent_path(value) -> bool:
    return isinstance(value, str) and value.startswith(("/", "~")) and not os.path.exists(value)


def command(facts: LogFacts, *, model_dir: str | None = None, gpu: str | None = None,
            gpu_count: int | None = None, flags: bool = True) -> Rebuilt:
    """The serve command the log shows (not yet resolved); ``model_dir`` is where its model lives here.

    The flags are spelled by the installed vLLM's serve parser (vLLM is imported, on the what-if GPU where there
    is no GPU); ``flags=False`` leaves them out and imports nothing."""
    from ..scenario import prepare_vllm

    nda = facts.non_default_args or {}
    eng = facts.engine.config if facts.engine else {}
    tag = nda.get("model_tag") or nda.get("model") or facts.model or eng.get("model")
    rb = Rebuilt(model=str(tag or model_dir) if (tag or model_dir) else None, model_dir=model_dir)
    if model_dir:
        rb.assumed.append(f"the model's folder is {model_dir} (--model-dir)")
    if tag:
        rb.recovered.append(f"model {tag} (from the log's "
                            f"{'non-default args' if nda.get('model_tag') or nda.get('model') else 'engine line'})")
    elif not model_dir:
        rb.missing.append("the model: the log names none (give --model-dir)")
    need = 1
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        n = nda.get(key, eng.get(key))
        need *= n if isinstance(n, int) and n > 0 else 1
    rb.gpu, rb.gpu_count = _gpu(facts, gpu, gpu_count, need, rb)
    if not flags:
        return rb
    prepare_vllm(gpu_spec(rb.gpu, rb.gpu_count))  # the what-if GPU before vLLM is imported
    done: set[str] = set()
    for dest, v in nda.items():
        if dest in INTERNAL:
            continue
        if SECRET_ARG.search(dest):
            rb.missing.append(f"{dest}: a secret, left out")
            continue
        if _absent_path(v):
            rb.missing.append(f"{dest}: the path {v} is not on this machine, left out")
            continue
        words, why = argv_for(dest, v)
        if words is None:
            rb.missing.append(f"{dest}={v!r}: {why}")
            continue
        rb.flags.append((words, "non-default args"))
        done.add(dest)
    if facts.budget and "max_num_batched_tokens" not in done:
        words, why = argv_for("max_num_batched_tokens", facts.budget)
        if words:
            rb.flags.append((words, "scheduler line (Chunked prefill is enabled with max_num_batched_tokens=...)"))
            done.add("max_num_batched_tokens")
    if not nda:
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            n = eng.get(key)
            if isinstance(n, int) and n > 1 and key not in done:
                words, _ = argv_for(key, n)
                if words:
                    rb.flags.append((words, "engine config line"))
                    done.add(key)
        if not eng:
            rb.missing.append("the serve arguments: the log has neither `non-default args` nor the engine "
                              "config line; vLLM's defaults are assumed")
        else:
            rb.assumed.append("serve arguments: the log has no `non-default args` line; rebuilt from the engine "
                              "config line")
    for key in ("max_num_batched_tokens",):
        if key not in done:
            rb.assumed.append(f"{key}: not in the log; vLLM's default for this command")
    return rb


def _gpu(facts: LogFacts, gpu: str | None, count: int | None, need: int, rb: Rebuilt) -> tuple[str, int]:
    logged = facts.gpu
    if gpu:
        name = gpu_spec(gpu).name
        rb.assumed.append(f"GPU {name} (--gpu)" + (f"; the log names {logged}" if logged and logged != name else ""))
    elif logged:
        name = logged
        rb.recovered.append(f"GPU {name} (named {facts.gpus[logged]} time(s) in the log)")
        if len(facts.gpus) > 1:
            rb.assumed.append(f"the log names several GPUs ({', '.join(facts.gpus)}); {name} is named most")
    else:
        name = DEFAULT_GPU
        rb.assumed.append(f"GPU {name}: the log names none in diaglib's catalog (give --gpu)")
    if count:
        n = count
        rb.assumed.append(f"{n} GPUs (--gpu-count)")
    else:
        n = max(need, 1)
        rb.assumed.append(f"{n} GPU{'s' * (n != 1)} on the host (what the parallel sizes need)")
    return name, n


def resolve(rb: Rebuilt, facts: LogFacts, *, same_release: bool = True) -> Rebuilt:
    """Resolve ``rb`` through vLLM (diaglib.scenario.from_command); compare with the log's engine line and,
    when ``same_release``, carry the differing fields over as flags and resolve again."""
    from ..scenario import from_command

    if rb.command is None:
        rb.error = "no model to resolve"
        return rb
    models = {rb.model: rb.model_dir} if rb.model_dir else {}
    gpu = gpu_spec(rb.gpu, rb.gpu_count)
    try:
        sc = from_command(rb.command, gpu=gpu, models=models, name="rebuilt from the log")
    except DiagError as e:
        rb.error = str(e)
        return rb
    diffs = compare(facts, sc)
    if same_release and diffs:
        added, comp = [], {}
        for key, logged, _ in diffs:
            if key.startswith("compilation_config."):
                comp[key.split(".", 1)[1]] = _plain(logged)
                added.append(key)
                continue
            words, _ = argv_for(ENGINE_FIELDS[key], logged)
            if words:
                rb.flags.append((words, f"engine config line ({key})"))
                added.append(key)
        if comp:
            _merge_compilation(rb, comp)
        if added:
            try:
                sc = from_command(rb.command, gpu=gpu, models=models, name="rebuilt from the log")
            except DiagError as e:
                rb.flags = [f for f in rb.flags if not f[1].startswith("engine config line (")]
                rb.assumed.append(f"the engine line's {', '.join(added)} could not be carried over ({e})")
            diffs = compare(facts, sc)
    rb.scenario = sc
    for key, logged, mine in diffs:
        rb.differs.append(f"{key}: the log has {_short(logged)}, vLLM {sc.vllm_version} resolves {_short(mine)}"
                          + ("" if same_release else " (a different release)"))
    return rb


def compare(facts: LogFacts, sc) -> list[tuple[str, object, object]]:
    """(field, logged, resolved) for every compared engine-line field that differs."""
    if not facts.engine:
        return []
    logged = facts.engine.config
    mine = values.fields(str(sc.vllm_config))
    out = []
    for key in ENGINE_FIELDS:
        if key in logged and key in mine and _norm(logged[key]) != _norm(mine[key]):
            out.append((key, logged[key], mine[key]))
    lc, mc = logged.get("compilation_config"), mine.get("compilation_config")
    if isinstance(lc, dict) and isinstance(mc, dict):
        for key in COMPILATION_KEYS:
            if key in lc and key in mc and _norm(lc[key]) != _norm(mc[key]):
                out.append((f"compilation_config.{key}", lc[key], mc[key]))
    return out


def _short(v, width: int = 90) -> str:
    text = repr(v)
    return text if len(text) <= width else text[:width - 12] + " ... " + text[-7:]


def _norm(v):
    v = _plain(v)
    if isinstance(v, str):
        return v.removeprefix("torch.").lower()
    if isinstance(v, list):
        return sorted(map(str, v))
    return v


def _merge_compilation(rb: Rebuilt, comp: dict) -> None:
    """Add ``comp`` to the command's --compilation-config (one flag: a later one would replace the first)."""
    flag = _long(serve_actions()["compilation_config"])
    for i, (words, src) in enumerate(rb.flags):
        if words[0] == flag and len(words) == 2:
            try:
                merged = {**json.loads(words[1]), **comp}
            except json.JSONDecodeError:
                continue
            rb.flags[i] = ([flag, json.dumps(merged, separators=(",", ":"))], src + " + engine config line")
            return
    words, _ = argv_for("compilation_config", comp)
    if words:
        rb.flags.append((words, f"engine config line (compilation_config: {', '.join(comp)})"))
