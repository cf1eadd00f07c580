"""Observed kernels against the census, on the CPU: the trace's step marks, the kernel table file, the census
step of an observed step, and the alignment of observed kernels with the census's launches."""
from __future__ import annotations

import pandas as pd
import pytest

from diaglib import compat
from diaglib.live import kernels


def _trace() -> dict:
    ev = []

    def mark(name, ts, dur):
        ev.append({"ph": "X", "cat": "user_annotation", "name": kernels.MARK + name, "ts": ts, "dur": dur, "args": {}})

    def launch(corr, ts, cat="cuda_runtime"):
        ev.append({"ph": "X", "cat": cat, "name": "launch", "ts": ts, "dur": 1, "args": {"correlation": corr}})

    def kernel(corr, ts, name, grid=(1, 1, 1)):
        ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": 2.5,
                   "args": {"correlation": corr, "grid": list(grid), "block": [128, 1, 1], "stream": 7}})

    mark("step 0 execute", 100, 100), mark("forward", 120, 50), mark("sample", 210, 20)
    launch(1, 110), kernel(1, 300, "prepare_kernel")
    launch(2, 130), kernel(2, 310, "triton_poi_fused_0", (64, 1, 1)), kernel(2, 312, "flash_fwd")  # a graph launch
    kernel(99, 313, "no_launch_record")
    launch(3, 180), kernel(3, 320, "logits_gemm")
    launch(4, 215, "cuda_driver"), kernel(4, 330, "argmax")
    kernel(5, 50, "before_any_step")
    mark("step 1 profile", 400, 50)
    launch(6, 410), kernel(6, 500, "dummy_kernel")
    return {"traceEvents": ev}


def test_trace_steps_put_each_kernel_in_its_step_and_phase():
    df = kernels.trace_steps(_trace())
    got = {r.name: (r.step, r.phase) for r in df.itertuples()}
    assert got == {"before_any_step": (-1, "unmarked"), "prepare_kernel": (0, "prepare"),
                   "triton_poi_fused_0": (0, "forward"), "flash_fwd": (0, "forward"),
                   "no_launch_record": (0, "forward"),  # the kernel before it on its stream
                   "logits_gemm": (0, "post"), "argmax": (0, "sample"), "dummy_kernel": (1, "prepare")}
    step0 = df[df.step == 0].sort_values("seq")
    assert list(step0.name) == ["prepare_kernel", "triton_poi_fused_0", "flash_fwd", "no_launch_record",
                                "logits_gemm", "argmax"]
    assert df.set_index("name").loc["triton_poi_fused_0", "grid"] == (64, 1, 1)


def test_kernel_table_file_round_trips(tmp_path):
    df = kernels.trace_steps(_trace())
    back = kernels.read(kernels.write(df, tmp_path / "k" / "t.csv.gz"))
    pd.testing.assert_frame_equal(back[kernels.COLUMNS].astype({"kind": object}),
                                  df[kernels.COLUMNS].astype({"kind": object}).fillna({"kind": ""}),
                                  check_dtype=False)
    assert kernels.kernel_path("/x/s.jsonl", "bisect-a/cudagraph-off", "p8192").name == \
        "bisect-a+cudagraph-off.p8192.csv.gz"


def test_census_steps_follow_each_request_through_the_probe(scenario):
    record = {"probe": {"prompts": [8193, 100]},
              "runner_steps": [{"kind": "execute", "per_prompt": {"0": 8192}},
                               {"kind": "execute", "per_prompt": {"0": 1, "1": 100}},
                               {"kind": "execute", "per_prompt": {"0": 1, "1": 1}},
                               {"kind": "execute", "per_prompt": {}},
                               {"kind": "profile", "total": 4096}]}
    steps = dict(kernels.census_steps(record, scenario))
    assert (steps[0].kind, steps[0].query, steps[0].context) == ("prefill", (8192,), (0,))
    assert (steps[1].kind, steps[1].query, steps[1].context) == ("prefill", (1, 100), (8192, 0))
    assert (steps[2].kind, steps[2].query, steps[2].context) == ("decode", (1, 1), (8193, 100))
    assert 3 not in steps and steps[4].kind == "profile" and steps[4].tokens == 4096


@pytest.fixture(scope="module")
def launches(scenario):
    from diaglib.predict import census

    return census.launches(scenario, census.prefill(2048))


def _observed_from(lk: pd.DataFrame) -> pd.DataFrame:
    """Kernels as a GPU would name them for the census's launches: one triton_* kernel per Inductor fusion group."""
    phase = {"setup": "prepare", "model": "forward", "logits": "post", "sampler": "sample"}
    rows, last = [], None
    for r in lk.itertuples():
        if r.runs_as == "inductor":
            if r.fusion == last:
                continue
            last, name = r.fusion, f"triton_poi_fused_{int(r.fusion)}"
        elif r.match.startswith("^"):
            name = r.match.strip("^$").replace("\\", "")
        elif r.runs_as.startswith("eager torch"):
            name = f"void at::native::vectorized_elementwise_kernel<4, {r.op}>"
        else:
            name = f"void vllm::{r.match.split('|')[0]}_kernel<float>"
        rows.append({"step": 0, "kind": "execute", "phase": phase[r.phase], "seq": len(rows), "name": name,
                     "grid": r.grid, "block": (128, 1, 1), "dur_us": 1.0, "census_row": r.Index})
    return pd.DataFrame(rows)


def test_match_pairs_every_predicted_kernel_and_lists_the_unforeseen(launches):
    obs = _observed_from(launches)
    extra = {"step": 0, "kind": "execute", "phase": "forward", "seq": -1, "name": "a_kernel_nobody_predicted",
             "grid": (1, 1, 1), "block": (32, 1, 1), "dur_us": 1.0, "census_row": None}
    mid = len(obs) // 2
    obs = pd.concat([obs.iloc[:mid], pd.DataFrame([extra]), obs.iloc[mid:]], ignore_index=True)
    k, missing = kernels.match(obs.drop(columns="census_row"), launches)
    unforeseen = list(k.loc[~k.foreseen, "name"])
    if unforeseen != ["a_kernel_nobody_predicted"] and compat.installed() != compat.REFERENCE:
        pytest.xfail(f"the kernel-name rules were read off vLLM {compat.REFERENCE}'s traces; under "
                     f"{compat.installed()} {len(unforeseen) - 1} Inductor kernels are not paired yet")
    assert unforeseen == ["a_kernel_nobody_predicted"]
    paired = k[k.foreseen]
    made = launches.loc[obs.loc[paired.index, "census_row"].astype(int)]
    inductor = (paired["runs_as"] == "inductor").to_numpy()
    assert (paired["fusion"].to_numpy()[inductor] == made["fusion"].to_numpy()[inductor]).all()
    assert (paired["op"].to_numpy()[~inductor] == made["op"].to_numpy()[~inductor]).all()  # the same op (or its twin)
    assert paired.loc[inductor, "op"].str.startswith("fused ").all()
    assert missing["fused"].all()  # every op left over is an Inductor op fused into its group's kernel
    with_grid = paired[paired.grid_equal.notna()]
    assert len(with_grid) and with_grid.grid_equal.all()


def test_match_says_when_a_grid_differs(launches):
    obs = _observed_from(launches).drop(columns="census_row")
    at = obs.index[obs.grid.notna()][0]
    g = obs.at[at, "grid"]
    obs.at[at, "grid"] = (g[0] + 1, *g[1:])
    k, _ = kernels.match(obs, launches)
    assert k.at[at, "grid_equal"] is False or k.at[at, "grid_equal"] == False
    assert k.grid_equal.dropna().sum() == k.grid_equal.notna().sum() - 1
