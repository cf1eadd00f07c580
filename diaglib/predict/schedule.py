"""What vLLM's real V1 scheduler does with a workload, step by step, and how each step is dispatched.

:func:`trace` replays a :class:`~diaglib.predict.workload.Workload` through the scheduler class the scenario's
config picks (AsyncScheduler on 0.20.2), built with a KVCacheConfig from vLLM's own sizing functions;
each step's batch then goes through vLLM's CUDA-graph dispatcher (diaglib.predict.dispatch). The worker is
replaced by its output alone: partial prefills sample nothing, every other scheduled request samples
one token. :func:`sweep` does this for many prompt lengths x knob settings.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass, field

import pandas as pd

from .. import compat
from ..errors import DiagError
from .dispatch import derived_note, dispatch
from .workload import Workload, single, with_decoders

_SALT = itertools.count()
PHASE_CODE = {"prefill-chunk": "P", "last-prefill-chunk": "L", "decode": "D"}


# --- KV memory --------------------------------------------------------------------------------------


def _model_key(sc) -> dict:
    """What decides the weights vLLM builds for rank 0 (the model and its folder's files, its dtype and
    quantization, the parallel layout, the KV-cache dtype of the attention layers' scales); scheduler knobs are
    not in it, so a sweep over them builds the model once."""
    from .. import cache

    cfg = sc.vllm_config
    mc, pc = cfg.model_config, cfg.parallel_config
    return {"hf_config": mc.hf_config.to_json_string(use_diff=False), "dtype": str(mc.dtype),
            "quantization": str(getattr(mc, "quantization", None)), "model": str(sc.model_dir),
            "parallel": [pc.tensor_parallel_size, pc.pipeline_parallel_size, pc.data_parallel_size,
                         bool(pc.enable_expert_parallel), getattr(pc, "decode_context_parallel_size", 1),
                         getattr(pc, "prefill_context_parallel_size", 1)],
            "cache_dtype": str(cfg.cache_config.cache_dtype), "gpu": sc.gpu.name,
            "impl": [str(getattr(mc, n, None)) for n in ("model_impl", "runner_type", "convert_type")],
            "files": cache.model_files(sc.model_dir), "draft": compat.draft_key(cfg.speculative_config)}


def weights_per_rank_bytes(sc) -> int:
    """Exact weight bytes on one rank: vLLM's model built on the meta device (diaglib.predict.memory), kept in
    diaglib's cache (diaglib.cache) under the model's files and everything that decides its shapes."""
    from .. import cache
    from .memory import weights_total_bytes

    return int(cache.memo_here("weights", _model_key(sc), lambda: weights_total_bytes(sc)))


def kv_specs(sc) -> dict | None:
    """Layer name -> the KV-cache spec each layer of vLLM's model (on the meta device) gives itself, under the
    config as vLLM runs it after loading the model (the block size it may raise then): full, sliding-window,
    chunked-local, MLA and mamba layers as the engine core sizes them. Kept like the weights; None where vLLM
    cannot build the model here (KV sizing then takes every decoder layer as full attention)."""
    from .. import cache
    from .architecture import loaded_config
    from .layers import build_draft, forward_context, rank0, registered

    cc, mc = sc.vllm_config.cache_config, sc.vllm_config.model_config
    parts = {**_model_key(sc), "cache": repr(cc), "max_model_len": mc.max_model_len,
             "sliding_window": str(getattr(mc, "disable_sliding_window", None))}

    def specs():
        try:
            cfg = loaded_config(sc)
            context = forward_context(sc)
            try:
                draft = build_draft(sc)  # the draft's layers have KV caches of their own
            except DiagError:  # the target's layers still answer (the weights row says why)
                draft = None
            context = draft[1] if draft is not None else context
            with registered(sc, context), rank0(sc):
                return compat.layer_kv_cache_specs(cfg, context) or None
        except DiagError:
            return None
    return cache.memo_here("kv-specs", parts, specs, pickled=True)


def default_kv_memory(sc) -> tuple[int, str]:
    """KV-cache bytes per GPU when none is given (a guess, no profile run on CPU): diaglib.predict.memory's
    budget (GPU memory x gpu_memory_utilization - the exact weights of one rank - the profile run's activation
    peak - the non-torch allowance), the same number `diaglib memory` shows."""
    from .memory import NON_TORCH_BYTES, kv_memory_estimate

    util = sc.vllm_config.cache_config.gpu_memory_utilization
    try:
        weights = weights_per_rank_bytes(sc)
    except DiagError as e:
        raise DiagError(f"{e}; without vLLM's model diaglib cannot guess the KV memory: give it "
                        "(--kv-memory-gib, or kv_memory_bytes from Python)") from None
    kv, act, _ = kv_memory_estimate(sc, weights)
    why = (f"KV memory is a GUESS: {sc.gpu.memory_mib} MiB x {util} - weights {weights / 2**30:.2f} GiB (exact: "
           f"vLLM's model on the meta device, this rank) - activation peak {act / 2**30:.2f} GiB (estimate) - "
           f"{NON_TORCH_BYTES >> 30} GiB non-torch = {kv / 2**30:.1f} GiB per GPU (as `diaglib memory`)")
    if kv <= 0:
        raise DiagError(f"no memory left for the KV cache by diaglib's estimate ({why}); give the KV memory "
                        "(--kv-memory-gib, or kv_memory_bytes from Python)")
    return kv, why


_FROZEN = False


@contextlib.contextmanager
def quiet_gc():
    """Keep Python's cyclic garbage collector off the objects that exist already (vLLM's modules and configs, a
    scheduler's block pool) while many short-lived ones are made: each full collection of a heap with vLLM
    imported walks about a million objects. Left alone where something else manages the collector."""
    global _FROZEN
    if _FROZEN or not gc.isenabled() or gc.get_freeze_count():  # the count walks the frozen objects: ask once
        yield
        return
    gc.freeze()
    _FROZEN = True
    try:
        yield
    finally:
        _FROZEN = False
        gc.unfreeze()


# --- the engine: vLLM's scheduler and the worker's outputs ------------------------------------------

class _PrefixHashes:
    """vLLM's own block hashes, computed once per request slot and handed out by prefix.

    Every prompt diaglib replays is ``[1] * n`` and every sampled token is 1, so the block hashes of a request
    are a prefix of those of the longest such sequence under the same cache salt. Request slot i of a workload
    always gets salt ``diaglib-slot-i`` (requests of one workload never share blocks); after each workload the
    engine evicts the blocks it cached from vLLM's prefix cache (compat.evict_cached_blocks), so the next one
    starts as on a fresh engine. The hashes come from vLLM's request block hasher on a request of that salt."""

    def __init__(self, hasher, hash_block_size: int):
        self.hasher, self.size = hasher, hash_block_size
        self.chains: dict[int, list] = {}

    @staticmethod
    def salt(slot: int) -> str:
        return f"diaglib-slot-{slot}"

    def block_hasher(self, slot: int):
        chain = self.chains.setdefault(slot, [])

        def hashes(request) -> list:
            end = request.num_tokens // self.size
            if end > len(chain):
                self._extend(slot, chain, max(end, 2 * len(chain)))
            return chain[len(request.block_hashes):end]

        return hashes

    def _extend(self, slot: int, chain: list, blocks: int) -> None:
        req = compat.new_request("diaglib-hashes", [1] * (blocks * self.size), 1, self.hasher, self.salt(slot))
        chain[:] = req.block_hashes


class Engine:
    """vLLM's scheduler for one resolved config, reusable across workloads (it is drained after each)."""

    def __init__(self, sc, kv_memory_bytes: int | None = None):
        self.cfg = compat.private_config(sc.vllm_config)
        if kv_memory_bytes is None:
            memory, why = default_kv_memory(sc)
        elif kv_memory_bytes <= 0:
            raise DiagError(f"kv_memory_bytes must be positive, got {kv_memory_bytes}")
        elif kv_memory_bytes > sc.gpu.memory_bytes:
            raise DiagError(f"{kv_memory_bytes / 2**30:.1f} GiB is more KV memory than one {sc.gpu.name} has "
                            f"({sc.gpu.memory_mib} MiB)")
        else:
            memory, why = int(kv_memory_bytes), f"KV memory given: {kv_memory_bytes / 2**30:.2f} GiB per GPU"
        with quiet_gc():
            specs = kv_specs(sc)
            self.kv_config, block_size, hash_block_size = compat.kv_cache_config(self.cfg, memory, specs)
            self.scheduler, self.hasher, text_only = compat.new_scheduler(self.cfg, self.kv_config, block_size,
                                                                          hash_block_size)
        self.prefix = (_PrefixHashes(self.hasher, hash_block_size)
                       if self.hasher is not None and compat.can_evict_cached_blocks() else None)
        self.budget = self.cfg.scheduler_config.max_num_batched_tokens
        self.queue_size = compat.batch_queue_size(self.cfg)
        self._checked: set[int] = set()  # prompt lengths vLLM's front end accepts
        self._dispatched: dict[tuple[int, int, int], dict] = {}  # batch shape -> vLLM's dispatch of it
        self.kv_info = {"kv_memory_bytes": memory, "num_blocks": self.kv_config.num_blocks, "block_size": block_size,
                        "guessed": kv_memory_bytes is None}
        from .memory import kv_blocks_text

        self.notes = [why, f"{type(self.scheduler).__name__}, KV cache: {kv_blocks_text(self.kv_config, block_size)} "
                           f"(vLLM's KV-cache sizing), {self.queue_size} step(s) in flight"]
        if specs is None:
            self.notes.append("KV sizing takes every decoder layer as full attention: vLLM's model could not be "
                              "built here to give its layers' own KV-cache specs")
        if derived_note(self.cfg):
            self.notes.append("graph dispatch " + derived_note(self.cfg))
        if text_only:
            self.notes.append(text_only)

    def _request(self, slot: int, r):
        if self.prefix is None:  # vLLM's hasher on a salt of its own
            return compat.new_request(r.req_id, [1] * r.prompt_len, r.output_len, self.hasher, f"diaglib-{next(_SALT)}")
        return compat.new_request(r.req_id, [1] * r.prompt_len, r.output_len, self.prefix.block_hasher(slot),
                                  self.prefix.salt(slot))

    def run(self, workload: Workload, max_steps: int = 100_000) -> tuple[list[dict], list[dict]]:
        """Replay ``workload`` in the engine core's loop; returns (per-step rows, per-request rows).

        With a batch queue of 2 (async scheduling) the engine schedules step k+1 before it processes
        step k's output, as vLLM's EngineCore.step_with_batch_queue does when the GPU is the slower side.
        """
        from vllm.v1.request import RequestStatus

        for r in workload:
            if r.prompt_len not in self._checked:
                compat.check_prompt_len(self.cfg, r.prompt_len)
                self._checked.add(r.prompt_len)
        s = self.scheduler
        pending = list(enumerate(workload))
        background = {r.req_id for r in workload if r.background}
        added: set[str] = set()
        blocks: set[int] = set()
        steps, per_req = [], []
        in_flight: deque = deque()  # scheduled steps whose output is not processed yet, newest first
        step = idle = 0
        while True:
            while pending and pending[0][1].arrival_step <= step:
                slot, r = pending.pop(0)
                s.add_request(self._request(slot, r))
                added.add(r.req_id)
            live = {rid for rid in added if rid in s.requests}
            if not pending and live and live <= background:
                s.finish_requests(live, RequestStatus.FINISHED_ABORTED)
            if s.has_requests():
                if step >= max_steps:
                    raise DiagError(f"the workload did not finish within {max_steps} steps")
                out, row, result = self._schedule(step, per_req)
                if self.prefix is not None:
                    blocks.update(compat.scheduled_block_ids(out))
                steps.append(row)
                in_flight.appendleft((out, result))
                idle = 0 if row["forward"] else idle + 1
                if idle > self.queue_size and s.has_unfinished_requests():
                    raise DiagError(f"vLLM's scheduler schedules nothing at step {step} while requests wait "
                                    f"(max_num_batched_tokens {self.budget}, max_num_seqs "
                                    f"{self.cfg.scheduler_config.max_num_seqs})")
                step += 1
                if row["forward"] and len(in_flight) < self.queue_size:
                    continue  # the GPU is still busy: schedule the next step first
            elif not in_flight:
                if not pending:
                    break
                step = pending[0][1].arrival_step  # the engine idles: no step until the next arrival
                continue
            out, result = in_flight.pop()
            s.update_from_output(out, result)
        if blocks:
            compat.evict_cached_blocks(s, blocks)
        return steps, per_req

    def _schedule(self, step: int, per_req: list[dict]):
        """One schedule() call: (SchedulerOutput, per-step row, the worker's ModelRunnerOutput)."""
        s = self.scheduler
        out = s.schedule()
        counts = dict(out.num_scheduled_tokens)
        ids, sampled, codes = list(counts), [], []
        for rid in ids:
            r, n = s.requests[rid], counts[rid]
            before = r.num_computed_tokens - n  # the scheduler has already advanced it by n
            samples = r.num_computed_tokens >= r.num_tokens  # all known tokens computed: the worker samples
            phase = ("prefill-chunk" if not samples else
                     "decode" if before >= max(r.num_prompt_tokens, r.num_tokens - 1) else "last-prefill-chunk")
            per_req.append({"step": step, "req_id": rid, "tokens": n, "computed_before": before,
                            "prompt_len": r.num_prompt_tokens, "phase": phase})
            sampled.append([1] if samples else [])
            codes.append(f"{rid}:{n}{PHASE_CODE[phase]}")
        total = out.total_num_scheduled_tokens
        row = {"step": step, "total_tokens": total, "num_reqs": len(ids),
               "num_prefill": sum(c[-1] != "D" for c in codes), "num_decode": sum(c[-1] == "D" for c in codes),
               "max_query_len": max(counts.values(), default=0), "schedule": " ".join(codes),
               "at_budget": total == self.budget, "forward": total > 0}
        if total:
            shape = (total, len(ids), row["max_query_len"], row["num_prefill"] > 0)
            if shape not in self._dispatched:
                d = dispatch(self.cfg, total, num_reqs=len(ids), max_query_len=row["max_query_len"],
                             has_prefill=row["num_prefill"] > 0)
                self._dispatched[shape] = {k: d[k] for k in ("uniform_decode", "padded_tokens", "cudagraph_mode",
                                                              "compile_kind", "compile_range")}
            row.update(self._dispatched[shape])
        else:  # nothing scheduled: no forward pass (the step tells workers which requests finished)
            row.update(uniform_decode=False, padded_tokens=0, cudagraph_mode=None, compile_kind=None,
                       compile_range=None)
        row.update(waiting=len(s.waiting), kv_usage=round(s.kv_cache_manager.usage, 4))
        return out, row, compat.runner_output(ids, sampled)


# --- public API -------------------------------------------------------------------------------------

@dataclass
class Trace:
    """A workload's schedule: ``per_step`` (one row per engine step), ``per_request`` (one row per
    (step, request)), notes (e.g. that KV memory was a guess) and the KV-cache facts used."""

    per_step: pd.DataFrame
    per_request: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    kv: dict = field(default_factory=dict)
    scenario: str = ""
    vllm_version: str = ""

    def schedule(self, forward_only: bool = True) -> list[str]:
        """Steps as compact strings, e.g. ['a:8192L', 'a:1D b:8191P']; P/L/D = prefill chunk, last chunk, decode."""
        df = self.per_step[self.per_step.forward] if forward_only else self.per_step
        return list(df.schedule)


def trace(scenario, workload: Workload, kv_memory_bytes: int | None = None, *, max_steps: int = 100_000) -> Trace:
    """Replay ``workload`` through vLLM's own scheduler for ``scenario`` (see module docstring)."""
    eng = Engine(scenario, kv_memory_bytes)
    steps, reqs = eng.run(workload, max_steps)
    return Trace(pd.DataFrame(steps), pd.DataFrame(reqs), eng.notes, eng.kv_info, scenario.name,
                 scenario.vllm_version)


def knob_flags(knob: str, value) -> list[str]:
    """Serve flags for one sweep knob value (a knob may also be a raw flag, e.g. "--max-num-seqs")."""
    v = str(value).strip()
    if knob.startswith("--"):
        return [knob, v]
    if knob in ("chunked_prefill", "enforce_eager"):
        on = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}
        if v.lower() not in on:
            raise DiagError(f"knob {knob}: expected on/off, got {v!r}")
        flag = "enable-chunked-prefill" if knob == "chunked_prefill" else "enforce-eager"
        return [f"--{flag}" if on[v.lower()] else f"--no-{flag}"]
    if knob == "cudagraph_capture_sizes":
        return [compat.capture_sizes_flag(), *[s for s in v.replace("+", " ").split()]]
    if knob == "max_cudagraph_capture_size":
        return compat.max_capture_size_flags(v)
    if knob in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
        return ["--" + knob.replace("_", "-"), v]
    raise DiagError(f"unknown knob {knob!r}; known: {', '.join(KNOBS)} (or a serve flag such as --max-num-seqs)")


KNOBS = ("max_num_batched_tokens", "chunked_prefill", "max_num_seqs", "enforce_eager", "cudagraph_capture_sizes",
         "max_cudagraph_capture_size", "block_size")


PARALLEL_MIN_POINTS = 200  # below this a worker process costs more than it saves (the sweep panel replays 25)
_JOB: dict = {}  # what forked sweep workers read (set before they start; nothing is pickled on the way in)


def sweep(scenario, lengths, knobs: dict | None = None, *, output_len: int = 1, decoders: int = 0,
          kv_memory_bytes: int | None = None, progress: bool = True, workers: int | None = None) -> pd.DataFrame:
    """Single prompts of each length (plus ``decoders`` concurrent decoders) x every combination of knob
    values, one row per (point, step); ``budget`` and ``chunked_prefill_resolved`` say what vLLM made of
    the knobs. Per combination the config is resolved and vLLM's scheduler built once, then reused for every
    length (prefix-cache hashes computed once, the cache emptied between points: see :class:`Engine`).

    Points are independent: with ``workers`` > 1 (default: the CPU cores, from PARALLEL_MIN_POINTS points on)
    this process and ``workers`` - 1 forked ones take shares of them, each with its own scheduler; the rows are
    the same, in order."""
    from .. import progress as bar

    lengths = [int(x) for x in lengths]
    if not lengths:
        raise DiagError("no prompt lengths to sweep")
    knobs = {k: list(v) for k, v in (knobs or {}).items()}
    for k, vals in knobs.items():
        if not vals:
            raise DiagError(f"knob {k} has no values")
    combos = list(itertools.product(*knobs.values())) or [()]
    workloads = [with_decoders(L, decoders, output_len=output_len) if decoders else single(L, output_len)
                 for L in lengths]
    settings = []
    for combo in combos:  # resolved here, where a refusal is reported, and the weights sized (kept) once
        flags = [f for k, v in zip(knobs, combo) for f in knob_flags(k, v)]
        try:
            sc = scenario.derive(*flags) if flags else scenario
        except DiagError as e:
            raise DiagError(f"{', '.join(f'{k}={v}' for k, v in zip(knobs, combo))}: {e}") from None
        if kv_memory_bytes is None:
            default_kv_memory(sc)
        settings.append((dict(zip(knobs, combo)), sc))
    points = len(combos) * len(lengths)
    if workers is None:
        workers = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) \
            if points >= PARALLEL_MIN_POINTS else 1
    shares = max(1, -(-workers // len(combos)))  # split each setting's lengths so every worker has work
    size = -(-len(lengths) // shares)
    units = [(i, j, j + size) for i in range(len(combos)) for j in range(0, len(lengths), size)]
    procs = max(1, min(workers, len(units))) if "fork" in multiprocessing.get_all_start_methods() else 1
    mine = -(-len(units) // procs)  # the first units are this process's own, the rest go to the forked ones
    _JOB.update(settings=settings, lengths=lengths, workloads=workloads, kv_memory_bytes=kv_memory_bytes)
    forked = multiprocessing.get_context("fork").Pool if procs > 1 else lambda _: contextlib.nullcontext()
    rows = []
    try:
        with quiet_gc(), bar.bar(total=points, desc="sweep", unit="pt", enabled=progress) as b, \
                forked(procs - 1) as pool:
            theirs = ()
            if pool:
                theirs = pool.imap(_sweep_unit, units[mine:])
                pool.close()  # a worker exits once its results are in (the exit of a forked vLLM takes a while)
            for unit in units[:mine]:
                rows += _sweep_unit(unit, b.update)
            for (_, a, z), part in zip(units[mine:], theirs):
                rows += part
                b.update(min(z, len(lengths)) - a)
            return pd.DataFrame(rows)  # while the workers exit
    finally:
        _JOB.clear()


def _sweep_unit(unit: tuple[int, int, int], done=None) -> list[dict]:
    """The rows of one knob setting's lengths[a:z], through a scheduler of its own."""
    i, a, z = unit
    fixed, sc = _JOB["settings"][i]
    eng = Engine(sc, _JOB["kv_memory_bytes"])
    sch = eng.cfg.scheduler_config
    fixed = {**fixed, "budget": sch.max_num_batched_tokens, "chunked_prefill_resolved": bool(sch.enable_chunked_prefill)}
    rows = []
    for L, w in zip(_JOB["lengths"][a:z], _JOB["workloads"][a:z]):
        steps, _ = eng.run(w)
        rows += [{**fixed, "prompt_len": L, **r} for r in steps]
        if done:
            done()
    return rows


# --- parsing and text -------------------------------------------------------------------------------

def parse_lengths(text: str) -> list[int]:
    """'8100:8300' (inclusive), '8100:8300:10' or '8191,8192,8193' -> prompt lengths."""
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1) or parts[1] < parts[0]:
                raise ValueError
            return list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise DiagError(f"--lengths: expected A:B, A:B:STEP or a,b,c with A <= B, got {text!r}") from None


def parse_knob(text: str) -> tuple[str, list[str]]:
    """'max_num_batched_tokens=8191,8192' -> ('max_num_batched_tokens', ['8191', '8192'])."""
    name, eq, values = text.partition("=")
    vals = [v for v in values.split(",") if v.strip()]
    if not eq or not name or not vals:
        raise DiagError(f"--knob: expected NAME=V1,V2,..., got {text!r}")
    return name.strip(), vals


def format_trace(tr: Trace) -> str:
    """The step table with the notes above it."""
    df = tr.per_step.copy()
    df["graph"] = df.cudagraph_mode.fillna("-")
    df["compiled"] = [f"{k} {r[0]}..{r[1]}" if isinstance(r, tuple) else k if isinstance(k, str) else "-"
                      for k, r in zip(df.compile_kind, df.compile_range)]
    df["budget"] = df.at_budget.map({True: "= budget", False: ""})
    cols = ["step", "total_tokens", "num_reqs", "padded_tokens", "graph", "compiled", "budget", "schedule"]
    head = [f"{tr.scenario} (vLLM {tr.vllm_version})", *tr.notes,
            "schedule: request:tokens + P prefill chunk / L last prefill chunk / D decode; "
            "a step of 0 tokens runs no forward pass (it tells workers which requests finished)", ""]
    return "\n".join(head) + df[cols].to_string(index=False)


def format_sweep(df: pd.DataFrame, knobs: list[str]) -> str:
    """One line per sweep point: its forward steps' token counts and CUDA-graph modes."""
    fwd = df[df.forward]
    keys = [*knobs, "prompt_len"]
    g = fwd.groupby(keys, sort=False)
    out = g.agg(steps=("total_tokens", lambda s: " | ".join(map(str, s))),
                graphs=("cudagraph_mode", lambda s: " | ".join(s)),
                at_budget=("at_budget", "any")).reset_index()
    return out.to_string(index=False)
