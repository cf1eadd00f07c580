"""The boundary map: each listed edge is checked on both sides, derived rules against vLLM's scheduler."""
from __future__ import annotations

import itertools

import moe_models
import pytest

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.predict import boundaries, moe, schedule, workload
from diaglib.predict.dispatch import dispatch

pytestmark = pytest.mark.contract


@pytest.fixture(scope="module")
def bmap(scenario):
    return boundaries.boundaries(scenario)


def _at(df, axis, tokens, kind):
    return df[(df["axis"] == axis) & (df["tokens"] == tokens) & (df["kind"] == kind)]


def test_required_edges_for_the_seed(scenario, bmap):
    comp = compat.compilation_summary(scenario.vllm_config)
    top = comp["max_cudagraph_capture_size"]
    assert len(_at(bmap, "step", top + 1, "cudagraph mode")) == 1 and top == 512  # 512 / 513
    assert len(_at(bmap, "step", 8193, "budget")) == 1  # 8192 / 8193
    assert len(_at(bmap, "prompt", 8193, "prefill chunk")) == 1
    edges = bmap[bmap["kind"] == "compile range"]["tokens"]
    for _, end in comp["compile_ranges"]:  # every compile-range edge, in tokens before CUDA-graph padding
        if end == 8192:
            assert len(_at(bmap, "step", end + 1, "compile range")) == 1
            continue
        hits = [t for t in edges
                if dispatch(scenario, t - 1)["padded_tokens"] <= end < dispatch(scenario, t)["padded_tokens"]]
        assert len(hits) == 1, end
    th = moe.int32_thresholds(scenario).dropna(subset=["tokens"])
    assert len(th) > 0
    for path, buffer, t in zip(th["path"], th["buffer"], th["tokens"].astype(int)):
        assert len(bmap[(bmap["feature"] == f"int32:{path}.{buffer}") & (bmap["tokens"] == t)]) == 1
    assert 52_429 in set(bmap[bmap["kind"] == "int32"]["tokens"])


def test_capture_size_edges_are_vllms_capture_sizes(scenario, bmap):
    sizes = set(compat.compilation_summary(scenario.vllm_config)["cudagraph_capture_sizes"])
    graph = bmap[bmap["feature"] == "cudagraph"]
    assert set(graph["tokens"] - 1) == sizes


def test_every_listed_boundary_changes_across_it(scenario, bmap):
    for _, r in bmap.iterrows():
        below = boundaries.feature_value(scenario, r["feature"], r["tokens"] - 1)
        above = boundaries.feature_value(scenario, r["feature"], r["tokens"])
        assert below != above, (r["feature"], r["tokens"], below)


def test_ranked_by_distance_from_the_budget(bmap):
    assert list(bmap["distance"]) == sorted(bmap["distance"])
    assert bmap.iloc[0]["distance"] == 1


def _prefill_steps(scenario, prompt_len):
    tr = schedule.trace(scenario, workload.single(prompt_len))
    return sum(1 for s in tr.schedule() if s.endswith(("P", "L")))


@pytest.mark.parametrize("edge", [8193, 16385])
def test_prefill_chunk_rule_matches_vllms_scheduler(scenario, edge):
    for n in (edge - 1, edge):
        assert _prefill_steps(scenario, n) == boundaries.feature_value(scenario, "prefill_chunks", n)


def test_kv_block_rule_matches_vllms_kv_cache_manager(scenario, bmap):
    from vllm.v1.request import RequestStatus

    eng = schedule.Engine(scenario)
    s, salt = eng.scheduler, itertools.count()
    for edge in bmap[bmap["kind"] == "KV block"]["tokens"]:
        for n in (edge - 1, edge):
            rid = f"kv{next(salt)}"
            s.add_request(compat.new_request(rid, [1] * n, 1, eng.hasher, f"kv-test-{rid}"))
            out = s.schedule()
            assert out.num_scheduled_tokens[rid] == min(n, scenario.vllm_config.scheduler_config.max_num_batched_tokens)
            blocks = len(s.kv_cache_manager.get_block_ids(rid)[0])
            assert blocks == boundaries.feature_value(scenario, "kv_blocks", out.num_scheduled_tokens[rid])
            s.finish_requests({rid}, RequestStatus.FINISHED_ABORTED)


def test_around_the_operating_point(scenario, bmap):
    near = boundaries.around(scenario, df=bmap).set_index("tokens")
    assert list(near["step"]) == ["schedulable", "schedulable", "over budget"]
    assert list(near["prompt_chunks"]) == [1, 1, 2]
    assert "step budget" in near.loc[8192, "last before"]
    info = boundaries.summary(scenario, bmap)
    assert info["classic_moe_overflow_tokens"] == 52_429 and info["classic_moe_overflow_distance"] == 52_429 - 8192
    text = boundaries.format_text(bmap, near.reset_index(), info)
    assert "52,429 tokens per step" in text and "8193" in text


def test_max_model_len_edge_is_vllms_own_check(scenario, bmap):
    mml = scenario.vllm_config.model_config.max_model_len
    row = bmap[bmap["kind"] == "max_model_len"].iloc[0]
    assert row["tokens"] in (mml, mml + 1)
    compat.check_prompt_len(scenario.vllm_config, row["tokens"] - 1)
    with pytest.raises(DiagError, match="would reject"):
        compat.check_prompt_len(scenario.vllm_config, row["tokens"])


def test_bad_input(scenario):
    with pytest.raises(DiagError, match="unknown boundary feature"):
        boundaries.feature_value(scenario, "nope", 5)
    with pytest.raises(DiagError, match="must be positive"):
        boundaries.around(scenario, [0])


def test_cli_boundaries_json_and_text(scenario_name, capsys):
    import json

    from diaglib.cli import main

    assert main(["boundaries", scenario_name, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["classic_moe_overflow_tokens"] == 52_429
    assert [r["tokens"] for r in out["around"]] == [8191, 8192, 8193]
    assert any(r["kind"] == "budget" and r["tokens"] == 8193 for r in out["boundaries"])
    assert any(r["id"] == "exactly-at-budget" and r["applies"] for r in out["known_issues"])
    assert main(["boundaries", scenario_name, "--around", "512", "513"]) == 0
    text = capsys.readouterr().out
    assert "Known bug classes that apply" in text and "52,429 tokens per step" in text


def test_cli_boundaries_bad_around_exits_2(scenario_name, capsys):
    from diaglib.cli import main

    assert main(["boundaries", scenario_name, "--around", "0"]) == 2
    assert "token counts must be positive" in capsys.readouterr().err


def test_dense_model_boundaries_answer_without_moe_rows(dense):
    df = boundaries.boundaries(dense)
    assert len(df) and not set(df["kind"]) & {"MoE config", "MoE kernel", "MoE chunking"}
    limits = df[df["kind"].isin(["int32", "grid limit"])]  # every kernel's limits: the census's rows only
    assert len(limits) and set(limits["source"]) == {"vLLM forward (census)"}
    assert "classic_moe_overflow_tokens" not in boundaries.summary(dense, df)
    near = boundaries.around(dense, df=df)
    assert "moe_largest" not in near.columns


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return moe_models.dense(tmp_path_factory)
