"""Known bug classes matched against resolved scenarios; thresholds checked against vLLM-sized buffers."""
from __future__ import annotations

import json

import moe_models
import pytest

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.predict import known_issues, layers, moe


@pytest.fixture(scope="module")
def matched(scenario):
    return known_issues.match(scenario).set_index("id")


def test_catalog_covers_the_reference_classes_with_links():
    classes = known_issues.catalog()
    assert len(classes) == 17 and len({c["id"] for c in classes}) == 17
    for c in classes:
        for repo, number in c["refs"]:
            assert known_issues.link(repo, number) == f"https://github.com/{repo}/issues/{number}"
    assert any(n == 28776 for c in classes for _, n in c["refs"])  # the seed's own upstream report


def test_seed_classes_that_apply(scenario, matched):
    comp = compat.compilation_summary(scenario.vllm_config)
    mnbt = scenario.vllm_config.scheduler_config.max_num_batched_tokens
    assert matched.loc["exactly-at-budget", "applies"] and matched.loc["exactly-at-budget", "threshold_tokens"] == mnbt
    assert matched.loc["compile-range-edge", "threshold_tokens"] == comp["compile_ranges"][-1][1] == 8192
    assert matched.loc["cudagraph-capture-padding", "threshold_tokens"] == comp["max_cudagraph_capture_size"] + 1 == 513
    assert not matched.loc["fp8-block-tp-alignment", "applies"]  # per-channel FP8, not block
    assert matched.loc["unvalidated-token-ids", "applies"] == (scenario.vllm_version == "0.20.2")


def test_required_packages_are_the_installed_vllms_and_a_missing_one_is_named(scenario, matched, monkeypatch):
    """The requirements are vLLM's own metadata (torch at vLLM's pin); with every one installed the class does
    not apply here; with one taken away it does, naming the distribution and vLLM's specifier."""
    import importlib.metadata

    need = compat.requirements()
    torch_pin = next(r for r in importlib.metadata.requires("vllm") if r.split(";")[0].replace(" ", "")
                     .startswith("torch=="))
    assert "torch" in need and torch_pin.startswith("torch" + need["torch"])
    assert not any(d.startswith("pytest") for d in need)  # extras are left out
    assert not matched.loc["required-package-missing", "applies"]
    gone = min(need)
    real = importlib.metadata.distribution

    def distribution(name):
        if name == gone:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    row = known_issues.match(scenario).set_index("id").loc["required-package-missing"]
    assert row["applies"] and f"requires {gone}{need[gone]}, not installed here" in row["why"]


def test_a_module_maps_to_the_distribution_vllm_requires_also_where_it_is_not_installed(monkeypatch):
    """Installed: by the distribution's own file list; missing (nothing here provides the module): by PyPI's
    naming convention, so that a server lacking the package is told which one vLLM requires."""
    import importlib.metadata

    need = compat.requirements()
    provided = importlib.metadata.packages_distributions()
    module, dist = min((m, d) for m, ds in provided.items() for d in ds if d in need and m.isidentifier())
    assert compat.required_by_module(f"{module}.sub") == (dist, need[dist])
    assert compat.required_by_module("no_such_module_anywhere") is None
    monkeypatch.setattr(importlib.metadata, "packages_distributions", dict)  # an environment without any of them
    for name in need:
        stem = name.lower().replace("_", "-").removesuffix("-python")
        assert compat.required_by_module(stem.replace("-", "_")) == (name, need[name])


def test_classic_moe_overflow_threshold_and_why(scenario, matched):
    row = matched.loc["moe-triton-int32-offset"]
    assert row["threshold_tokens"] == 52_429
    assert not row["applies"]  # budget 8192 < 52,429, and int64 offs_token or activation chunks besides
    assert ("int64" in row["why"]) == moe.offs_token_int64()
    chunk = moe.triton_chunk_tokens(scenario, 52_429)
    assert (f"chunks of {chunk} tokens" in row["why"]) == (not moe.offs_token_int64() and chunk < 52_429)
    assert all(link.startswith("https://github.com/vllm-project/vllm/issues/") for link in row["links"])


def test_a_larger_budget_brings_the_int32_classes_in(scenario):
    big = known_issues.match(scenario.derive("--max-num-batched-tokens", "60000")).set_index("id")
    t = int(big.loc["int32-token-offset", "threshold_tokens"])
    assert big.loc["int32-token-offset", "applies"] and t <= 60000
    df = moe.buffers(scenario, t)
    assert df["max_offset"].max() > moe.INT32_MAX >= moe.buffers(scenario, t - 1)["max_offset"].max()
    chunk = compat.moe_chunk_size()
    layer = layers.build_moe_layer(scenario)
    with layers.rank0(scenario):
        chunks = chunk is not None and compat.chunk_tokens(compat.moe_experts(layer, chunk + 1), chunk + 1) <= chunk
    assert big.loc["moe-chunking-inductor", "applies"] == (chunks and 60000 > chunk)


def test_enforce_eager_removes_the_graph_classes(scenario):
    eager = known_issues.match(scenario.derive("--enforce-eager")).set_index("id")
    assert not eager.loc["cudagraph-capture-padding", "applies"]
    assert not eager.loc["compile-range-edge", "applies"]


def test_bad_catalog_is_one_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "known_issues.json"
    bad.write_text(json.dumps({"classes": [{"id": "x", "predicate": "nope"}]}))
    monkeypatch.setattr(known_issues, "CATALOG", bad)
    with pytest.raises(DiagError, match="unknown predicate 'nope'"):
        known_issues.catalog()
    bad.write_text("{")
    with pytest.raises(DiagError, match="cannot read the known-issue catalog"):
        known_issues.catalog()


def test_dense_model_gets_no_moe_classes_said_once(dense):
    """MoE-only classes say so once; the classes the census answers for every kernel name the dense model's
    own first int32 crossing (an op of its MLP, not of an MoE layer)."""
    from diaglib.predict import census

    m = known_issues.match(dense).set_index("id")
    for cid in ("moe-triton-int32-offset", "moe-chunking-inductor", "fp8-block-tp-alignment"):
        assert m.loc[cid, "why"] == "the model has no MoE layers" and not m.loc[cid, "applies"], cid
    th = census.thresholds(dense)
    th = th[th["tokens"].notna() & (th["tokens"] > 1) & ~th["role"].str.startswith("grid.")]
    first = th.sort_values("tokens", kind="stable").iloc[0]
    why = m.loc["int32-token-offset", "why"]
    assert f"{int(first['tokens']):,} tokens" in why and first["module"] in why and "moe" not in why.lower()
    assert not m.loc["int32-token-offset", "applies"]  # 1024-token budget, far below the crossing
    assert m.loc["exactly-at-budget", "applies"]  # the non-MoE classes still answer


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return moe_models.dense(tmp_path_factory)
