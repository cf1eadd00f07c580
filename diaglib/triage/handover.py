"""The command line's side of triage: reading the log, and handing it to the project's environment for the
vLLM release that wrote it (as ``--vllm`` does for the other commands, diaglib.cli._reexec_if_needed)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .. import compat
from ..errors import DiagError

ENV_MARK = "DIAGLIB_TRIAGE_HANDED_OVER"  # set in the environment that was handed the log: it answers itself


def read(log: str) -> tuple[bytes, str]:
    """(the log's bytes, its name): a file, or ``-`` for stdin."""
    if log == "-":
        return sys.stdin.buffer.read(), "stdin"
    p = Path(log)
    try:
        return p.read_bytes(), p.name
    except IsADirectoryError:
        raise DiagError(f"{log} is a folder, not a log file") from None
    except OSError as e:
        raise DiagError(f"cannot read {log}: {e.strerror or e}") from None


def write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise DiagError(f"cannot write {path}: {e.strerror or e}") from None


def target(data: bytes, explicit: str | None) -> tuple[str | None, str | None]:
    """(release whose environment should answer, or None: this one; why), read off the log's version."""
    from . import lines, parse
    from .diagnose import release_of

    if explicit or os.environ.get(ENV_MARK):
        return None, None
    try:
        facts = parse.parse(lines.decode(data))
    except DiagError:
        return None, None  # the full triage below says what is wrong with the log
    rel = release_of(facts.version)
    if rel is None or rel == compat.installed():
        return None, None
    try:
        compat.venv_python(rel)
    except DiagError as e:
        return None, str(e)
    return rel, f"the log is from vLLM {facts.version}"


def maybe(args, data: bytes, stdout=None, stderr=None) -> int | None:
    """Run the same triage in the environment of the log's vLLM when it is not this one and exists here,
    writing to ``stdout``/``stderr`` (default: this process's): its exit status; None to answer here (with a
    note in the triage when the log's vLLM differs)."""
    rel, why = target(data, args.vllm)
    if rel is None:
        return None
    argv = list(args._argv)
    i = len(argv) - 1 - argv[::-1].index(args.log)
    argv[i] = "-"
    if args.label is None:
        argv += ["--label", Path(args.log).name if args.log != "-" else "stdin"]
    print(f"diaglib: {why}: handing over to the vLLM {rel} environment", file=stderr or sys.stderr, flush=True)
    env = dict(os.environ, **{ENV_MARK: "1"})
    return subprocess.run([str(compat.venv_python(rel)), "-m", "diaglib", *argv], input=data, env=env,
                          stdout=stdout, stderr=stderr, check=False).returncode
