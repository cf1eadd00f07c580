"""The vLLM release matrix as code: one nox session per release and purpose.

Every session runs in the project's environment for its release, `.venvs/vllm-X`, which `scripts/venv.sh X`
builds with uv (resolved as of a week after that release). The same environment serves the tests, the version
contract and `diaglib --vllm X`, so nox creates none of its own (venv_backend "none").

    nox -s tests              # the full suite under the CI releases (what `make test` runs)
    nox -s "tests(vllm='0.33.0')"
    nox -s contract           # every supported release: build, contract suite, remove (what `make matrix` runs)
"""
from __future__ import annotations

import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.default_venv_backend = "none"
nox.options.sessions = ["tests"]
nox.options.error_on_external_run = False

CI = ["0.10.1.1", "0.20.2", "0.33.0"]  # the seed's release, the reference (runs on our H200), the newest


def _key(v: str):
    return tuple(int(p) for p in v.split("."))


SUPPORTED = sorted((p.stem.removeprefix("vllm-") for p in (ROOT / "envs").glob("vllm-*.txt")), key=_key)


def _python(version: str) -> str:
    return str(ROOT / ".venvs" / f"vllm-{version}" / "bin" / "python")


SEED = CI[0]  # the seed log's and seed scenario's release: triage and the report hand over to its environment
ENV_GIB = 10  # one release's environment: 7.9-9.8 GiB for the CI releases (measured 2026-12-02)


def _has_env(version: str) -> bool:
    return Path(_python(version)).exists()


def _room_for_another() -> bool:
    return shutil.disk_usage(ROOT).free >= (ENV_GIB + 2) * 2**30


@nox.session
@nox.parametrize("vllm", CI[::-1])  # newest first: the seed's comes last, when the others can still be there
def tests(session, vllm):
    """The full test suite under one CI release, on two workers (pytest-xdist; each test file stays on one, so
    its module fixtures are built once). pytest's "no tests ran" (exit 5) fails the session.

    The tests that hand over to another release use whichever other CI environment is there; this session
    also builds the seed's when the disk has room for it. On a tight disk (less than room for one more
    environment) the session removes its own environment after its tests, so the next release fits: peak disk
    is two environments, or one where only one fits (the hand-over tests then skip, saying why)."""
    session.run("scripts/venv.sh", vllm, external=True)
    if vllm != SEED and not _has_env(SEED) and _room_for_another():
        session.run("scripts/venv.sh", SEED, external=True)
    try:
        # bytecode kept beside the environment's sources: the many diaglib subprocesses then import vLLM in
        # ~4 s, not ~20 s, where the machine sets PYTHONDONTWRITEBYTECODE
        session.run(_python(vllm), "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", *session.posargs,
                    external=True, env={"PYTHONDONTWRITEBYTECODE": ""})
    finally:
        if vllm != SEED and not _room_for_another():
            session.run("scripts/venv.sh", "--remove", vllm, external=True)


@nox.session
@nox.parametrize("vllm", SUPPORTED)
def contract(session, vllm):
    """The version contract under one release: build its environment, run the contract, write
    data/matrix/vllm-X.json, and remove the environment again unless it is a CI one (disk: 8-10 GB each)."""
    session.run("scripts/venv.sh", vllm, external=True)
    try:
        session.run(_python(vllm), "scripts/contract.py", "--out", f"data/matrix/vllm-{vllm}.json",
                    *session.posargs, external=True)
    finally:
        if vllm not in CI:
            session.run("scripts/venv.sh", "--remove", vllm, external=True)


@nox.session
def compat_md(session):
    """docs/compat.md from the committed matrix results (no vLLM needed)."""
    session.run("python3", "scripts/compat_md.py", external=True)
