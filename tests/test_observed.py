"""Observed faults against the known bug classes, on the seed scenario's own class matches."""
from __future__ import annotations

import pytest

from diaglib.live.observed import EXPECT, fit


@pytest.fixture(scope="module")
def matches(scenario):
    from diaglib.predict.known_issues import match

    return match(scenario)


def verdicts(df):
    return dict(zip(df.id, df.verdict))


def test_exact_budget_fault_avoided_by_budget_plus_one(scenario, matches):
    b = {"failing_low": 8192, "failing_high": 8192, "minimal": ["budget+1"],
         "candidates": ["cudagraph-off", "budget+1"], "complete": True}
    df = fit(scenario, b, matches=matches)
    v = verdicts(df)
    assert v["exactly-at-budget"] == "fits"
    assert v["moe-triton-int32-offset"] == "does not apply"  # int64 offsets / no overflow at this budget
    assert v["cudagraph-capture-padding"] == "does not fit"  # predicts 513 and the graph switch
    assert v["profile-run-at-budget"] == "does not fit"      # the engine started
    row = df.set_index("id").loc["exactly-at-budget"]
    assert (row.threshold, row.switches) == ("agrees", "agrees") and "8192" in row.why
    assert df.verdict.iloc[0] == "fits" and set(df.id) <= set(EXPECT)


def test_kernel_evidence_rules_classes_in_and_out(scenario, matches):
    b = {"failing_low": 8192, "failing_high": 8192, "minimal": ["inductor-off"], "candidates": ["inductor-off"],
         "complete": True}
    df = fit(scenario, b, {"kernel": "triton_poi_fused_add_mul_0"}, matches=matches).set_index("id")
    assert df.loc["exactly-at-budget", "verdict"] == "does not fit"  # inductor-off is not what it predicts
    if df.loc["compile-range-edge", "applies"]:
        assert df.loc["compile-range-edge", "kernel"] == "agrees"
    df = fit(scenario, b, {"kernel": "cutlass_3x_grouped_gemm"}, matches=matches).set_index("id")
    assert df.loc["compile-range-edge", "kernel"] == "contradicts"


def test_nothing_observed_is_no_evidence(scenario, matches):
    df = fit(scenario, {}, None, matches=matches)
    assert set(df.verdict) <= {"no evidence", "does not apply"}


def _a_required_module():
    """A top-level module of a distribution the installed vLLM requires (read off this environment)."""
    import importlib.metadata as md

    from diaglib import compat

    need = {d.lower().replace("_", "-") for d in compat.requirements()}
    return min(m for m, dists in md.packages_distributions().items()
               if m.isidentifier() and any(d.lower().replace("_", "-") in need for d in dists))


def test_a_failed_import_of_a_required_package_fits_only_the_missing_package_class(scenario, matches):
    """The probe's own error judges the environment that ran it, whatever this one has installed."""
    b = {"failing_low": 8191, "failing_high": 8193, "minimal": ["gdn-prefill-triton"],
         "candidates": ["gdn-prefill-triton"], "complete": True}
    module = _a_required_module()
    df = fit(scenario, b, {"error": f"ModuleNotFoundError: No module named '{module}'"},
             matches=matches).set_index("id")
    assert df.loc["required-package-missing", "verdict"] == "fits" and module in df.loc["required-package-missing",
                                                                                           "why"]
    assert (df.loc[df.index != "required-package-missing", "verdict"] != "fits").all()
    assert df.loc["exactly-at-budget", "error"] == "contradicts"
    df = fit(scenario, b, {"error": "ModuleNotFoundError: No module named 'no_such_module_anywhere'"},
             matches=matches).set_index("id")
    assert df.loc["required-package-missing", "error"] == "contradicts"
    assert df.loc["required-package-missing", "verdict"] in ("does not fit", "does not apply")
    df = fit(scenario, b, {"error": "RuntimeError: CUDA error: an illegal memory access was encountered"},
             matches=matches).set_index("id")
    assert df.loc["required-package-missing", "error"] == "contradicts"


OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total capacity of 79.18 GiB "
       "of which 3.43 GiB is free. Including non-PyTorch memory, this process has 75.73 GiB memory in use. Of the "
       "allocated memory 69.16 GiB is allocated by PyTorch, and 5.26 GiB is reserved by PyTorch but unallocated.")


def test_an_allocation_that_did_not_fit_fits_only_the_memory_class(scenario, matches):
    """An out-of-memory error is the memory class's symptom and contradicts every fault on the device."""
    b = {"failing_low": 49933, "failing_high": 49933, "complete": True}
    df = fit(scenario, b, {"error": OOM}, matches=matches).set_index("id")
    assert df.loc["step-out-of-memory", "verdict"] == "fits" and df.loc["step-out-of-memory", "error"] == "agrees"
    assert (df.loc[df.index != "step-out-of-memory", "verdict"] != "fits").all()
    assert df.loc["exactly-at-budget", "error"] == "contradicts"
    df = fit(scenario, b, {"error": "RuntimeError: CUDA error: an illegal memory access was encountered"},
             matches=matches).set_index("id")
    assert df.loc["step-out-of-memory", "error"] == "contradicts"
