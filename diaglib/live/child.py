"""The probe child: builds one engine, then runs the probes the parent sends, one at a time.

Protocol: ``python -m diaglib.live.child JOB.json``; probes arrive as JSON lines on stdin, and each answer
goes as one JSON line to the file descriptor named by DIAGLIB_PROTO_FD (stdout and stderr are the log).
The first answer is ``{"event": "ready", ...}``; a fault ends the child, and the parent starts a fresh one.
vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so its scheduler and model runner can be
watched: the tokens each scheduler step scheduled, and the graph mode of each forward pass.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

from . import kernels, observe, planted

_REQ = re.compile(r"^r(\d+)")


def token_ids(n: int, vocab: int, key: str, index: int) -> list[int]:
    """``n`` prompt token ids in [1, vocab), fixed by (key, index) and distinct between probes (no prefix hits)."""
    import numpy as np

    seed = zlib.crc32(f"{key}/{index}".encode())
    return np.random.default_rng(seed).integers(1, vocab, size=n).tolist()


class NoEngine:
    """A child without a model: runs planted faults only (CPU tests)."""

    vocab = 0
    dirty = False

    def info(self) -> dict:
        return {"engine": "none"}

    def run(self, probe: dict) -> dict:
        _maybe_planted(probe)
        return {"status": "ok", "steps": [], "forwards": []}


def _maybe_planted(probe: dict) -> None:
    p = probe.get("planted")
    if not p:
        return
    if p["fault"] in planted.CPU_FAULTS:
        planted.cpu_fault(p["fault"])
    elif p["fault"] == "oob_write":
        planted.oob_write(int(p.get("m", sum(probe.get("prompts", [])))), int(p["threshold"]))
    elif p["fault"] != "oob_in_forward":
        raise ValueError(f"unknown planted fault {p['fault']!r}")


class VllmEngine:
    """vLLM's LLMEngine built in this process from the serve argv, with its scheduler and runner watched."""

    def __init__(self, spec: dict):
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        from .engine import engine_args

        self.engine = LLMEngine.from_engine_args(engine_args(spec["argv"]),
                                                 usage_context=UsageContext.OPENAI_API_SERVER,
                                                 enable_multiprocessing=False)
        self.core = self.engine.engine_core.engine_core
        self.vllm_config = self.core.vllm_config
        self.vocab = int(spec.get("vocab") or self.vllm_config.model_config.get_vocab_size())
        self.rec: dict | None = None
        self.dirty = False
        self.plant: dict | None = None  # a planted fault to launch inside the forward pass
        self.graphs_on = getattr(self.vllm_config.compilation_config.cudagraph_mode, "name", "NONE") != "NONE"
        self.runner = self.engine.model_executor.driver_worker.worker.model_runner
        self.marking = False  # while a probe is profiled: mark the runner's steps in the trace
        self._watch_scheduler()
        self._watch_forwards()
        self._watch_runner()

    def _watch_scheduler(self) -> None:
        sched = self.core.scheduler
        orig = sched.schedule

        def schedule(*a, **kw):
            out = orig(*a, **kw)
            if self.rec is not None:
                per = {}
                for rid, n in out.num_scheduled_tokens.items():
                    m = _REQ.match(rid)
                    per[m.group(1) if m else rid] = int(n)
                self.rec["steps"].append({"total": int(out.total_num_scheduled_tokens), "per_prompt": per,
                                          "t": round(time.monotonic() - self.rec["t0"], 4)})
            return out

        sched.schedule = schedule

    def _watch_forwards(self) -> None:
        import importlib

        for name in ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner"):
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the second runner exists in newer versions only
                continue
            orig = getattr(mod, "set_forward_context", None)
            if orig is None:
                continue

            def wrapped(*a, _orig=orig, **kw):
                if self.rec is not None:
                    mode = kw.get("cudagraph_runtime_mode")
                    desc = kw.get("batch_descriptor")
                    self.rec["forwards"].append({
                        "num_tokens": kw.get("num_tokens"),
                        "mode": getattr(mode, "name", None if mode is None else str(mode)),
                        "descriptor_tokens": getattr(desc, "num_tokens", None)})
                    p = self.plant
                    if p and self.graphs_on and kw.get("num_tokens") == int(p["tokens"]):
                        planted.oob_write(int(p["tokens"]), int(p["tokens"]), sync=False)
                if self.marking:
                    return _marked(_orig(*a, **kw), "forward")
                return _orig(*a, **kw)

            mod.set_forward_context = wrapped

    def _watch_runner(self) -> None:
        """Mark, in a profiled probe's trace, each step of the model runner (execute_model, or the profile run's
        dummy run) and its sampler, and record what each step scheduled (diaglib.live.kernels reads both)."""
        r = self.runner

        def marked(fn, what: str, step: str | None = None):
            def wrapper(*a, **kw):
                if not self.marking:
                    return fn(*a, **kw)
                if step is None:
                    return _call_marked(fn, what, a, kw)
                n = len(self.rec["runner_steps"])
                self.rec["runner_steps"].append(_runner_step(step, a, kw, self.vllm_config))
                return _call_marked(fn, f"step {n} {step}", a, kw)

            return wrapper

        r.execute_model = marked(r.execute_model, "execute", "execute")
        r.sample_tokens = marked(r.sample_tokens, "sample")
        r._dummy_run = marked(r._dummy_run, "dummy", "profile")
        r._dummy_sampler_run = marked(r._dummy_sampler_run, "sample")

    def info(self) -> dict:
        import torch

        from .. import compat
        from ..predict.architecture import method_rows

        c = self.vllm_config
        free, total = torch.cuda.mem_get_info()
        runner = self.engine.model_executor.driver_worker.worker.model_runner
        return {
            "engine": "vllm", "vllm": compat.installed(), "torch": torch.__version__,
            "gpu_name": torch.cuda.get_device_name(), "vocab": self.vocab,
            "compilation": compat.compilation_summary(c), "scheduler": compat.scheduler_summary(c),
            "cache": compat.cache_summary(c), "num_gpu_blocks": c.cache_config.num_gpu_blocks,
            "moe": _moe_classes(runner.get_model()), "attention": _observed(_attention_backends, c),
            "linear_methods": _observed(method_rows, runner.get_model()), "free_gib": free / observe.GiB,
            "total_gib": total / observe.GiB, "memory": observe.memory_summary(),
        }

    def run(self, probe: dict) -> dict:
        import torch
        from vllm import SamplingParams

        prompts = [int(n) for n in probe.get("prompts", [])]
        ids = [token_ids(n, self.vocab, probe["key"], i) for i, n in enumerate(prompts)]
        bad = [i for i, t in enumerate(ids) if t and max(t) >= self.vocab]
        if bad:  # class 14: vLLM would accept them and fault asynchronously
            raise ValueError(f"prompt {bad[0]} has token ids >= the vocab {self.vocab}")
        mt = probe.get("max_tokens", 2)
        sps = [SamplingParams(max_tokens=int(n), ignore_eos=True, temperature=0.0, detokenize=False)
               for n in (mt if isinstance(mt, list) else [mt] * len(prompts))]
        arrivals = probe.get("arrivals") or [0] * len(prompts)
        pending = sorted(zip(arrivals, range(len(prompts))))
        torch.cuda.reset_peak_memory_stats()
        p = probe.get("planted")
        self.plant = p if p and p["fault"] == "oob_in_forward" else None
        self.rec = rec = {"steps": [], "forwards": [], "runner_steps": [], "t0": time.monotonic()}
        self.dirty = bool(prompts) or bool(probe.get("planted")) or bool(probe.get("profile_run"))
        out_tokens = 0
        with _profiled(probe.get("profile")) as prof:
            self.marking = prof is not None
            try:
                if probe.get("profile_run"):
                    self.runner.profile_run()  # vLLM's own start-up profile run, again
                step = 0
                while pending or self.engine.has_unfinished_requests():
                    while pending and pending[0][0] <= step:
                        _, i = pending.pop(0)
                        self.engine.add_request(f"r{i}", {"prompt_token_ids": ids[i]}, sps[i])
                    for o in self.engine.step():
                        if o.finished:
                            out_tokens += sum(len(c.token_ids) for c in o.outputs)
                    step += 1
                _maybe_planted(probe)
                torch.cuda.synchronize()
            finally:
                self.rec = self.plant = None
                self.marking = False
        self.dirty = False
        result = {"status": "ok", "steps": rec["steps"], "forwards": rec["forwards"], "output_tokens": out_tokens,
                  "probe_s": round(time.monotonic() - rec["t0"], 4)}
        if prof is not None:
            result["runner_steps"] = rec["runner_steps"]
            try:
                result["kernels"], result["kernel_steps"] = _kernel_rows(prof)
            except Exception as e:  # noqa: BLE001 - the probe ran; a trace that won't parse must not end the engine
                result["kernel_error"] = f"{type(e).__name__}: {e}"[:500]
        return result


def _moe_classes(model) -> dict:
    """Class names of the first FusedMoE layer's quant method and the expert kernels it holds."""
    from vllm.model_executor.layers.fused_moe import FusedMoE

    for m in model.modules():
        if not isinstance(m, FusedMoE):
            continue
        qm = getattr(m, "quant_method", None)
        found = {"layer": type(m).__name__, "quant_method": type(qm).__name__,
                 "w13": list(getattr(m, "w13_weight").shape) if hasattr(m, "w13_weight") else None,
                 "w2": list(getattr(m, "w2_weight").shape) if hasattr(m, "w2_weight") else None}
        seen = set()

        def walk(obj, path, depth):
            for k, v in list(vars(obj).items()) if hasattr(obj, "__dict__") else []:
                mod = type(v).__module__ or ""
                if id(v) in seen or not mod.startswith("vllm.model_executor.layers.fused_moe"):
                    continue
                seen.add(id(v))
                found[f"{path}.{k}"] = type(v).__name__
                if depth:
                    walk(v, f"{path}.{k}", depth - 1)

        walk(qm, "quant_method", 2)
        return found
    return {}


def _runner_step(kind: str, args: tuple, kwargs: dict, cfg) -> dict:
    """What one runner step runs: the tokens per prompt its scheduler output holds (the profile run: the budget)."""
    if kind == "profile":
        n = kwargs.get("num_tokens", args[0] if args else cfg.scheduler_config.max_num_batched_tokens)
        return {"kind": kind, "total": int(n), "is_profile": bool(kwargs.get("is_profile"))}
    out = kwargs.get("scheduler_output", args[0] if args else None)
    per = {}
    for rid, n in getattr(out, "num_scheduled_tokens", {}).items():
        m = _REQ.match(rid)
        per[m.group(1) if m else rid] = int(n)
    return {"kind": kind, "total": int(getattr(out, "total_num_scheduled_tokens", 0)), "per_prompt": per}


def _call_marked(fn, what: str, args: tuple, kwargs: dict):
    import torch

    with torch.profiler.record_function(kernels.MARK + what):
        return fn(*args, **kwargs)


@contextlib.contextmanager
def _marked(cm, what: str):
    """``cm`` (a context manager) entered inside a profiler range named ``diaglib::what``."""
    import torch

    with torch.profiler.record_function(kernels.MARK + what), cm as value:
        yield value


def _observed(fn, *args):
    """``fn(*args)``, or a one-element list saying why not (an observation never stops the engine)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return [{"error": f"{type(e).__name__}: {e}"[:300]}]


def _attention_backends(cfg) -> list[dict]:
    """Per kind of attention layer (class, backend): layers and FlashAttention version, as the engine built them."""
    from .. import compat

    ctx = cfg.compilation_config.static_forward_context
    kinds: dict[tuple, dict] = {}
    for name, backend in compat.layer_backends(ctx).items():
        key = (type(ctx[name]).__name__, compat.backend_name(backend))
        row = kinds.setdefault(key, {"layer": key[0], "backend": key[1], "layers": 0, "first": name,
                                     "flash_attn_version": compat.flash_attn_version(ctx[name])})
        row["layers"] += 1
    return list(kinds.values())


@contextlib.contextmanager
def _profiled(on: bool):
    if not on:
        yield None
        return
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]  # CPU: the launch marks
    with torch.profiler.profile(activities=acts) as prof:
        yield prof


def _kernel_rows(prof, top: int = 60) -> tuple[list[dict], dict]:
    """The grouped kernel table (top ``top`` by time, and every MoE kernel) and the per-step table, packed."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        table = observe.kernel_table(path)
        per_step = kernels.trace_steps(path)
        keep_dir = os.environ.get("DIAGLIB_TRACE_DIR")
        if keep_dir:
            import gzip
            import shutil

            Path(keep_dir).mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as src, gzip.open(Path(keep_dir) / f"trace-{os.getpid()}-{time.time_ns()}.json.gz",
                                                   "wb") as dst:
                shutil.copyfileobj(src, dst)
    keep = table.head(top)
    moe = table[table.moe & ~table.index.isin(keep.index)]
    packed = json.loads(per_step.to_json(orient="split", index=False))  # columns, data: plain JSON values
    return pd.concat([keep, moe]).to_dict("records"), packed


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child when the parent dies (a killed notebook leaves no GPU holder)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the stdin EOF still ends the loop
        pass


def _record_memory_history() -> None:
    """Record the caching allocator's events (Python stacks only: symbolising C++ frames takes minutes)."""
    import torch

    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")


def _dump_memory_snapshot(path: str) -> str:
    """Write the allocator snapshot (pytorch.org/memory_viz reads it); host-side, so it works after a fault."""
    import torch

    try:
        torch.cuda.memory._dump_snapshot(path)
    except Exception as e:  # noqa: BLE001 - a snapshot is evidence, never a reason to lose the result
        return f"not written: {type(e).__name__}: {e}"[:300]
    return path


def _fatal(exc: BaseException, dirty: bool) -> bool:
    """Whether the engine is unusable after ``exc``: any error once requests were in flight, or from CUDA."""
    return dirty or not isinstance(exc, (ValueError, KeyError)) or "CUDA" in str(exc)


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    proto = os.fdopen(int(os.environ["DIAGLIB_PROTO_FD"]), "w", buffering=1)
    _die_with_parent()

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg, default=str) + "\n")
        proto.flush()

    t0 = time.monotonic()
    spec = job["engine"]
    snapshot = os.environ.get("DIAGLIB_MEMORY_SNAPSHOT") if spec["kind"] == "vllm" else None
    if snapshot:
        _record_memory_history()
    runner = VllmEngine(spec) if spec["kind"] == "vllm" else NoEngine()
    send({"event": "ready", "ready_s": round(time.monotonic() - t0, 3), "info": runner.info()})
    for line in sys.stdin:
        probe = json.loads(line)
        t1 = time.monotonic()
        try:
            result = runner.run(probe)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then classified by the parent
            tb = traceback.format_exc()
            sys.stderr.write(tb)
            sys.stderr.flush()
            result = {"status": "error", "exc_type": type(e).__name__, "message": str(e)[:2000],
                      "traceback": tb[-8000:], "fatal": _fatal(e, runner.dirty)}
        result.setdefault("probe_s", round(time.monotonic() - t1, 4))
        if spec["kind"] == "vllm":
            result["memory"] = observe.memory_summary()
        if snapshot:
            result["memory_snapshot"] = _dump_memory_snapshot(snapshot)
        send({"event": "result", "key": probe["key"], **result})
        if result.get("fatal"):
            proto.close()
            os._exit(3)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
