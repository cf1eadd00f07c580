"""Known classes of vLLM token-boundary crashes and cliffs (data/known_issues.json), matched to a scenario.

Each class names a predicate here; the predicate reads vLLM's resolved config, diaglib's kernel census (every
op of vLLM's forward, diaglib.predict.census) and its MoE analysis for the scenario, and answers whether the
class applies, why, and at which token count.
"""
from __future__ import annotations

import importlib.metadata
import json
from functools import cached_property

import pandas as pd

from .. import compat
from ..errors import DiagError
from ..paths import DATA
from ..scenario import Scenario
from . import census, layers, moe

CATALOG = DATA / "known_issues.json"


def catalog() -> list[dict]:
    """The bug classes as stored in data/known_issues.json."""
    try:
        data = json.loads(CATALOG.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiagError(f"{CATALOG}: cannot read the known-issue catalog: {e}") from None
    for c in data["classes"]:
        if c["predicate"] not in PREDICATES:
            raise DiagError(f"{CATALOG}: class {c['id']!r} names an unknown predicate {c['predicate']!r}")
    return data["classes"]


def link(repo: str, number: int) -> str:
    """GitHub link for an issue or PR (GitHub redirects /issues/N to /pull/N for pull requests)."""
    return f"https://github.com/{repo}/issues/{number}"


class _Facts:
    """What the predicates ask about one scenario, each computed once."""

    def __init__(self, sc: Scenario):
        self.sc = sc
        self.mnbt = sc.vllm_config.scheduler_config.max_num_batched_tokens
        self.comp = compat.compilation_summary(sc.vllm_config)
        self.layer = layers.build_moe_layer(sc)

    @cached_property
    def launches(self) -> dict:
        return moe.launches(self.sc, self.mnbt)

    @cached_property
    def thresholds(self) -> pd.DataFrame:
        return moe.int32_thresholds(self.sc).dropna(subset=["tokens"])

    @cached_property
    def crossings(self) -> pd.DataFrame | None:
        """Every op's crossing as tokens per step grow (the census), or None where it cannot run here."""
        try:
            th = census.thresholds(self.sc, "prefill")
        except DiagError:
            return None
        return th[th["tokens"].notna() & (th["tokens"] > 1)].sort_values("tokens", kind="stable")

    @cached_property
    def profile(self) -> pd.DataFrame | None:
        """The ops of vLLM's profile run at the budget (the census), or None where it cannot run here."""
        try:
            df = census.ops(self.sc, census.profile(self.sc))
        except DiagError:
            return None
        return df[~df["runs_as"].isin(["no kernel", "host"])]

    def first_threshold(self, path: str | None = None, buffer: str | None = None):
        t = self.thresholds
        t = t[(t["path"] == path) if path else t["path"] != "input"]
        if buffer:
            t = t[t["buffer"] == buffer]
        return None if t.empty else t.loc[t["tokens"].idxmin()]


def _no_moe(f: _Facts):
    return False, "the model has no MoE layers", None


def moe_triton_int32(f: _Facts):
    if f.layer is None:
        return _no_moe(f)
    classic = moe.classic_overflow_tokens(f.sc)
    if not moe.triton_applies(f.sc):
        return False, (f"vLLM's Triton fused-MoE kernel does not run these {f.launches['weight_dtype']} weights "
                       f"(selected: {f.launches['selected_experts']})"), None
    chunk = moe.triton_chunk_tokens(f.sc, classic)
    path = f.launches["selected_path"]
    where = "the selected kernel" if path == "triton" else f"only if the Triton path is forced (selected: {path})"
    if moe.offs_token_int64():
        return False, (f"fused_moe_kernel casts offs_token to int64 here; unfixed kernels overflow from "
                       f"M = {classic}"), classic
    if chunk < classic:
        return False, (f"offs_token is int32 in fused_moe_kernel, but activation chunks of {chunk} tokens keep "
                       f"M below {classic}"), classic
    hit = f.mnbt >= classic
    return hit, (f"offs_token is int32 in fused_moe_kernel: overflow from M = {classic} tokens per step "
                 f"({'within' if hit else 'beyond'} max_num_batched_tokens {f.mnbt}); {where}"), classic


def _crossing_text(r) -> str:
    return f"{r['op']} {r['role']} [{r['formula']}] in {r['module'] or r['phase']}"


def census_int32(f: _Facts):
    """Any op of the step: the first tensor whose largest index passes 2^31 - 1 as tokens per step grow."""
    th = f.crossings
    if th is None:
        return any_buffer_int32(f)
    th = th[~th["role"].str.startswith("grid.")]
    if th.empty:
        return False, "no op's tensor passes INT32_MAX at any token count up to the census horizon", None
    r = th.iloc[0]
    t = int(r["tokens"])
    return f.mnbt >= t, (f"{_crossing_text(r)} passes INT32_MAX from {t:,} tokens per step "
                         f"(max_num_batched_tokens {f.mnbt:,})"), t


def any_buffer_int32(f: _Facts):
    if f.layer is None:
        return _no_moe(f)
    row = f.first_threshold()
    if row is None:
        return False, "no MoE buffer passes INT32_MAX elements at any token count scanned", None
    t = int(row["tokens"])
    return f.mnbt >= t, (f"{row['path']}.{row['buffer']} passes INT32_MAX elements from {t} tokens per step "
                         f"(max_num_batched_tokens {f.mnbt})"), t


def inductor_32bit(f: _Facts):
    if f.comp["compile_backend"] != "inductor":
        return False, f"compile backend {f.comp['compile_backend']}: no Inductor kernels", None
    if f.layer is None:
        return False, "no MoE buffers analysed for this model", None
    lb = f.launches["largest_buffer"]
    over = lb["max_offset"] > moe.INT32_MAX
    row = f.first_threshold()
    return over, (f"largest MoE intermediate at {f.mnbt} tokens: {lb['path']}.{lb['buffer']} {lb['shape']} = "
                  f"{lb['frac_2_31']:.3f} x 2^31"), (int(row["tokens"]) if row is not None else None)


def census_inductor_int32(f: _Facts):
    """The ops Inductor compiles (outside the splitting ops): the first intermediate past 2^31 - 1."""
    if f.comp["compile_backend"] != "inductor" or not f.comp["compile_ranges"]:
        return False, f"compile backend {f.comp['compile_backend']}, mode {f.comp['compile_mode']}: no Inductor " \
                      "kernels", None
    th = f.crossings
    if th is None:
        return inductor_32bit(f)
    th = th[(th["runs_as"] == "inductor") & ~th["role"].str.startswith("grid.")]
    if th.empty:
        return False, "no Inductor-compiled intermediate passes INT32_MAX up to the census horizon", None
    r = th.iloc[0]
    t = int(r["tokens"])
    return f.mnbt >= t, (f"Inductor compiles {_crossing_text(r)}: over INT32_MAX from {t:,} tokens per step "
                         f"(max_num_batched_tokens {f.mnbt:,})"), t


def compile_range_edge(f: _Facts):
    ranges = f.comp["compile_ranges"]
    if not ranges:
        return False, f"compile mode {f.comp['compile_mode']}: no compiled ranges", None
    ends = sorted({b for _, b in ranges})
    return True, (f"compiled for token ranges {', '.join(f'[{a}, {b}]' for a, b in ranges)}; a step of exactly "
                  f"{ends[-1]} tokens sits on the last range's edge"), ends[-1]


def moe_chunking(f: _Facts):
    chunk = compat.moe_chunk_size()
    if f.layer is None:
        return _no_moe(f)
    if not chunk:
        return False, "this vLLM version has no MoE activation chunking", None
    with layers.rank0(f.sc):
        experts = compat.moe_experts(f.layer, chunk + 1)
        chunks = experts is not None and compat.chunk_tokens(experts, chunk + 1) <= chunk
    if not chunks:
        return False, (f"VLLM_FUSED_MOE_CHUNK_SIZE {chunk}, but the selected {f.launches['selected_experts']} "
                       "does not chunk"), None
    return f.mnbt > chunk, f"VLLM_FUSED_MOE_CHUNK_SIZE {chunk} vs max_num_batched_tokens {f.mnbt}", chunk + 1


def at_budget(f: _Facts):
    sc = f.sc.vllm_config.scheduler_config
    example = ", e.g. a prompt of that length with chunked prefill" if sc.enable_chunked_prefill else ""
    return True, (f"a single step can hold exactly max_num_batched_tokens = {f.mnbt} tokens (the profile-run "
                  f"size){example}"), f.mnbt


def cudagraph_edge(f: _Facts):
    if f.comp["cudagraph_mode"] == "NONE" or not f.comp["cudagraph_capture_sizes"]:
        return False, "CUDA graphs are off", None
    top = f.comp["max_cudagraph_capture_size"]
    return f.mnbt > top, (f"largest capture size {top}: steps of {top + 1}..{f.mnbt} tokens run without a graph "
                          "and without padding"), top + 1


def full_capture_over_mml(f: _Facts):
    """Mixed batches captured as FULL graphs at sizes above max_model_len: the capture's dummy requests each get a
    sequence length of the capture size (GPUModelRunner._dummy_run), longer than any request may be."""
    cfg = f.sc.vllm_config
    mode, mml = cfg.compilation_config.cudagraph_mode, cfg.model_config.max_model_len
    top = f.comp["max_cudagraph_capture_size"] or 0
    if mode is None or mode.mixed_mode().name != "FULL":
        return False, f"mixed batches are not captured as FULL graphs (cudagraph_mode {f.comp['cudagraph_mode']})", None
    return top > mml, (f"FULL graphs of mixed batches captured up to {top} tokens, max_model_len {mml}: captures of "
                       f"{mml + 1}..{top} tokens give each dummy request a sequence longer than max_model_len"), mml + 1


def chunked_prefill(f: _Facts):
    sch = f.sc.vllm_config.scheduler_config
    if not sch.enable_chunked_prefill:
        return False, "chunked prefill is off", None
    bs, mml = f.sc.vllm_config.cache_config.block_size, f.sc.vllm_config.model_config.max_model_len
    return True, (f"prompts longer than {f.mnbt} are split; block-size ({bs}) multiples and max_model_len {mml} "
                  "are edges"), f.mnbt + 1


def fp8_block_alignment(f: _Facts):
    if f.layer is None:
        return _no_moe(f)
    block = compat.block_shape(f.layer)
    if not block:
        return False, "MoE weights are not block-quantized", None
    n = f.layer.intermediate_size_per_partition
    return n % block[0] != 0, f"per-rank intermediate {n} vs weight block_n {block[0]}", None


def profile_run(f: _Facts):
    """vLLM's profile run at the budget: its dummy requests through every layer, then the sampler warm-up."""
    df = f.profile
    if df is None:
        if f.layer is None:
            return _no_moe(f)
        return True, f"the profile run sends M = {f.mnbt} tokens through every MoE layer at start-up", f.mnbt
    r = df.loc[df["frac_int32"].idxmax()]
    reqs = census.profile(f.sc).reqs
    return True, (f"the profile run sends {f.mnbt:,} tokens from {reqs} dummy requests through every layer at "
                  f"start-up; nearest the int32 limit: {r['op']} {r['largest']} in {r['module'] or r['phase']} "
                  f"({r['frac_int32']:.3f} x 2^31)"), f.mnbt


def moe_grid(f: _Facts):
    """Launch grids of every kernel whose grid the census knows, against CUDA's limits."""
    th = f.crossings
    if th is None:
        if f.layer is None:
            return _no_moe(f)
        g = f.launches["grids"]
        if not len(g):
            return False, "vLLM's Triton fused-MoE kernel does not run this layer: no Triton grid", None
        worst = g.loc[g["frac_limit"].idxmax()]
        return False, (f"fused_moe_kernel grid at {f.mnbt} tokens: {worst['grid']} ({worst['frac_limit']:.2e} of "
                       "the limit; M is not on grid.y in this kernel)"), None
    grids = th[th["role"].str.startswith("grid.")]
    if grids.empty:
        return False, "no known launch grid passes CUDA's limits up to the census horizon", None
    r = grids.iloc[0]
    t = int(r["tokens"])
    return f.mnbt >= t, (f"{r['op']} {r['role']} [{r['formula']}] passes {int(r['limit']):,} from {t:,} tokens "
                         f"per step ({r['source']})"), t


def always(f: _Facts):
    return True, "applies to every illegal memory access: locate the faulting kernel before blaming a frame", None


def perf_cliff(f: _Facts):
    why, hit = [], False
    if f.comp["cudagraph_mode"] != "NONE" and f.comp["cudagraph_capture_sizes"]:
        top = f.comp["max_cudagraph_capture_size"]
        hit |= f.mnbt > top
        why.append(f"no CUDA graph above {top} tokens")
    if f.layer is not None and f.launches["selected_path"] == "triton" and f.launches["triton_config"]["applies"] \
            and not f.launches["triton_config"]["found"]:
        hit = True
        why.append("Triton MoE runs vLLM's default config (no tuned file)")
    return hit, "; ".join(why) or "no cliff found", None


def required_package_missing(f: _Facts):
    """Judged on this environment (a crash log's import error judges the server's: diaglib.triage.suspects)."""
    need = compat.requirements()
    missing = [f"{d}{spec}" for d, spec in need.items() if not _installed(d)]
    if missing:
        return True, (f"vLLM {f.sc.vllm_version} requires {', '.join(missing)}, not installed here: a kernel vLLM "
                      "picks from it fails the first time it runs"), None
    return False, f"every distribution vLLM {f.sc.vllm_version} requires ({len(need)}) is installed here", None


def memory_headroom(f: _Facts):
    """vLLM sizes the KV cache by the profile run's peak within gpu_memory_utilization: what lies outside it."""
    util = f.sc.vllm_config.cache_config.gpu_memory_utilization
    outside = f.sc.gpu.memory_bytes * (1 - util) / 2**30
    return True, (f"the KV cache takes what the profile run's peak at {f.mnbt:,} tokens leaves of "
                  f"gpu_memory_utilization {util} ({outside:.1f} GiB of the {f.sc.gpu.name}'s memory outside it): "
                  "an allocation the caching allocator cannot place in one piece still fails"), None


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def version_listed(f: _Facts, cls: dict):
    v = f.sc.vllm_version
    hit = v in cls.get("versions", [])
    return hit, f"seen on vLLM {', '.join(cls.get('versions', []))}; this is {v}", None


PREDICATES = {fn.__name__: fn for fn in (
    moe_triton_int32, any_buffer_int32, census_int32, inductor_32bit, census_inductor_int32, compile_range_edge,
    moe_chunking, at_budget, cudagraph_edge, full_capture_over_mml, chunked_prefill, fp8_block_alignment, profile_run, moe_grid, always,
    perf_cliff, required_package_missing, memory_headroom, version_listed)}


def match(sc: Scenario) -> pd.DataFrame:
    """Every known class against the scenario: id, title, applies, why, threshold_tokens, formula, links."""
    facts = _Facts(sc)
    rows = []
    for c in catalog():
        fn = PREDICATES[c["predicate"]]
        applies, why, tokens = fn(facts, c) if fn is version_listed else fn(facts)
        rows.append({"id": c["id"], "title": c["title"], "applies": bool(applies), "why": why,
                     "threshold_tokens": tokens, "formula": c["threshold"], "affected": c["affected"],
                     "fixed": c["fixed"], "links": [link(r, n) for r, n in c["refs"]]})
    df = pd.DataFrame(rows)
    df["threshold_tokens"] = df["threshold_tokens"].astype("Int64")
    return df
