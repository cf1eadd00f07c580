"""Workloads as data and their generators (no vLLM needed)."""
from __future__ import annotations

import pandas as pd
import pytest

from diaglib.errors import DiagError
from diaglib.predict.workload import (
    Req,
    Workload,
    prompts,
    random_mix,
    single,
    summing_to,
    with_decoders,
)


def test_single_prompt():
    w = single(8192, output_len=4)
    assert [(r.req_id, r.prompt_len, r.output_len, r.arrival_step) for r in w] == [("a", 8192, 4, 0)]


def test_summing_to_the_budget():
    w = summing_to(8192, 1001)
    assert [r.prompt_len for r in w] == [1001] * 8 + [184]
    assert sum(r.prompt_len for r in w) == 8192
    assert [r.prompt_len for r in summing_to(8192, 1024)] == [1024] * 8


def test_decoders_arrive_first_and_are_background():
    w = with_decoders(8192, 3)
    bg = [r for r in w if r.background]
    fg = [r for r in w if not r.background]
    assert len(bg) == 3 and all(r.arrival_step == 0 for r in bg)
    assert [(r.prompt_len, r.arrival_step) for r in fg] == [(8192, 1)]
    assert [r.arrival_step for r in with_decoders(100, 0)] == [0]


def test_random_mix_is_reproducible_and_bounded():
    a, b = random_mix(50, seed=3, max_prompt=4000, arrival_span=5), random_mix(50, seed=3, max_prompt=4000, arrival_span=5)
    assert a.to_frame().equals(b.to_frame())
    assert not a.to_frame().equals(random_mix(50, seed=4, max_prompt=4000, arrival_span=5).to_frame())
    df = a.to_frame()
    assert df.prompt_len.between(1, 4000).all() and df.output_len.between(1, 256).all()
    assert df.arrival_step.between(0, 5).all() and df.arrival_step.is_monotonic_increasing
    assert set(random_mix(20, lengths=[7, 9]).to_frame().prompt_len) <= {7, 9}


def test_numpy_lengths_are_plain_ints():
    import numpy as np

    r = single(np.int64(8192)).requests[0]
    assert r.prompt_len == 8192 and type(r.prompt_len) is int


def test_frame_round_trip():
    w = prompts(10, 20, output_len=3) + with_decoders(5, 2)
    assert Workload.from_frame(w.to_frame()).to_frame().equals(w.to_frame())
    assert isinstance(w.to_frame(), pd.DataFrame) and len(w) == 5


@pytest.mark.parametrize("make, message", [
    (lambda: single(0), "request 'a': prompt_len must be a positive integer, got 0"),
    (lambda: single(-3), "request 'a': prompt_len must be a positive integer, got -3"),
    (lambda: single(10, output_len=0), "request 'a': output_len must be a positive integer, got 0"),
    (lambda: Req("x", 5, 1, -1), "request 'x': arrival_step must be an integer >= 0, got -1"),
    (lambda: single(8.5), "request 'a': prompt_len must be a positive integer, got 8.5"),
    (lambda: Workload(()), "the workload has no requests"),
    (lambda: prompts(), "give at least one prompt length"),
    (lambda: Workload((Req("x", 5), Req("x", 6))), "duplicate request ids in the workload: x"),
    (lambda: Workload((Req("x", 5, background=True),)), "the workload has only background requests"),
    (lambda: with_decoders(10, -1), "the number of decoders must be >= 0, got -1"),
    (lambda: summing_to(0, 10), "total and size must be positive integers, got 0 and 10"),
    (lambda: random_mix(0), "a random mix needs at least 1 request, got 0"),
    (lambda: random_mix(3, output_len=(5, 2)), "output_len range must satisfy 1 <= low <= high, got (5, 2)"),
    (lambda: random_mix(3, lengths=[]), "the length distribution is empty"),
    (lambda: Workload.from_frame(pd.DataFrame({"req_id": ["a"]})), "workload table lacks column(s): prompt_len"),
])
def test_bad_input(make, message):
    with pytest.raises(DiagError) as e:
        make()
    assert str(e.value) == message
