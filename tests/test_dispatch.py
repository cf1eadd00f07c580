"""diaglib.predict.dispatch against vLLM's own dispatcher, padding and compile ranges (seed scenario)."""
from __future__ import annotations

import pytest

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.predict.dispatch import dispatch, dispatch_table, dispatcher

pytestmark = pytest.mark.contract


def _capture_sizes(sc):
    return sorted(compat.compilation_summary(sc.vllm_config)["cudagraph_capture_sizes"])


def _decode_and_mixed(sc) -> tuple[str, str]:
    """The resolved graph mode's decode and mixed-batch modes (vLLM's CUDAGraphMode where it has one)."""
    mode = dispatcher(sc).mode
    try:
        from vllm.config import CUDAGraphMode
    except ImportError:  # 0.10.0: one kind of graph for every batch
        return mode, mode
    return CUDAGraphMode[mode].decode_mode().name, CUDAGraphMode[mode].mixed_mode().name


@pytest.mark.parametrize("n", [513, 8191, 8192])
def test_large_steps_run_without_cuda_graph(scenario, n):
    d = dispatch(scenario, n)
    assert d["cudagraph_mode"] == "NONE"
    assert d["padded_tokens"] == n and d["padding"] == 0


def test_seven_tokens_pad_to_eight_with_a_graph(scenario):
    d = dispatch(scenario, 7)
    assert d["padded_tokens"] == 8
    assert d["cudagraph_mode"] == _decode_and_mixed(scenario)[1] != "NONE"  # one request of 7 tokens: mixed


def test_padding_is_the_next_capture_size(scenario):
    sizes = _capture_sizes(scenario)
    table = dispatch_table(scenario, range(1, sizes[-1] + 2))
    for n, padded, mode in zip(table.num_tokens, table.padded_tokens, table.cudagraph_mode):
        if n <= sizes[-1]:
            assert padded == min(s for s in sizes if s >= n) and mode != "NONE"
        else:
            assert padded == n and mode == "NONE"


def test_uniform_decode_gets_full_graph_where_the_mode_allows(scenario):
    decode, mixed = _decode_and_mixed(scenario)
    d = dispatch(scenario, 7, decode=True)
    assert d["uniform_decode"] and d["padded_tokens"] == 8
    assert d["cudagraph_mode"] == (decode if decode != "NONE" else mixed)
    m = dispatch(scenario, 8, num_reqs=2, max_query_len=7)
    assert not m["uniform_decode"] and m["cudagraph_mode"] == mixed


def test_resolved_mode_and_runner_are_reported(scenario):
    d = dispatch(scenario, 100)
    assert d["cudagraph_mode_config"] == dispatcher(scenario).mode
    assert d["model_runner"] == compat.runner_kind(scenario.vllm_config)


def test_dispatch_leaves_the_config_alone(scenario):
    before = compat.compilation_summary(scenario.vllm_config)
    dispatch(scenario, 100)
    assert compat.compilation_summary(scenario.vllm_config) == before


def test_compile_range_holds_the_padded_size(scenario):
    ranges = compat.compilation_summary(scenario.vllm_config)["compile_ranges"]
    assert ranges
    for n in (1, 7, 51, 52, 512, 513, 8191, 8192):
        d = dispatch(scenario, n)
        lo, hi = d["compile_range"]
        assert lo <= d["padded_tokens"] <= hi
        assert (lo, hi) in ranges
    assert dispatch(scenario, 8192)["compile_range"] == ranges[-1]  # the last range ends at the budget


def test_enforce_eager_means_no_graph_and_no_compilation(scenario):
    eager = scenario.derive("--enforce-eager")
    d = dispatch(eager, 7)
    assert d["cudagraph_mode"] == "NONE" and d["padded_tokens"] == 7
    assert d["compile_kind"] == "none" and d["compile_range"] is None


def test_table_matches_single_dispatch(scenario):
    import pandas as pd

    t = dispatch_table(scenario, [3, 600])
    pd.testing.assert_frame_equal(t, pd.DataFrame([dispatch(scenario, 3), dispatch(scenario, 600)]))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_tokens": 0}, "a step needs at least 1 token, got 0"),
    ({"num_tokens": -5}, "a step needs at least 1 token, got -5"),
    ({"num_tokens": 8193}, "a step of 8193 tokens cannot happen: max_num_batched_tokens is 8192"),
    ({"num_tokens": 8, "num_reqs": 2}, "give both num_reqs and max_query_len (or neither)"),
    ({"num_tokens": 8, "decode": True, "num_reqs": 8}, "give either decode=True or num_reqs/max_query_len, not both"),
    ({"num_tokens": 8, "num_reqs": 9, "max_query_len": 1}, "num_reqs must be between 1 and num_tokens (8), got 9"),
    ({"num_tokens": 8, "num_reqs": 2, "max_query_len": 3}, "max_query_len 3 does not fit 2 requests sharing 8 tokens"),
    ({"num_tokens": 8, "num_reqs": 4, "max_query_len": 6}, "4 requests cannot share 8 tokens with one holding 6"),
])
def test_bad_input(scenario, kwargs, message):
    n = kwargs.pop("num_tokens")
    with pytest.raises(DiagError) as e:
        dispatch(scenario, n, **kwargs)
    assert str(e.value) == message


def test_empty_table_is_an_error(scenario):
    with pytest.raises(DiagError, match="no token counts given"):
        dispatch_table(scenario, [])


def test_a_flashinfer_scenario_dispatches_as_the_runner_resolves_it(scenario):
    """On B200 vLLM picks FlashInfer attention, whose metadata builder reads the current vLLM config while the
    runner resolves the graph mode: dispatch sets it as the runner's start-up does, and pads as on any other."""
    sc = scenario.derive("--attention-backend", "FLASHINFER") if "--attention-backend" in compat.serve_options() \
        else scenario
    if not compat.attention_backend(sc.vllm_config).startswith("FLASHINFER"):
        pytest.skip(f"vLLM {compat.installed()} does not take FlashInfer attention by flag here")
    sizes = _capture_sizes(sc)
    d = dispatch(sc, sizes[0] + 1, decode=True)
    decode, mixed = _decode_and_mixed(sc)
    assert d["padded_tokens"] == min(s for s in sizes if s > sizes[0])
    assert d["cudagraph_mode"] == (decode if decode != "NONE" else mixed)
