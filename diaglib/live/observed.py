"""Observed faults against the known bug classes (diaglib.predict.known_issues): which classes fit what was seen.

Four observations are compared with what each class predicts: the first failing token count (against
the class's threshold for this scenario), the faulting kernel (against the kernels the class shows up
in), the minimal kill-switch set (against the switches that avoid the class) and the probe's own error (a
failed import, an allocation that did not fit, a fault on the device). Any contradiction rules a class out; a class that does not
apply to this vLLM version or configuration is out as well, unless the error itself shows it (a class judged
on the environment that ran the probe, not on this one).
"""
from __future__ import annotations

import re

import pandas as pd

from .. import compat
from . import classify

INDUCTOR = r"^triton_(?:poi|red|per|tem|for)_"
# class id -> (kernels it shows up in, kill switches that avoid it, "from" (fails from the threshold on),
# "at" (only at it) or "start" (at engine start-up, not in a probe)). Classes left out predict no fault.
EXPECT = {
    "moe-triton-int32-offset": (r"fused_moe_kernel", {"moe-backend", "moe-chunk-half"}, "from"),
    "int32-token-offset": (r"silu_and_mul|act_and_mul|per_token_group|scaled_fp8|quant|moe_permute|cutlass",
                           {"moe-backend", "moe-chunk-half"}, "from"),
    "inductor-32bit-indexing": (INDUCTOR, {"inductor-off", "compile-off"}, "from"),
    "compile-range-edge": (INDUCTOR, {"inductor-off", "compile-off", "budget+1", "budget-1"}, "at"),
    "moe-chunking-inductor": (INDUCTOR + r"|fused_moe_kernel", {"moe-chunk-off", "inductor-off", "compile-off"},
                              "from"),
    "exactly-at-budget": (None, {"budget+1", "budget-1"}, "at"),
    "cudagraph-capture-padding": (None, {"cudagraph-off"}, "from"),
    "full-capture-over-max-model-len": (r"flash_fwd|combine|FlashAttn", {"cudagraph-off"}, "start"),
    "chunked-prefill-edge": (None, {"chunked-prefill-off"}, "at"),
    "fp8-block-tp-alignment": (None, set(), "start"),
    "profile-run-at-budget": (None, {"budget+1", "budget-1"}, "start"),
    "moe-grid-limit": (r"fused_moe_kernel|moe", {"moe-chunk-half", "moe-backend"}, "from"),
    "unvalidated-token-ids": (r"flash_fwd|embedding|index", set(), None),
    "required-package-missing": (None, set(), None),
    "step-out-of-memory": (None, set(), None),
}
# classes whose fault is a failed import of a package vLLM requires, or an allocation that does not fit; every
# other class is a fault on the device
IMPORT_FAULTS = {"required-package-missing"}
MEMORY_FAULTS = {"step-out-of-memory"}
COLUMNS = ["id", "title", "verdict", "applies", "threshold_tokens", "threshold", "kernel", "switches", "error",
           "why"]


def fit(sc, bisection: dict | None = None, evidence: dict | None = None, matches: pd.DataFrame | None = None
        ) -> pd.DataFrame:
    """One row per fault class: verdict "fits", "does not fit", "does not apply" or "no evidence".

    ``bisection``: BisectResult.as_dict() (failing_low, failing_high, minimal, candidates, complete);
    ``evidence``: an evidence bundle's summary.json (its ``kernel``) and/or the failing probe's ``error`` (its
    exception line); ``matches``: known_issues.match(sc).
    The threshold, kernel, switches and error columns say "agrees", "contradicts" or "" (nothing to compare).
    """
    if matches is None:
        from ..predict.known_issues import match

        matches = match(sc)
    b = bisection or {}
    kernel, error = (evidence or {}).get("kernel"), (evidence or {}).get("error")
    rows = []
    for m in matches.itertuples():
        if m.id not in EXPECT:
            continue
        kernels, avoid, mode = EXPECT[m.id]
        t = None if pd.isna(m.threshold_tokens) else int(m.threshold_tokens)
        checks = {"threshold": _threshold(t, mode, b), "kernel": _kernel(kernels, kernel),
                  "switches": _switches(avoid, b), "error": _error(_fault(m.id), error, sc.vllm_version)}
        reasons = [text for _, text in checks.values() if text]
        verdicts = [v for v, _ in checks.values()]
        if not m.applies and checks["error"][0] != "agrees":
            verdict = "does not apply"
            reasons = [m.why]
        elif "contradicts" in verdicts:
            verdict = "does not fit"
        elif "agrees" in verdicts:
            verdict = "fits"
        else:
            verdict = "no evidence"
        rows.append({"id": m.id, "title": m.title, "verdict": verdict, "applies": bool(m.applies),
                     "threshold_tokens": t, **{k: v for k, (v, _) in checks.items()}, "why": "; ".join(reasons)})
    order = {"fits": 0, "no evidence": 1, "does not fit": 2, "does not apply": 3}
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values("verdict", key=lambda s: s.map(order), kind="stable", ignore_index=True)


def _threshold(t: int | None, mode: str | None, b: dict) -> tuple[str, str]:
    lo, hi = b.get("failing_low"), b.get("failing_high")
    if mode == "start":
        if lo is not None:
            return "contradicts", "the engine started: the fault came with a probe, not at start-up"
        return "", ""
    if t is None or lo is None:
        return "", ""
    if lo == t and (mode != "at" or hi == t):
        return "agrees", f"fails {'exactly at' if mode == 'at' else 'from'} the predicted {t} tokens"
    return "contradicts", f"predicted {'exactly ' if mode == 'at' else 'from '}{t} tokens, observed failing {lo}..{hi}"


def _kernel(pattern: str | None, kernel: str | None) -> tuple[str, str]:
    if not pattern or not kernel:
        return "", ""
    if re.search(pattern, kernel):
        return "agrees", f"faulting kernel {kernel} is one this class shows up in"
    return "contradicts", f"faulting kernel {kernel} is not one this class shows up in"


def _fault(cls: str) -> str:
    """How a class's fault shows: a failed import, an allocation that did not fit, or a fault on the device."""
    return "import" if cls in IMPORT_FAULTS else "memory" if cls in MEMORY_FAULTS else "device"


def _error(fault: str, error: str | None, version: str) -> tuple[str, str]:
    if not error:
        return "", ""
    failed = compat.failed_import(error)
    oom = classify.outcome_of(error) == "out_of_memory"
    if fault == "memory":
        return ("agrees", f"the probe died on {error}: an allocation that did not fit") if oom else \
            ("contradicts", f"the probe died on {error}, not on an allocation that did not fit")
    if fault == "device":
        if failed:
            return "contradicts", f"the probe died on a failed import ({error}), not on a fault in a kernel"
        return ("contradicts", f"the probe died on {error}: an allocation that did not fit, not a fault in a "
                "kernel") if oom else ("", "")
    if failed is None:
        return "contradicts", f"the probe died on {error}, not on a failed import"
    req = compat.required_by_module(failed[0])
    if req is None:
        return "contradicts", f"the probe died on {error}; no distribution vLLM {version} requires provides {failed[0]}"
    return "agrees", (f"the probe died on {error}: {failed[0]} comes from {req[0]}, which vLLM {version} requires"
                      + (f" ({req[1]})" if req[1] else "") + ", missing where the probe ran")


def _switches(avoid: set[str], b: dict) -> tuple[str, str]:
    if "minimal" not in b or not b.get("complete", True):
        return "", ""
    minimal = set(b["minimal"] or ())
    tried = set(b.get("candidates") or ())
    if minimal & avoid:
        return "agrees", f"avoided by {', '.join(sorted(minimal & avoid))}, as this class predicts"
    if b["minimal"] is not None and avoid:
        return "contradicts", f"avoided by {', '.join(sorted(minimal))}, which this class does not predict"
    if b["minimal"] is None and avoid & tried:
        return "contradicts", f"{', '.join(sorted(avoid & tried))} did not avoid it, though this class predicts so"
    return "", ""
