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


FEATURES = {  # row label -> how to read it off one release's rows of :func:`matrix` (GPU fixed)
    "compile mode": lambda r: r["compile_mode"].iloc[0],
    "CUDA-graph mode (config)": lambda r: r["cudagraph_mode_config"].iloc[0],
    "scheduler": lambda r: f"{r['scheduler'].iloc[0]}{' (async)' if r['async_scheduling'].iloc[0] else ''}",
    "attention": lambda r: r["attention"].iloc[0],
    "MoE backend": lambda r: r["moe_backend"].iloc[0],
    **{f"step {n}: graph, compiled": (lambda r, n=n: _step(r, n, "cudagraph", "compiled")) for n in (8191, 8192)},
    **{f"step {n}: MoE experts": (lambda r, n=n: _step(r, n, "moe_experts")) for n in (8191, 8192)},
    "step 8193": lambda r: _step(r, 8193, "note") or _step(r, 8193, "cudagraph", "compiled"),
}


def _step(rows: pd.DataFrame, tokens: int, *cols: str) -> str | None:
    hit = rows[rows["tokens"] == tokens]
    if hit.empty:
        return None
    vals = [hit[c].iloc[0] for c in cols]
    return ", ".join(str(v) for v in vals if v is not None and v == v) or None


def release_features(df: pd.DataFrame, gpu: str = "NVIDIA H200") -> pd.DataFrame:
    """One row per feature, one column per release (oldest first): what the seed's command gets on ``gpu``."""
    df = df[df["gpu"] == gpu]
    releases = list(dict.fromkeys(df["vllm"]))
    table = {v: {f: (None if rows["error"].notna().any() else read(rows))
                 for f, read in FEATURES.items()} for v, rows in ((v, df[df["vllm"] == v]) for v in releases)}
    return pd.DataFrame(table, index=list(FEATURES))


def changes(features: pd.DataFrame) -> pd.DataFrame:
    """Where each feature changed from one release to the next: feature, release, before, after."""
    rows = []
    for f, vals in features.iterrows():
        prev = None
        for v, val in vals.items():
            if prev is not None and val != prev[1]:
                rows.append({"feature": f, "from": prev[0], "to": v, "before": prev[1], "after": val})
            prev = (v, val)
    return pd.DataFrame(rows, columns=["feature", "from", "to", "before", "after"])
