"""What a live engine is built from: the scenario's own serve command, pointed at real weights or a
stand-in. The child process hands that argv to vLLM's serve parser and builds the engine from it.

Rule: real weights when the model folder holds a checkpoint and the host has the GPUs the command asks
for; otherwise the rank-equivalent stand-in of one TP rank (``standin``), one GPU, ``load_format=dummy``.
"""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DiagError
from ..paths import DATA
from . import standin

STANDINS = DATA / "live" / "standins"


@dataclass
class EngineSpec:
    """One engine the probe children build: ``kind`` "vllm", or "none" (no model: planted CPU faults only)."""

    kind: str
    argv: list[str] = field(default_factory=list)
    model_dir: str = ""
    weights: str = "none"
    tp_of: int = 1
    vocab: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The equivalent `vllm serve` command (quoted for display only; the child never runs a shell)."""
        return shlex.join(["vllm", *self.argv]) if self.argv else ""

    def as_dict(self) -> dict:
        return {**asdict(self), "command": self.command}


def no_engine() -> EngineSpec:
    """A child without vLLM: for planted CPU faults (what CI runs)."""
    return EngineSpec(kind="none")


def plan(command: str, *, models: dict[str, str] | None = None, gpus: int = 1, flags: list[str] | tuple = (),
         standins: str | Path = STANDINS, weights: str = "auto") -> EngineSpec:
    """The engine for ``command`` (a `vllm serve ...` line) on a host with ``gpus`` GPUs.

    ``weights``: "auto" (real if present and enough GPUs, else stand-in), "real" or "standin".
    ``flags`` are appended to the serve flags (later flags win, as on vLLM's command line).
    """
    from ..gpus import gpu_spec
    from ..scenario import prepare_vllm, resolve_model_dir, serve_argv

    if weights not in ("auto", "real", "standin"):
        raise DiagError(f"weights must be auto, real or standin, not {weights!r}")
    prepare_vllm(gpu_spec("NVIDIA H200", max(gpus, 1)))  # parsing needs a platform; a real GPU is never faked
    argv = serve_argv(command) + list(flags)
    args = parse_argv(argv)
    tag = args.model_tag or getattr(args, "model", None)
    model_dir = resolve_model_dir(tag, models or {})
    tp = int(getattr(args, "tensor_parallel_size", 1) or 1)
    pp = int(getattr(args, "pipeline_parallel_size", 1) or 1)
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    real = has_weights and tp * pp <= max(gpus, 1) if weights == "auto" else weights == "real"
    if real and not has_weights:
        raise DiagError(f"{model_dir} holds no weights (*.safetensors or *.bin); use weights='standin'")
    if real:
        return EngineSpec("vllm", _with_model(argv, tag, model_dir) + ["--skip-tokenizer-init"], str(model_dir),
                          "real", 1, standin.per_rank_vocab(model_dir))
    if pp > 1:
        raise DiagError("a stand-in stands for one tensor-parallel rank; pipeline parallelism is not supported")
    out = standin.write_standin(model_dir, tp, Path(standins) / f"{model_dir.name}-tp{tp}")
    argv = _with_model(argv, tag, out) + ["--tensor-parallel-size", "1", "--data-parallel-size", "1",
                                          "--load-format", "dummy", "--skip-tokenizer-init"]
    return EngineSpec("vllm", argv, str(out), f"dummy (rank-equivalent stand-in, one rank of TP {tp})", tp,
                      standin.per_rank_vocab(out))


def _with_model(argv: list[str], tag: str, model_dir: Path) -> list[str]:
    """argv with the model (positional, or the value of --model) replaced by a local folder."""
    out = list(argv)
    for i, word in enumerate(out):
        if word == tag and i > 0 and (out[i - 1] == "serve" or out[i - 1] == "--model"):
            out[i] = str(model_dir)
            return out
        if word == f"--model={tag}":
            out[i] = f"--model={model_dir}"
            return out
    raise DiagError(f"could not find the model {tag!r} in the serve command")


def parse_argv(argv: list[str]):
    """Parse a serve argv with vLLM's `vllm serve` parser; where the API server's packages are missing
    (an offline engine-only install), with vLLM's engine-argument parser, which holds the engine flags."""
    from ..scenario import parse_serve_args

    try:
        return parse_serve_args(argv)
    except ModuleNotFoundError:
        pass
    import contextlib
    import io

    from vllm.engine.arg_utils import AsyncEngineArgs

    from .. import compat

    parser = compat.flexible_argument_parser()(prog="vllm serve")
    parser.add_argument("model_tag", nargs="?")
    AsyncEngineArgs.add_cli_args(parser)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return parser.parse_args(argv[1:] if argv[:1] == ["serve"] else argv)
    except SystemExit:
        raise DiagError(f"vLLM's engine-argument parser rejected: {' '.join(argv)}") from None


def engine_args(argv: list[str]):
    """vLLM's EngineArgs for a serve argv, parsed by vLLM's own parser (child side)."""
    from dataclasses import fields

    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    args = parse_argv(argv)
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    ea = AsyncEngineArgs.from_cli_args(args)
    return EngineArgs(**{f.name: getattr(ea, f.name) for f in fields(EngineArgs) if f.init})
