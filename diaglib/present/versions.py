"""Several vLLM releases side by side, differences first: "did the upgrade change what happens at 8192?"

:func:`compare` asks each release in its own project environment (``diaglib --vllm X show/dispatch --json`` in a
child process, so each answer is that release's own) and lines the answers up field by field.
:func:`matrix` reads the version matrix's committed results (data/matrix, scripts/contract.py) for every release
at once, without any vLLM.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from .. import compat
from ..errors import DiagError
from ..paths import DATA

MATRIX = DATA / "matrix"
_SKIP = ("scenario", "command", "vllm_why", "model.path")  # the same question asked, not an answer


def versions_arg(text: str) -> list[str]:
    """``0.10.1.1,0.33.0`` -> the releases, each supported, at least two, no repeats."""
    vs = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vs if v not in compat.supported()]
    if bad:
        raise DiagError(f"vLLM {bad[0]} is not supported; supported: {', '.join(compat.supported())}")
    if len(vs) < 2 or len(set(vs)) != len(vs):
        raise DiagError(f"compare needs two or more different releases, got {text!r}")
    return vs


def _ask(version: str, argv: list[str]) -> dict | list:
    """One release's --json answer (its environment must exist: scripts/venv.sh VERSION)."""
    compat.venv_python(version)  # a clear DiagError when that environment is missing
    p = subprocess.run([sys.executable, "-m", "diaglib", "--vllm", version, *argv, "--json"],
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("diaglib: error: ")
        raise DiagError(f"vLLM {version}: {last}")
    return json.loads(p.stdout)


def flatten(data, prefix: str = "") -> dict[str, object]:
    """Nested JSON -> {"a.b.c": value}; lists of scalars stay whole (capture sizes compare as one field)."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): data}


def compare(versions: list[str], scenario_argv: list[str], tokens: list[int] | None = None) -> pd.DataFrame:
    """Each release's `show` and its `dispatch` of steps of ``tokens`` (default: the budget and one below; counts
    over a release's budget are left out for it), field by field; differing fields first.

    Columns: field, differs, then one column per release. ``scenario_argv``: the scenario arguments as on the
    command line (a scenario name or --cmd/--gpu/--gpu-count).
    """
    answers = {}
    for v in versions:
        shown = flatten(_ask(v, ["show", *scenario_argv]))
        budget = shown["scheduler.max_num_batched_tokens"]
        wanted = [n for n in tokens or (budget - 1, budget) if n <= budget]
        steps = _ask(v, ["dispatch", *scenario_argv, "--tokens", *map(str, wanted)]) if wanted else []
        for s in steps:
            for k in ("padded_tokens", "cudagraph_mode", "compile_kind", "compile_range", "uniform_decode"):
                shown[f"step {s['num_tokens']}.{k}"] = s[k]
        answers[v] = {k: val for k, val in shown.items() if not k.startswith(_SKIP)}
    fields = list(dict.fromkeys(k for a in answers.values() for k in a))
    rows = []
    for f in fields:
        vals = [answers[v].get(f, "-") for v in versions]
        rows.append({"field": f, "differs": len({json.dumps(x, default=str) for x in vals}) > 1,
                     **{v: _text(x) for v, x in zip(versions, vals)}})
    df = pd.DataFrame(rows)
    return df.sort_values("differs", ascending=False, kind="stable").reset_index(drop=True)


def _text(value) -> str:
    if isinstance(value, list) and len(value) > 8:
        return f"{len(value)} values: {value[0]} .. {value[-1]}"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def format_text(df: pd.DataFrame, *, all_fields: bool = False) -> str:
    diff = df[df["differs"]]
    same = df[~df["differs"]]
    versions = [c for c in df.columns if c not in ("field", "differs")]
    head = f"{len(diff)} of {len(df)} answers differ between vLLM {', '.join(versions)}"
    body = diff.drop(columns="differs").to_string(index=False) if len(diff) else "(none)"
    tail = ("\n\nThe same in all\n" + same.drop(columns="differs").to_string(index=False) if all_fields
            else f"\n\n{len(same)} answers are the same in all (--all lists them)")
    return head + "\n\n" + body + tail


def matrix(root: Path = MATRIX) -> pd.DataFrame:
    """The version matrix's facts, one row per (release, GPU, step): compile mode, graph mode, padding, MoE path.

    Read from data/matrix/vllm-*.json (scripts/contract.py); no vLLM is imported.
    """
    rows = []
    for p in root.glob("vllm-*.json"):
        r = json.loads(p.read_text())
        for f in r.get("facts", []):
            base = {"vllm": r["vllm"], "gpu": f["gpu"], "compile_mode": f.get("compile_mode"),
                    "cudagraph_mode_config": f.get("cudagraph_mode"), "scheduler": f.get("scheduler"),
                    "async_scheduling": f.get("async_scheduling"), "attention": f.get("attention_backend"),
                    "moe_backend": f.get("moe_backend"), "default_budget": f.get("default_budget"),
                    "error": f.get("error")}
            for s in f.get("steps", []) or [{}]:
                rows.append({**base, "tokens": s.get("tokens"), "padded": s.get("padded"),
                             "cudagraph": s.get("cudagraph"), "compiled": s.get("compiled"),
                             "moe_experts": s.get("moe_experts"), "note": s.get("note")})
    if not rows:
        raise DiagError(f"no version-matrix results under {root} (make matrix writes them)")
    df = pd.DataFrame(rows)
    df["release"] = df["vllm"].map(lambda v: tuple(int(x) for x in v.split(".")))
    return df.sort_values(["release", "gpu", "tokens"]).drop(columns="release").reset_index(drop=True)
