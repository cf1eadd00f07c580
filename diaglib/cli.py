"""`diaglib`: one command line with subcommands; bad input prints one line and exits 2."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import versions
from .errors import DiagError


def _scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", help="scenario file or name under data/scenarios (default: the seed)")
    p.add_argument("--cmd", help='a serve command instead of a scenario file: "vllm serve MODEL [flags]"')
    p.add_argument("--gpu", help='GPU to resolve for, e.g. "NVIDIA H200" (default: the scenario\'s)')
    p.add_argument("--gpu-count", type=int, help="GPUs on the host (default: the scenario's, else 8)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _load(args):
    from .scenario import load

    return load(args.scenario, cmd=args.cmd, gpu=args.gpu, gpu_count=args.gpu_count, vllm=args.vllm)


def _print(args, data, text) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def cmd_show(args) -> None:
    from .summarize import format_text, summarize

    s = summarize(_load(args))
    _print(args, s, format_text(s))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diaglib", description=__doc__)
    parser.add_argument("--vllm", help=f"which installed vLLM answers ({', '.join(versions.SUPPORTED)}); "
                                       "default: the scenario's, else this environment's")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("show", help="the resolved vLLM configuration that matters at token boundaries")
    _scenario_args(p)
    p.set_defaults(func=cmd_show)
    return parser


def _wanted_version(args) -> str | None:
    """The vLLM version that must answer: --vllm, else the scenario file's."""
    if args.vllm:
        return args.vllm
    if getattr(args, "cmd", None) is None and hasattr(args, "scenario"):
        from .scenario import find_scenario, read_scenario_file

        return read_scenario_file(find_scenario(args.scenario)).get("vllm")
    return None


def _reexec_if_needed(args, argv: list[str]) -> None:
    """Hand over to the project's environment for another vLLM version (scripts/venv.sh makes them)."""
    wanted = _wanted_version(args)
    if not wanted or wanted == versions.installed():
        return
    py = versions.venv_python(wanted)
    rest = [a for i, a in enumerate(argv) if a != "--vllm" and not a.startswith("--vllm=")
            and not (i > 0 and argv[i - 1] == "--vllm")]
    os.execv(str(py), [str(py), "-m", "diaglib", "--vllm", wanted, *rest])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury our output
    args = build_parser().parse_args(argv)
    try:
        _reexec_if_needed(args, argv)
        args.func(args)
    except DiagError as e:
        print(f"diaglib: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
