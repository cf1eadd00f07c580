"""The kill-switch catalogue: what each switch turns off, the layer it implicates, and its spelling.

Spellings per vLLM version come from ``compat.kill_switches``; ``verify`` applies each one through
vLLM (``Scenario.derive`` plus the env vars) and checks on the resolved configuration (or, for padding, on
vLLM's dispatch of a step) that it did what it claims (a flag vLLM accepts but ignores, such as
``-O.backend=eager`` on 0.10.1.1, or one it overrides, such as --no-enable-chunked-prefill on 0.10, fails
that check: "no effect").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import pandas as pd

from .. import compat
from ..errors import DiagError
from ..scenario import Scenario


@dataclass(frozen=True)
class Switch:
    """A kill switch: its name, the layer it implicates and the fact that must change when it is on."""

    name: str
    layer: str
    what: str
    fact: str
    changed: Callable[[object, object], bool]


def _off(v) -> bool:
    return str(v).split(" ")[0] in ("NONE", "NO_COMPILATION")


# Broadest first: bisection drops the broad ones first, so the narrowest switch that suffices remains.
CATALOGUE = (
    Switch("enforce-eager", "compilation and CUDA graphs", "--enforce-eager: no torch.compile, no CUDA graphs",
           "compile_mode+cudagraph_mode", lambda a, b: _off(b[0]) and _off(b[1]) and not _off(a[1])),
    Switch("compile-off", "torch.compile (Dynamo + Inductor) and CUDA graphs", "compilation mode/level 0",
           "compile_mode", lambda a, b: _off(b) and not _off(a)),
    Switch("cudagraph-off", "CUDA graphs", "cudagraph_mode NONE, compilation kept", "cudagraph_mode+compile_mode",
           lambda a, b: b[0] == "NONE" and a[0] != "NONE" and b[1] == a[1]),
    Switch("inductor-off", "Inductor", "compile backend eager: Dynamo graphs run without Inductor kernels",
           "compile_backend", lambda a, b: a == "inductor" and b == "eager"),
    Switch("chunked-prefill-off", "chunked prefill", "no chunked prefill", "chunked_prefill",
           lambda a, b: a and not b),
    Switch("async-off", "async scheduling", "no async scheduling", "async_scheduling", lambda a, b: a and not b),
    Switch("budget+1", "token budget (batch exactly at max_num_batched_tokens)", "max_num_batched_tokens + 1",
           "max_num_batched_tokens", lambda a, b: b == a + 1),
    Switch("moe-chunk-off", "MoE activation chunking", "VLLM_ENABLE_FUSED_MOE_ACTIVATION_CHUNKING=0", "moe_chunk",
           lambda a, b: a is not None and b is None),
    Switch("moe-chunk-half", "MoE activation chunking", "MoE chunk = max_num_batched_tokens / 2", "moe_chunk",
           lambda a, b: b is not None and b != a),
    Switch("moe-backend", "MoE backend", "another fused-MoE backend (Triton)", "moe_backend", lambda a, b: a != b),
    Switch("attention-backend", "attention backend", "another attention backend", "attention_backend",
           lambda a, b: a != b),
    Switch("gdn-prefill-triton", "gated-DeltaNet prefill kernel (FlashInfer's)",
           "vLLM's Triton/FLA GDN prefill instead of FlashInfer's", "custom_kernels", lambda a, b: a != b),
    Switch("budget-1", "token budget (batch exactly at max_num_batched_tokens)", "max_num_batched_tokens - 1",
           "max_num_batched_tokens", lambda a, b: b == a - 1),
    Switch("pad-off", "CUDA-graph padding", "no padding to a capture size", "padding",
           lambda a, b: bool(a) and not b),
)
BY_NAME = {s.name: s for s in CATALOGUE}
# A switch that replaces what this model does not have has no effect, whatever vLLM would accept.
NOTHING_TO_REPLACE = {"custom_kernels": "every CustomOp runs its forward_native here: no custom kernel to replace",
                      "moe_backend": "the model has no fused-MoE layer: no MoE backend to replace"}
# budget-1 sets the same flag as budget+1: it is asked for by name, never part of the default candidates.
NOT_DEFAULT = ("budget-1",)


def spelling(sc: Scenario) -> dict[str, tuple[list[str], dict[str, str]] | str]:
    """Each switch's (serve flags, env vars) on this scenario's vLLM, or why the version has none."""
    return compat.kill_switches(sc.vllm_config, compat.attention_backend(sc.vllm_config))


def _fact(sc: Scenario, name: str):
    cfg = sc.vllm_config
    if name == "moe_backend":
        from .layers import moe_backend

        info = moe_backend(sc)
        return info and info["backend"]
    if name == "attention_backend":
        return compat.fresh_attention_backend(cfg)
    if name == "custom_kernels":  # the CustomOps vLLM dispatches to their custom kernel on the meta model
        from .layers import build_model

        return tuple(sorted(f"{c['class']}.{c['runs']}" for c in compat.custom_ops(build_model(sc)) if c["enabled"]))
    if name == "padding":  # tokens added to the smallest step that is not a capture size
        from .dispatch import dispatch

        sizes = compat.compilation_summary(cfg)["cudagraph_capture_sizes"]
        gaps = [b - 1 for a, b in zip(sizes, sizes[1:]) if b - a > 1]
        return dispatch(cfg, gaps[0])["padding"] if gaps else None
    if name == "moe_chunk":  # None: no step of this budget is split into MoE chunks
        chunk = compat.moe_chunk_size()
        return chunk if chunk is not None and chunk < cfg.scheduler_config.max_num_batched_tokens else None
    facts = {**compat.compilation_summary(cfg), **compat.scheduler_summary(cfg)}
    parts = [facts[p] for p in name.split("+")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def verify(sc: Scenario, names: Iterable[str] | None = None) -> pd.DataFrame:
    """Apply each switch through vLLM and check its effect on the resolved configuration.

    Columns: switch, layer, flags, env, status ("ok", "no effect", "rejected", "unavailable", or "unverified"
    where the fact it changes cannot be read on this vLLM), before, after, note. Only "ok" switches are
    bisection candidates.
    """
    spell = spelling(sc)
    rows = []
    for name in names or BY_NAME:
        sw = _switch(name)
        s = spell[name]
        row = {"switch": name, "layer": sw.layer, "flags": [], "env": {}, "status": "unavailable",
               "before": None, "after": None, "note": s if isinstance(s, str) else sw.what}
        if not isinstance(s, str):
            flags, env = s
            row.update(flags=flags, env=env)
            try:
                before = _fact(sc, sw.fact)
            except (compat.VllmApiMissing, ImportError) as e:  # this vLLM lacks an API the fact is read with
                row.update(status="unverified", note=f"{type(e).__name__}: {str(e).splitlines()[0]}")
                rows.append(row)
                continue
            if sw.fact in NOTHING_TO_REPLACE and not before:
                row.update(status="no effect", before=before, after=before, note=NOTHING_TO_REPLACE[sw.fact])
                rows.append(row)
                continue
            with compat.with_env(env):
                try:
                    derived = sc.derive(*flags)
                except DiagError as e:
                    row.update(status="rejected", note=str(e))
                else:
                    after = _fact(derived, sw.fact)
                    row.update(status="ok" if sw.changed(before, after) else "no effect", before=before, after=after)
            if sw.fact == "attention_backend":
                compat.fresh_attention_backend(sc.vllm_config)  # leave the selector cache as it was
        rows.append(row)
    return pd.DataFrame(rows, columns=["switch", "layer", "flags", "env", "status", "before", "after", "note"])


def candidates(sc: Scenario) -> list[str]:
    """The switches that work on this scenario's vLLM, broadest first (bisection's default candidates)."""
    table = verify(sc, [s.name for s in CATALOGUE if s.name not in NOT_DEFAULT])
    return table.loc[table.status == "ok", "switch"].tolist()


def _switch(name: str) -> Switch:
    if name not in BY_NAME:
        raise DiagError(f"unknown kill switch {name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def apply(sc: Scenario, names: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Serve flags and env vars turning on ``names`` together (a switch the version lacks -> DiagError)."""
    spell = spelling(sc)
    flags: list[str] = []
    env: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in sorted(set(names), key=lambda n: list(BY_NAME).index(_switch(n).name)):
        s = spell[name]
        if isinstance(s, str):
            raise DiagError(f"kill switch {name} is not available on vLLM {sc.vllm_version}: {s}")
        f, e = s
        for key in [w.split("=", 1)[0] for w in f if w.startswith("-")] + list(e):
            if key in owner:
                raise DiagError(f"kill switches {owner[key]} and {name} both set {key}")
            owner[key] = name
        flags += f
        env.update(e)
    return flags, env


def implicated(names: Iterable[str] | None) -> str:
    """The layer a minimal switch set points at, in words."""
    if names is None:
        return "none of the kill switches avoids the fault: not an optimisation layer (a kernel or size bug)"
    found = [_switch(n) for n in sorted(names, key=list(BY_NAME).index)]
    if not found:
        return "nothing: the probe passes without kill switches"
    text = " + ".join(s.layer for s in found)
    if [s.name for s in found] == ["enforce-eager"]:
        text += " (no narrower switch alone avoided it)"
    return text


def format_text(table: pd.DataFrame) -> str:
    """The verified catalogue, one line per switch: status, spelling, layer, and why where it is not ok."""
    lines = [f"{'switch':<20} {'status':<11} {'serve flags / environment':<48} layer it turns off  (why not ok)"]
    for r in table.itertuples():
        spelled = " ".join(list(r.flags) + [f"{k}={v}" for k, v in r.env.items()])
        why = "" if r.status == "ok" else f"  ({r.note})"
        lines.append(f"{r.switch:<20} {r.status:<11} {spelled:<48} {r.layer}{why}")
    return "\n".join(lines)
