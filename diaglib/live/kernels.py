"""Observed kernels against the kernel census: every kernel a profiled probe launched, step by step, each paired
with the census op that predicts it.

The child marks the model runner's work in the torch-profiler trace (:data:`MARK` ranges): ``step N KIND`` around
each ``execute_model`` (KIND ``execute``) or the profile run's dummy run (``profile``), ``forward`` around the
forward pass, ``sample`` around the sampler. A kernel belongs to the step whose range holds its launch (the CUDA
runtime or driver call with the kernel's correlation id; a CUDA-graph replay's kernels share the graph launch's),
and to a phase: ``prepare`` (before the forward), ``forward``, ``post`` (after it: the logits) or ``sample``.

The census (diaglib.predict.census.launches) predicts, for the same requests (tokens and context per request),
every kernel in launch order with a kernel-name pattern and, where it knows one, the grid. The two orders are
aligned per phase (setup / model / sampling) by a weighted longest common subsequence: a kernel pairs only with an
op whose pattern it matches, a Triton kernel's own name or a custom kernel's name counting more than Inductor's
``triton_*`` or an ATen kernel for an eager torch op, an equal grid more again; a kernel next to one paired with
an op, matching that op's pattern, is that op's too (an op may launch several). Unpaired kernels are the ones the
census did not foresee; unpaired ops are predicted kernels that did not run (an Inductor op whose fusion group got
a kernel counts as fused, not missing).
"""
from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DiagError

MARK = "diaglib::"
COLUMNS = ["step", "kind", "phase", "seq", "name", "grid", "block", "dur_us"]
# census phase -> alignment group, and the observed phases of each group
_CENSUS_GROUP = {"setup": "setup", "model": "model", "logits": "sampling", "sampler": "sampling"}
_OBSERVED_GROUP = {"prepare": "setup", "forward": "model", "post": "sampling", "sample": "sampling"}
# kernels of PyTorch's own library, cuBLAS and CUB: what an eager torch op launches
_ATEN = re.compile(r"at::native::|at_cuda_detail|\bcub::|gemm|nvjet|xmma|cublas", re.IGNORECASE)


# --- the trace -----------------------------------------------------------------------------------------

def _events(trace) -> list[dict]:
    if isinstance(trace, dict):
        return trace.get("traceEvents", [])
    p = Path(trace)
    with (gzip.open if p.suffix == ".gz" else open)(p, "rt") as f:
        return json.load(f).get("traceEvents", [])


def _dims(value) -> tuple[int, int, int] | None:
    if not isinstance(value, (list, tuple)) or not value:
        return None
    v = [int(x) for x in value] + [1, 1]
    return tuple(v[:3])


def trace_steps(trace) -> pd.DataFrame:
    """Every kernel of a profiled probe's chrome trace (a path, .json or .json.gz, or the loaded dict), in launch
    order within its step: step (-1: launched outside any marked step), kind, phase, seq, name, grid, block, dur_us."""
    events = _events(trace)
    launch_ts = {ev["args"]["correlation"]: float(ev["ts"]) for ev in events
                 if ev.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in ev.get("args", {})}
    steps, spans = [], {"forward": [], "sample": []}
    for ev in events:
        name = ev.get("name", "")
        if ev.get("cat") != "user_annotation" or not name.startswith(MARK):
            continue
        start, end = float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0))
        words = name[len(MARK):].split()
        if words[0] == "step":
            steps.append((start, end, int(words[1]), words[2]))
        elif words[0] in spans:
            spans[words[0]].append((start, end))
    steps.sort()
    starts = [s[0] for s in steps]
    rows = []
    for ev in events:
        if ev.get("cat") != "kernel":
            continue
        args = ev.get("args", {})
        t = launch_ts.get(args.get("correlation"))
        at = int(np.searchsorted(starts, t, side="right")) - 1 if t is not None else -1
        step, kind, phase = -1, None, "unmarked"
        if at >= 0:
            start, end, step, kind = steps[at]
            if any(a <= t <= b for a, b in spans["forward"]):
                phase = "forward"
            elif any(a <= t <= b for a, b in spans["sample"]):
                phase = "sample"
            elif t <= end:
                after = any(a >= start and b <= t for a, b in spans["forward"])
                phase = "post" if after else "prepare"
            else:
                phase = "between"
        rows.append((step, kind, phase, t if t is not None else float("inf"), float(ev.get("ts", 0)),
                     ev.get("name", "?"), _dims(args.get("grid")), _dims(args.get("block")),
                     round(float(ev.get("dur", 0)), 3), args.get("stream", ev.get("tid"))))
    df = pd.DataFrame(rows, columns=["step", "kind", "phase", "t", "ts", "name", "grid", "block", "dur_us",
                                     "stream"])
    # a kernel with no launch record takes the step and phase of the kernel before it on its stream
    df = df.sort_values(["stream", "ts"], kind="stable")
    lost = df["t"] == float("inf")
    for c in ("step", "kind", "phase", "t"):
        df[c] = df[c].mask(lost).groupby(df["stream"]).ffill()
    df = df.fillna({"step": -1, "phase": "unmarked", "t": float("inf")}).astype({"step": int})
    df = df.sort_values(["step", "t", "ts"], kind="stable", ignore_index=True)
    df["seq"] = df.groupby("step").cumcount()
    return df[COLUMNS]


def write(df: pd.DataFrame, path: str | Path) -> Path:
    """A per-step kernel table as gzipped CSV (grid and block as ``x,y,z``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.copy()
    for c in ("grid", "block"):
        out[c] = out[c].map(lambda d: "" if d is None else ",".join(map(str, d)))
    with gzip.open(path, "wt") as f:
        out.to_csv(f, index=False)
    return path


def read(path: str | Path) -> pd.DataFrame:
    """A table :func:`write` made, grids and blocks as tuples."""
    with gzip.open(path, "rt") as f:
        df = pd.read_csv(io.StringIO(f.read()), keep_default_na=False, dtype={"grid": str, "block": str})
    for c in ("grid", "block"):
        df[c] = df[c].map(lambda s: tuple(int(x) for x in s.split(",")) if s else None)
    return df


# --- the census step of an observed step -----------------------------------------------------------------

def census_steps(record: dict, sc) -> list[tuple[int, object]]:
    """(observed step, census Step) for every runner step of a profiled probe record that ran tokens: each
    request's query from what the step scheduled, its context from what earlier steps scheduled for it."""
    from ..predict import census

    prompts = {str(i): int(n) for i, n in enumerate(record.get("probe", {}).get("prompts", []))}
    out, done = [], {}
    for i, s in enumerate(record.get("runner_steps") or []):
        if s["kind"] == "profile":
            out.append((i, census.profile(sc, s.get("total"))))
            continue
        per = {k: int(v) for k, v in (s.get("per_prompt") or {}).items() if int(v) > 0}
        if not per:
            continue
        prefilling = {k for k in per if done.get(k, 0) < prompts.get(k, 0)}
        order = sorted(per, key=lambda k: (k in prefilling, int(k) if k.isdigit() else k))  # decodes first
        query = tuple(per[k] for k in order)
        context = tuple(done.get(k, 0) for k in order)
        kind = "prefill" if prefilling == set(per) else "decode" if not prefilling else "mixed"
        out.append((i, census.Step(kind, query, context)))
        for k in order:
            done[k] = done.get(k, 0) + per[k]
    return out


# --- matching --------------------------------------------------------------------------------------------

def _tier(runs_as: str, kind_hint: str) -> int:
    if kind_hint == "^triton_":
        return 2
    if runs_as.startswith("eager torch"):
        return 2
    return 4 if kind_hint.startswith("^") and kind_hint.endswith("$") else 3


def _score(pred: pd.DataFrame, obs: pd.DataFrame) -> np.ndarray:
    """score[i, j]: how well predicted op i explains observed kernel j (0: it cannot)."""
    names = list(dict.fromkeys(obs["name"]))
    keys = list(dict.fromkeys(zip(pred["match"], pred["runs_as"])))
    base = np.zeros((len(keys), len(names)), dtype=np.uint8)
    for a, (pattern, runs_as) in enumerate(keys):
        rx = re.compile(pattern, re.IGNORECASE)
        tier = _tier(runs_as, pattern)
        for b, name in enumerate(names):
            if rx.search(name):
                base[a, b] = tier
            elif runs_as.startswith("eager torch") and _ATEN.search(name):
                base[a, b] = 1
    ki = {k: i for i, k in enumerate(keys)}
    ni = {n: i for i, n in enumerate(names)}
    score = base[np.array([ki[k] for k in zip(pred["match"], pred["runs_as"])], dtype=np.int64)][
        :, np.array([ni[n] for n in obs["name"]], dtype=np.int64)]
    grids = np.array([g if g is not None else (-1, -1, -1) for g in obs["grid"]], dtype=np.int64).reshape(-1, 3)
    for i, g in enumerate(pred["grid"]):
        if g is not None and not (isinstance(g, float) and np.isnan(g)):
            same = (grids == np.array(tuple(g), dtype=np.int64)).all(axis=1)
            score[i] = np.where(same & (score[i] > 0), score[i] + 1, score[i])
    return score


def _align(score: np.ndarray) -> list[tuple[int, int]]:
    """The pairs (i, j) of a highest-scoring common subsequence (each i and j at most once, both increasing)."""
    n, m = score.shape
    if not n or not m:
        return []
    dtype = np.uint16 if int(score.max()) * min(n, m) < 65535 else np.int32
    dp = np.zeros((n + 1, m + 1), dtype=dtype)
    for i in range(n):
        prev = dp[i]
        dp[i + 1, 1:] = np.maximum.accumulate(np.maximum(prev[1:], prev[:-1] + score[i].astype(dtype)))
    pairs, i, j = [], n, m
    while i and j:
        s = score[i - 1, j - 1]
        if s and dp[i, j] == dp[i - 1, j - 1] + s:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif dp[i, j] == dp[i - 1, j]:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def match(observed: pd.DataFrame, predicted: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pair one step's observed kernels (:func:`trace_steps` rows) with the census's launches for it.

    Returns (kernels, missing): ``kernels`` is ``observed`` with census_row, census_seq, module, op, runs_as, fusion,
    predicted_grid, grid_equal (None where the census predicts no grid) and ``foreseen``; ``missing`` the
    predicted ops no kernel paired with, with ``fused`` (an Inductor op whose fusion group got a kernel)."""
    obs = observed.reset_index(drop=True).copy()
    pred = predicted.reset_index(drop=True).copy()
    obs["group"] = obs["phase"].map(_OBSERVED_GROUP)
    pred["group"] = pred["phase"].map(_CENSUS_GROUP)
    paired: dict[int, int] = {}
    for group in ("setup", "model", "sampling"):
        o, p = obs.index[obs["group"] == group], pred.index[pred["group"] == group]
        if len(o) and len(p):
            score = _score(pred.loc[p], obs.loc[o])
            pairs = _align(score)
            for i, j in pairs:
                paired[int(o[j])] = int(p[i])
            # an op may launch several kernels: one its pattern matches, next to a kernel paired with it
            at = {j: i for i, j in pairs}
            for order in (range(1, len(o)), range(len(o) - 2, -1, -1)):
                for j in order:
                    near = j - 1 if order.step > 0 else j + 1
                    if j not in at and near in at and score[at[near], j]:
                        at[j] = at[near]
                        paired[int(o[j])] = int(p[at[j]])
    # a kernel Inductor generated stands for its whole fusion group: named by the group's first op and its ops
    first, ops = {}, {}
    for i in pred.index[pred["runs_as"] == "inductor"]:
        f = pred.at[i, "fusion"]
        first.setdefault(f, i)
        ops.setdefault(f, []).append(pred.at[i, "op"].split("::")[-1])
    paired = {k: first.get(pred.at[i, "fusion"], i) if pred.at[i, "runs_as"] == "inductor" else i
              for k, i in paired.items()}
    cols = {"census_seq": "seq", "module": "module", "op": "op", "runs_as": "runs_as", "fusion": "fusion",
            "predicted_grid": "grid"}
    for new, old in cols.items():
        obs[new] = [pred.at[paired[k], old] if k in paired else None for k in obs.index]
    obs["census_row"] = [paired.get(k) for k in obs.index]  # the row of the census's launches table
    obs["op"] = [f"fused {'+'.join(dict.fromkeys(ops[f]))}" if r == "inductor" else o
                 for o, r, f in zip(obs["op"], obs["runs_as"], obs["fusion"])]
    obs["foreseen"] = obs.index.isin(list(paired))
    obs["grid_equal"] = [None if g is None or (isinstance(g, float) and np.isnan(g)) else tuple(g) == o
                         for g, o in zip(obs["predicted_grid"], obs["grid"])]
    used = set(paired.values())
    groups = {pred.at[i, "fusion"] for i in used if pred.at[i, "runs_as"] == "inductor"}
    missing = pred.loc[~pred.index.isin(list(used)) & ~((pred["runs_as"] == "inductor") & pred.index.isin(
        [first[f] for f in groups]))].copy()
    missing["fused"] = (missing["runs_as"] == "inductor") & missing["fusion"].isin(groups)
    return obs.drop(columns="group"), missing.drop(columns="group")


# --- a store's profiled probes -------------------------------------------------------------------------

def kernel_path(store_path: str | Path, run: str, key: str) -> Path:
    """Where a probe's per-step kernel table lives beside its record store."""
    return Path(store_path).parent / "kernels" / f"{run.replace('/', '+')}.{key}.csv.gz"


def profiled(store_path: str | Path, run: str | None = None) -> list[dict]:
    """The store's probe records that carry a per-step kernel table."""
    from . import store

    return [r for r in store.read(store_path) if r.get("type") == "probe" and r.get("kernel_file")
            and (run is None or r["run"] == run)]


def _engine_of(store_path: Path, record: dict) -> dict:
    from . import store

    eng = next((e for e in store.read(store_path) if e.get("type") == "engine" and e.get("outcome") == "ok"
                and e["run"] == record["run"] and e["engine_id"] == record["engine_id"]), None)
    if eng is None:
        raise DiagError(f"no engine record for {record['run']}/{record['key']} in {store_path}")
    return eng


def _settings(eng: dict) -> dict:
    """The VLLM_* settings the engine ran with that decide what it builds (not how the probe child runs it)."""
    from .compare import _CHILD_ENV

    return {k: v for k, v in (eng.get("env") or {}).items() if k.startswith("VLLM_") and k not in _CHILD_ENV}


def _scenario_of(store_path: Path, eng: dict):
    from ..scenario import load
    from .compare import local_command

    gpu = (eng.get("info") or {}).get("gpu_name", "NVIDIA H200")
    return load(cmd=local_command(eng["spec"], store_path.parent), gpu=gpu, gpu_count=1)


def compare(store_path: str | Path, run: str | None = None, key: str | None = None,
            steps: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Predicted against observed kernels for every profiled step of the store (or of ``run`` / ``key`` /
    ``steps``): (summary, kernels, missing).

    ``summary``: one row per step: run, key, step, census (the census step), padded and cudagraph (census),
    observed_mode and observed_tokens (the forward pass as recorded), kernels, foreseen, unforeseen, predicted,
    paired (predicted ops a kernel paired with), fused, not_launched, grids_predicted, grids_equal, gpu_us.
    ``kernels`` / ``missing``: :func:`match`'s tables of every step, with run, key and step.

    Each probe's comparison is kept in diaglib's cache (under its records less the run's name, its kernel table,
    the engine's command with its model files in place of its path, and the environment), so a report redoes no
    census for a record it has compared before, nor for a copy of it."""
    from .. import cache
    from .compare import local_command

    store_path = Path(store_path)
    rows, ks, ms = [], [], []
    for r in profiled(store_path, run):
        if key is not None and r["key"] != key:
            continue
        eng = _engine_of(store_path, r)
        command = local_command(eng["spec"], store_path.parent)
        parts = {"record": _unnamed(r), "engine": _unnamed(eng), "steps": steps, **cache.command_content(command),
                 "table": cache.file_hash(store_path.parent / r["kernel_file"])}
        summary, k, m = cache.memo("kernels", parts, lambda: _compare_probe(store_path, r, eng, steps), pickled=True)
        rows += [{**row, "run": r["run"]} for row in summary]
        ks.append(k.assign(run=r["run"]))
        ms.append(m.assign(run=r["run"]))
    if not rows:
        raise DiagError(f"no profiled probe with a kernel table in {store_path}"
                        + (f" for run {run!r}" if run else "") + (f" key {key!r}" if key else ""))
    return pd.DataFrame(rows), pd.concat(ks, ignore_index=True), pd.concat(ms, ignore_index=True)


def _unnamed(record: dict) -> dict:
    """A record without its run's name: the key of what it shows, wherever the record is copied to."""
    return {k: v for k, v in record.items() if k != "run"}


def _compare_probe(store_path: Path, r: dict, eng: dict,
                   steps: list[int] | None) -> tuple[list[dict], pd.DataFrame, pd.DataFrame]:
    """One profiled probe's comparison: summary rows, kernels and missing tables."""
    from .. import compat

    with compat.vllm_env(_settings(eng)):  # the census under the settings the engine ran with
        predicted = _predicted(store_path, eng, r, steps)
    table = read(store_path.parent / r["kernel_file"])
    forwards = [f for f in r.get("forwards") or []]
    rows, ks, ms = [], [], []
    for i, step, p, lk in predicted:
        obs = table[table["step"] == i]
        k, m = match(obs, lk)
        f = forwards[i] if step.kind != "profile" and i < len(forwards) else {}
        checked = k["grid_equal"].dropna()
        rows.append({"run": r["run"], "key": r["key"], "step": i, "census": step.label(), "padded": p.padded,
                     "cudagraph": p.cudagraph, "observed_mode": f.get("mode"),
                     "observed_tokens": f.get("num_tokens"), "kernels": len(k),
                     "foreseen": int(k["foreseen"].sum()), "unforeseen": int((~k["foreseen"]).sum()),
                     "predicted": len(lk), "paired": len(lk) - len(m),
                     "fused": int(m["fused"].sum()), "not_launched": int((~m["fused"]).sum()),
                     "grids_predicted": len(checked), "grids_equal": int(checked.astype(bool).sum()),
                     "gpu_us": round(float(obs["dur_us"].sum()), 1)})
        ks.append(k.assign(run=r["run"], key=r["key"]))
        ms.append(m.assign(run=r["run"], key=r["key"], step=i))
    return rows, pd.concat(ks, ignore_index=True), pd.concat(ms, ignore_index=True)


def _predicted(store_path: Path, eng: dict, record: dict, steps: list[int] | None) -> list[tuple]:
    """(step, census Step, Pass, launches) for the record's profiled steps."""
    from ..predict import census

    sc = _scenario_of(store_path, eng)
    return [(i, step, census.record(sc, step), census.launches(sc, step)) for i, step in census_steps(record, sc)
            if steps is None or i in steps]


def unforeseen(kernels: pd.DataFrame) -> pd.DataFrame:
    """The kernels the census did not foresee, by name and phase: launches, steps, total GPU time."""
    k = kernels[~kernels["foreseen"]]
    return (k.groupby(["name", "phase"], sort=False)
            .agg(launches=("seq", "size"), steps=("step", "nunique"), gpu_us=("dur_us", "sum"))
            .reset_index().sort_values("launches", ascending=False, ignore_index=True))


def by_op(kernels: pd.DataFrame) -> pd.DataFrame:
    """Foreseen kernels by census op (layers folded): kernel name, launches, grid predicted and observed."""
    k = kernels[kernels["foreseen"]].copy()
    k["module"] = k["module"].str.replace(r"\blayers\.\d+\.", "layers.*.", regex=True)
    for c in ("grid", "predicted_grid"):
        k[c] = k[c].map(lambda g: None if g is None or (isinstance(g, float) and np.isnan(g)) else str(tuple(g)))
    return (k.groupby(["run", "key", "step", "module", "op", "runs_as", "name"], sort=False, dropna=False)
            .agg(launches=("seq", "size"), grid=("grid", "first"), predicted_grid=("predicted_grid", "first"),
                 grid_equal=("grid_equal", lambda s: None if s.isna().all() else bool(s.dropna().all())),
                 gpu_us=("dur_us", "sum"))
            .reset_index())
