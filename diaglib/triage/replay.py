"""The failing step replayed through the installed vLLM's decisions: padding, graphs, compiled range, MoE.

A :class:`Step` comes from the crash input dump (:func:`from_dump`), or, without one, from the workload the log
shows, replayed through vLLM's real scheduler (:func:`candidates`, diaglib.predict.schedule.trace).
:func:`replay` asks diaglib.predict for what vLLM does with it: the CUDA-graph dispatcher (padded size,
runtime mode) and the compiled range (predict.dispatch with the step's num_reqs and max_query_len), the MoE
path, kernel config and largest buffer (predict.moe), the boundaries the step sits on (predict.boundaries'
features evaluated on both sides of it), and the kernel census's headroom where diaglib.predict.census exists.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field

from .. import compat
from ..errors import DiagError
from ..predict import boundaries, dispatch, layers, moe
from .dump import StepDump

CENSUS_MODULE = "diaglib.predict.census"
# what diaglib's drive of a vLLM it does not reach yet raises (an API moved): said in a note, never a traceback
COMPAT_GAPS = (AttributeError, TypeError, KeyError, ImportError)
MAX_TRACED_PROMPTS = 256
# boundary features (predict.boundaries.feature_value) -> the kind the boundary map calls them
STEP_FEATURES = {"budget": "budget", "cudagraph": "cudagraph", "compile_range": "compile range",
                 "moe_experts": "MoE kernel", "triton_config": "MoE config", "moe_chunks": "MoE chunking"}
PROMPT_FEATURES = {"prefill_chunks": "prefill chunk", "kv_blocks": "KV block", "max_model_len": "max_model_len"}


@dataclass
class Step:
    """One forward step: its tokens, requests and phases, and where it came from."""

    tokens: int
    num_reqs: int
    max_query_len: int
    num_prefill: int
    num_decode: int
    schedule: str
    source: str
    prompt_lens: list[int] = field(default_factory=list)  # of the new requests whose whole prompt is known
    last_chunk: bool = False  # some request finishes its prefill in this step
    queries: list[int] = field(default_factory=list)  # per request: tokens in this step
    contexts: list[int] = field(default_factory=list)  # per request: tokens computed before it (0 if unknown)

    @property
    def mix(self) -> str:
        return "decode" if self.num_prefill == 0 else "prefill" if self.num_decode == 0 else "mixed"

    def describe(self) -> str:
        reqs = f"{self.num_reqs} request{'s' * (self.num_reqs != 1)}"
        parts = [f"{self.tokens:,} tokens", reqs]
        if self.num_reqs == 1 and self.num_prefill == 1:
            parts.append("the last prefill chunk" if self.last_chunk else "a prefill chunk")
        else:
            parts.append(f"{self.num_prefill} prefill + {self.num_decode} decode")
        return ", ".join(parts)


_CODE = {"prefill-chunk": "P", "last-prefill-chunk": "L", "decode": "D", "prefill": "P?"}


def from_dump(d: StepDump) -> Step:
    """The dumped step (diaglib.triage.dump.StepDump) as a Step."""
    return Step(tokens=d.total_tokens, num_reqs=d.num_reqs, max_query_len=d.max_query_len,
                num_prefill=d.count("prefill-chunk", "last-prefill-chunk", "prefill"), num_decode=d.count("decode"),
                schedule=" ".join(f"{r.req_id}:{r.tokens}{_CODE[r.phase]}" for r in d.requests),
                source=f"the crash input dump (log line {d.line})",
                prompt_lens=[r.prompt_len for r in d.requests if r.new and r.prompt_len],
                last_chunk=any(r.phase == "last-prefill-chunk" for r in d.requests),
                queries=[r.tokens for r in d.requests], contexts=[r.computed_before or 0 for r in d.requests])


def candidates(sc, lengths: list[int], output_len: int = 2) -> tuple[list[Step], list[str]]:
    """The distinct forward steps vLLM's scheduler makes of prompts of ``lengths`` arriving together."""
    from ..predict import schedule, workload

    notes = []
    if len(lengths) > MAX_TRACED_PROMPTS:
        notes.append(f"{len(lengths)} prompts in the log; the first {MAX_TRACED_PROMPTS} are traced")
        lengths = lengths[:MAX_TRACED_PROMPTS]
    tr = schedule.trace(sc, workload.prompts(*lengths, output_len=output_len))
    notes += [f"scheduler: {n}" for n in tr.notes]
    notes.append("the prompts are assumed to arrive together (the log's request times are not used)")
    seen, out = set(), []
    by_step = tr.per_request.groupby("step")
    for row in tr.per_step[tr.per_step.forward].itertuples():
        key = (row.total_tokens, row.num_reqs, row.max_query_len)
        if key in seen:
            continue
        seen.add(key)
        reqs = by_step.get_group(row.step)
        out.append(Step(int(row.total_tokens), int(row.num_reqs), int(row.max_query_len), int(row.num_prefill),
                        int(row.num_decode), row.schedule, f"candidate: step {row.step} of the traced workload",
                        [int(p) for p in reqs.prompt_len[reqs.phase != "decode"]],
                        bool((reqs.phase == "last-prefill-chunk").any()),
                        [int(x) for x in reqs.tokens], [int(x) for x in reqs.computed_before]))
    out.sort(key=lambda s: -s.tokens)
    return out, notes


def replay(sc, step: Step) -> dict:
    """What the installed vLLM does with ``step`` for scenario ``sc`` (see the module docstring)."""
    out: dict = {"step": asdict(step), "describe": step.describe(), "notes": [],
                 "budget": sc.vllm_config.scheduler_config.max_num_batched_tokens,
                 "block_size": sc.vllm_config.cache_config.block_size}
    try:
        d = dispatch.dispatch(sc, step.tokens, num_reqs=step.num_reqs, max_query_len=step.max_query_len)
    except DiagError as e:
        out["dispatch"] = None
        out["notes"].append(f"not replayable on the rebuilt scenario: {e}")
        return out
    except COMPAT_GAPS as e:
        out["dispatch"] = None
        out["notes"].append(f"not replayable: diaglib cannot drive vLLM {compat.installed()}'s dispatcher yet "
                            f"({type(e).__name__}: {e})")
        return out
    out["dispatch"] = {k: d[k] for k in ("padded_tokens", "padding", "cudagraph_mode", "cudagraph_mode_config",
                                         "uniform_decode", "compile_kind", "compile_range", "derived")}
    try:
        out["moe"] = moe_at(sc, step.tokens)
    except COMPAT_GAPS as e:
        out["moe"] = None
        out["notes"].append(f"no MoE answer: diaglib cannot drive this vLLM's MoE layer yet ({type(e).__name__}: {e})")
    out["edges"] = edges(sc, step.tokens, "step", STEP_FEATURES)
    for p in sorted(set(step.prompt_lens)):
        out["edges"] += edges(sc, p, "prompt", PROMPT_FEATURES)
    comp = compat.compilation_summary(sc.vllm_config)
    out["compilation"] = {k: comp[k] for k in ("compile_mode", "compile_backend", "cudagraph_mode",
                                                "max_cudagraph_capture_size", "compile_ranges")}
    out["census"] = census_headroom(sc, step)
    return out


def moe_at(sc, n: int) -> dict | None:
    """The MoE path, kernel config and largest buffer of one MoE layer at ``n`` tokens (None: no MoE)."""
    if layers.build_moe_layer(sc) is None:
        return None
    info = moe.launches(sc, n)
    tc = info["triton_config"]
    return {"method": info.get("method"), "backend": info.get("backend"), "selected_experts": info["selected_experts"],
            "selected_path": info["selected_path"], "activation_chunk_size": info["activation_chunk_size"],
            "num_chunks": info["num_chunks"], "triton_config": {"source": tc["source"], "config": tc["config"]},
            "offs_token_int64": info["offs_token_int64"], "largest_buffer": info["largest_buffer"],
            "top_k": info.get("top_k"), "grids": info["grids"][["kernel", "grid", "frac_limit"]].to_dict("records")}


def edges(sc, n: int, axis: str, features: dict[str, str]) -> list[dict]:
    """The boundaries ``n`` sits on: each feature whose value changes between n - 1 and n, or n and n + 1."""
    rows = []
    for feature, kind in features.items():
        try:
            here = boundaries.feature_value(sc, feature, n)
            before = boundaries.feature_value(sc, feature, n - 1) if n > 1 else here
            after = boundaries.feature_value(sc, feature, n + 1)
        except DiagError:
            continue  # e.g. MoE features of a model without MoE layers
        if here != after and not (after == "over budget" and feature != "budget"):
            rows.append({"axis": axis, "tokens": n + 1, "side": "last before", "kind": kind, "feature": feature,
                         "below": str(here), "above": str(after),
                         "rule": f"{axis} of {n:,} is the last before {kind} changes ({here} -> {after} at {n + 1:,})"})
        elif here != after and feature == "compile_range" and isinstance(here, tuple) and here[1] and here[1][1] == n:
            rows.append({"axis": axis, "tokens": n + 1, "side": "last before", "kind": kind, "feature": feature,
                         "below": str(here), "above": str(after),
                         "rule": f"{axis} of {n:,} is the upper end of the last compiled range {here[1]} (the budget)"})
        if before != here:
            rows.append({"axis": axis, "tokens": n, "side": "first after", "kind": kind, "feature": feature,
                         "below": str(before), "above": str(here),
                         "rule": f"{axis} of {n:,} is the first with {here} ({before} up to {n - 1:,})"})
    return rows


# --- the kernel census (issue 14): its seam ------------------------------------------------------------

def census_module():
    """diaglib.predict.census when it exists on this branch, else None."""
    try:
        return importlib.import_module(CENSUS_MODULE)
    except ImportError:
        return None


def census_headroom(sc, step: Step, top: int = 5) -> dict:
    """The census's headroom at this step: the per-step tensors nearest 2^31 - 1 (largest index into each).

    The census (issue 14) records one forward pass of vLLM's model for the step's exact batch (each request's
    tokens and context); ``{"available": False, "why": ...}`` while the module is absent or cannot answer.
    """
    census = census_module()
    if census is None:
        return {"available": False, "why": f"{CENSUS_MODULE} is not available in this diaglib"}
    if not (hasattr(census, "Step") and hasattr(census, "tensors")):
        return {"available": False, "why": f"{CENSUS_MODULE} has no Step / tensors() (not the API triage reads)"}
    kind = {"prefill": "prefill", "decode": "decode"}.get(step.mix, "mixed")
    queries = step.queries or [step.tokens]
    contexts = step.contexts or [0] * len(queries)
    try:
        df = census.tensors(sc, census.Step(kind, tuple(queries), tuple(contexts)))
    except Exception as e:  # noqa: BLE001 - the census is advice here: its failure is said, the triage goes on
        return {"available": False, "why": f"the census cannot record this step: {type(e).__name__}: {e}"}
    if df.empty:
        return {"available": False, "why": "the census recorded no tensors"}
    per_step = df[df["state"].isna()] if "state" in df else df
    per_step = per_step.assign(frac_2_31=per_step["index_max"] / 2**31)
    near = per_step.sort_values("index_max", ascending=False).drop_duplicates(["op", "role", "io"]).head(top)
    rows = [{"op": r.op, "module": r.module, "role": r.role, "shape": tuple(r.shape), "dtype": str(r.dtype),
             "index_max": int(r.index_max), "frac_2_31": float(r.frac_2_31)} for r in near.itertuples()]
    first = rows[0] if rows else None
    return {"available": True, "rows": rows, "ops": int(df["seq"].nunique()) if "seq" in df else len(df),
            "summary": (f"nearest to 2^31 of {len(per_step):,} per-step tensors: {first['op']} {first['shape']} "
                        f"{first['frac_2_31']:.3f} x 2^31 ({first['module']})") if first else "no per-step tensors"}
