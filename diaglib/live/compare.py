"""Predicted against observed, side by side, from the records of a live run.

The prediction is made here on the CPU for the exact engine the run built (its serve argv, its GPU):
per-step tokens and graph mode from vLLM's real scheduler and dispatcher (diaglib.predict.schedule), given the
KV-cache size the engine logged; memory from diaglib.predict.memory. The observation is what the child recorded
from inside vLLM: the tokens each scheduler step scheduled and the graph mode of each forward pass.

A prediction is made once per (engine, workload) and kept in diaglib's cache (diaglib.cache: keyed by the
vLLM build, diaglib's source, the serve command with the model folder's files in place of its path, the GPU and
the workload, never by the run's name), so a report does not redo it for every record it shows.
"""
from __future__ import annotations

import shlex
from functools import lru_cache
from pathlib import Path

import pandas as pd

from ..errors import DiagError
from . import store
from .engine import STANDINS
from .observe import MOE_KERNEL, GiB

_STEP_COLUMNS = ["run", "key", "step", "predicted_tokens", "observed_tokens", "tokens_match", "predicted_mode",
                 "observed_mode", "predicted_padded", "observed_padded", "mode_match", "predicted_schedule"]


def _engines(records: list[dict]) -> dict[tuple[str, str], dict]:
    """Engine records that came up, by (run, engine_id)."""
    return {(r["run"], r["engine_id"]): r for r in records if r.get("type") == "engine" and r.get("outcome") == "ok"}


def model_folder(spec: dict, store_dir: Path) -> Path | None:
    """The run's model folder found here (as recorded, a stand-in by name, or a models/ folder beside the
    store), or None."""
    model = Path(spec["model_dir"])
    return next((c for c in (model, STANDINS / model.name, Path(store_dir) / "models" / model.name)
                 if (c / "config.json").is_file()), None)


def local_command(spec: dict, store_dir: Path) -> str:
    """The run's serve command with its model folder found here (:func:`model_folder`)."""
    found = model_folder(spec, store_dir)
    if found is None:
        name = Path(spec["model_dir"]).name
        raise DiagError(f"the model folder of this run ({name}) is not here: put its config.json in "
                        f"{STANDINS / name} or {Path(store_dir) / 'models' / name}")
    return shlex.join(["vllm", *[str(found) if a == spec["model_dir"] else a for a in spec["argv"]]])


@lru_cache(maxsize=8)
def _scenario(command: str, gpu: str):
    from ..scenario import load

    return load(cmd=command, gpu=gpu, gpu_count=1)


def _engine_for(command: str, gpu: str, kv_bytes: int | None):
    from ..predict.schedule import Engine

    return Engine(_scenario(command, gpu), kv_bytes)


def _kept(kind: str, command: str, gpu: str, compute, **parts):
    """``compute()`` for this engine, kept in diaglib's cache under the engine (its command, with the model
    folder by content: records copied elsewhere find it), the GPU and ``parts``."""
    from .. import cache

    return cache.memo(kind, {**cache.command_content(command), "gpu": gpu, **parts}, compute)


def _workload(probe: dict):
    from ..predict.workload import Req, Workload

    n = len(probe["prompts"])
    arrivals = probe.get("arrivals") or [0] * n
    mt = probe.get("max_tokens", 2)
    outs = mt if isinstance(mt, list) else [mt] * n
    return Workload(tuple(Req(f"r{i}", int(p), int(o), int(a))
                          for i, (p, o, a) in enumerate(zip(probe["prompts"], outs, arrivals))), probe["key"])


def steps(path: str | Path, run: str | None = None) -> pd.DataFrame:
    """One row per forward step of each probe: predicted vs observed tokens, graph mode and padded size.

    Steps that schedule nothing (async scheduling's trailing steps) run no forward pass; they are left
    out here and counted by :func:`probes`. Planted-fault probes and probes that did not finish are left out.
    """
    return _compare(Path(path), run)[0]


def _compare(path: Path, run: str | None) -> tuple[pd.DataFrame, list[dict]]:
    from ..predict.schedule import quiet_gc

    records = store.read(path)
    engines = _engines(records)
    rows, counts, built = [], [], {}

    def predict(command: str, gpu: str, kv: int | None, probe: dict) -> list[dict]:
        if (command, gpu, kv) not in built:
            built[(command, gpu, kv)] = _engine_for(command, gpu, kv)
        return built[(command, gpu, kv)].run(_workload(probe))[0]

    with quiet_gc():
        for r in records:
            row = _compare_probe(r, engines, path, run, predict)
            if row is not None:
                counts.append(row[0])
                rows += row[1]
    return pd.DataFrame(rows, columns=_STEP_COLUMNS), counts


def _compare_probe(r: dict, engines: dict, path: Path, run: str | None, predict):
    """(counts, step rows) of one probe record, or None when it has nothing to compare."""
    if r.get("type") != "probe" or (run and r["run"] != run) or r.get("outcome") != "ok":
        return None
    if not r["probe"].get("prompts") or r.get("steps") is None:
        return None
    eng = engines.get((r["run"], r["engine_id"]))
    if eng is None:
        return None
    command = local_command(eng["spec"], path.parent)
    gpu = (eng.get("info") or {}).get("gpu_name", "NVIDIA H200")
    kv = eng.get("logged", {}).get("kv_cache_gib")
    kv = int(kv * GiB) if kv else None
    workload = {k: r["probe"].get(k) for k in ("prompts", "max_tokens", "arrivals")}
    pred = _kept("live-steps", command, gpu, lambda: predict(command, gpu, kv, r["probe"]), kv=kv, workload=workload)
    obs = r["steps"]
    counts = {"run": r["run"], "key": r["key"], "predicted_steps": len(pred), "observed_steps": len(obs),
              "predicted_empty_steps": sum(not p["total_tokens"] for p in pred),
              "observed_empty_steps": sum(not o["total"] for o in obs)}
    pf = [p for p in pred if p["total_tokens"]]
    of = [(o, f) for o, f in zip([o for o in obs if o["total"]], r.get("forwards") or [])]
    rows = []
    for i in range(max(len(pf), len(of))):
        p = pf[i] if i < len(pf) else {}
        o, f = of[i] if i < len(of) else ({}, {})
        pt, ot, pm, om = p.get("total_tokens"), o.get("total"), p.get("cudagraph_mode"), f.get("mode")
        pp, op = p.get("padded_tokens"), f.get("num_tokens")
        rows.append({"run": r["run"], "key": r["key"], "step": i, "predicted_tokens": pt, "observed_tokens": ot,
                     "tokens_match": pt == ot, "predicted_mode": pm, "observed_mode": om,
                     "predicted_padded": pp, "observed_padded": op, "mode_match": pm == om and pp == op,
                     "predicted_schedule": p.get("schedule")})
    return counts, rows


def probes(path: str | Path, run: str | None = None) -> pd.DataFrame:
    """One row per probe: outcome, timings, forward steps and empty steps predicted/observed, and whether
    every forward step's tokens (``steps_match``) and graph mode and padding (``modes_match``) match."""
    st, counts = _compare(Path(path), run)
    table = store.probes(path, run)
    if st.empty:
        return table.assign(steps_match=pd.NA, modes_match=pd.NA)
    agg = st.groupby(["run", "key"], sort=False).agg(forward_steps=("step", "size"), steps_match=("tokens_match", "all"),
                                                     modes_match=("mode_match", "all")).reset_index()
    return table.merge(agg.merge(pd.DataFrame(counts), on=["run", "key"]), on=["run", "key"], how="left")


def memory(path: str | Path, run: str | None = None) -> pd.DataFrame:
    """Per engine start: weights, KV cache and CUDA-graph pool, predicted (diaglib.predict.memory) vs vLLM's log.

    Columns: run, engine_id, item, predicted_gib, observed_gib, error_gib, error_pct, predicted_kind.
    """
    from ..predict import memory as mem

    path = Path(path)
    rows, seen = [], {}
    for (_, eid), eng in _engines(store.read(path)).items():
        if run and eng["run"] != run:
            continue
        command = local_command(eng["spec"], path.parent)
        gpu = (eng.get("info") or {}).get("gpu_name", "NVIDIA H200")
        if (command, gpu) not in seen:
            seen[(command, gpu)] = pd.DataFrame(_kept(
                "live-budget", command, gpu,
                lambda: mem.budget(_scenario(command, gpu)).to_dict(orient="records"))).set_index("item")
        b, lg = seen[(command, gpu)], eng.get("logged", {})
        for item, logged in (("weights", "weights_gib"), ("KV cache", "kv_cache_gib"),
                             ("CUDA-graph pool", "graph_pool_gib")):
            if item not in b.index:
                continue
            pred = float(b.loc[item, "GiB"])
            obs = lg.get(logged)
            if obs is None and item == "CUDA-graph pool" and pred == 0:
                obs = 0.0  # no graphs captured (eager): vLLM logs no capture
            err = None if obs is None else pred - obs
            rows.append({"run": eng["run"], "engine_id": eid, "item": item, "predicted_gib": round(pred, 3),
                         "observed_gib": obs, "error_gib": None if err is None else round(err, 3),
                         "error_pct": None if not obs else round(100 * err / obs, 1),
                         "predicted_kind": b.loc[item, "kind"]})
        if lg.get("graph_estimate_gib") is not None and lg.get("graph_pool_gib") is not None:
            e, o = lg["graph_estimate_gib"], lg["graph_pool_gib"]
            rows.append({"run": eng["run"], "engine_id": eid, "item": "CUDA-graph pool (vLLM's own estimate)",
                         "predicted_gib": e, "observed_gib": o, "error_gib": round(e - o, 3),
                         "error_pct": round(100 * (e - o) / o, 1), "predicted_kind": "vLLM"})
    return pd.DataFrame(rows)


def kernels(path: str | Path, run: str | None = None, key: str | None = None) -> pd.DataFrame:
    """The profiled probe's kernel-launch table (name, grid, block, launches, total_us, mean_us, moe)."""
    for r in store.read(path):
        if r.get("type") == "probe" and r.get("kernels") and (run is None or r["run"] == run) \
                and (key is None or r["key"] == key):
            df = pd.DataFrame(r["kernels"])
            df["moe"] = df["name"].str.contains(MOE_KERNEL)  # the current rule, not the one stored
            return df.assign(run=r["run"], key=r["key"])
    raise DiagError(f"no profiled probe in {path}" + (f" for run {run!r}" if run else ""))


def throughput(path: str | Path) -> pd.DataFrame:
    """Per run: engines started, mean engine-ready time, probes per minute of wall time (engine starts
    included), and the same with engine reuse only (probe time alone)."""
    records = store.read(path)
    probes_ = [r for r in records if r.get("type") == "probe" and r.get("phase") == "probe"]
    rows = []
    for run in sorted({r["run"] for r in probes_}):
        ps = [r for r in probes_ if r["run"] == run]
        ready = [e["ready_s"] for e in records if e.get("type") == "engine" and e["run"] == run]
        wall = sum(ready) + sum(r["probe_s"] for r in ps)
        rows.append({"run": run, "probes": len(ps), "engines": len(ready),
                     "mean_ready_s": round(sum(ready) / len(ready), 1) if ready else None,
                     "probe_s_mean": round(sum(r["probe_s"] for r in ps) / len(ps), 3),
                     "probes_per_min": round(60 * len(ps) / wall, 2),
                     "probes_per_min_reuse": round(60 * len(ps) / sum(r["probe_s"] for r in ps), 1)})
    return pd.DataFrame(rows)


# VLLM_* settings the probe child sets itself (how the engine runs in the child, not what it resolves)
_CHILD_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING",)


def predicted_summary(command: str, gpu: str, env: dict) -> dict:
    """`diaglib show --json` for one engine (its serve command, one GPU of its kind), answered in a fresh
    process under the ``VLLM_*`` settings the engine ran with (vLLM reads and caches some once per process)."""
    import json
    import os
    import subprocess
    import sys

    from ..paths import ROOT

    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    base.update({k: v for k, v in env.items() if k.startswith("VLLM_") and k not in _CHILD_ENV})
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    p = subprocess.run([sys.executable, "-m", "diaglib", "show", "--cmd", command, "--gpu", gpu, "--gpu-count", "1",
                        "--json"], capture_output=True, text=True, env=base, cwd=str(ROOT), check=False)
    if p.returncode:
        raise DiagError(f"diaglib show failed for {command}: {(p.stderr or p.stdout).strip()[-300:]}")
    return json.loads(p.stdout)


def engine_config(path: str | Path, run: str | None = None) -> pd.DataFrame:
    """Per engine start: what vLLM resolved on the GPU (compilation, scheduler, cache, attention backend per
    layer kind, MoE method and experts, linear methods and their kernels) against `diaglib show` for the same
    engine. Columns: run, engine_id, item, predicted, observed, match."""
    path = Path(path)
    rows, seen = [], {}
    for (_, eid), eng in _engines(store.read(path)).items():
        if run and eng["run"] != run or not eng.get("info"):
            continue
        info = eng["info"]
        command = local_command(eng["spec"], path.parent)
        gpu = info.get("gpu_name", "NVIDIA H200")
        env = {k: v for k, v in (eng.get("env") or {}).items() if k.startswith("VLLM_") and k not in _CHILD_ENV}
        key = (command, gpu, tuple(sorted(env.items())))
        if key not in seen:
            seen[key] = predicted_summary(command, gpu, env)
        s = seen[key]

        def add(item, predicted, observed, run=eng["run"], eid=eid):
            rows.append({"run": run, "engine_id": eid, "item": item, "predicted": predicted,
                         "observed": observed, "match": predicted == observed})

        after_load = {"cache.block_size": (s["architecture"].get("kv_block_size") or {}).get("after_load")}
        for part in ("compilation", "scheduler", "cache"):
            for k, v in (info.get(part) or {}).items():  # the engine's config is the one after loading its model
                add(f"{part}.{k}", after_load.get(f"{part}.{k}") or s[part].get(k), v)
        fields = ("layer", "backend", "layers", "flash_attn_version")
        add("attention", [{f: a.get(f) for f in fields} for a in s["architecture"]["attention"]],
            [{f: a.get(f) for f in fields} for a in info.get("attention", [])])
        moe, pmoe = info.get("moe") or {}, s.get("moe") or {}
        if moe or pmoe.get("method"):
            add("moe.method", pmoe.get("method"), moe.get("quant_method"))
            experts = pmoe.get("experts")  # "Wrapper -> the kernel it picks at the budget": the class is the wrapper
            add("moe.experts", experts.split(" -> ")[0] if experts else experts,
                next((v for k, v in moe.items() if k.endswith(".fused_experts")), None))
        fields = ("method", "kernels", "layers")
        add("linear_methods", [{f: m[f] for f in fields} for m in s["architecture"]["linear_methods"]],
            [{f: m[f] for f in fields} for m in info.get("linear_methods", [])])
    return pd.DataFrame(rows, columns=["run", "engine_id", "item", "predicted", "observed", "match"])
