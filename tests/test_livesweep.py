"""Live sweeps on the CPU: real probe children (planted faults), rows streamed from the store, resume, heatmap."""
from __future__ import annotations

import pytest

from diaglib.errors import DiagError
from diaglib.live import livesweep as L
from diaglib.live import store
from diaglib.live.engine import no_engine
from diaglib.live.probe import Probe


def planted_at_8192(n: int) -> Probe:
    return Probe(f"p{n}", [n], planted={"fault": "raise"} if n == 8192 else None)


def test_stream_heatmap_and_resume(scenario, tmp_path):
    knobs = {"switches": ["none", "cudagraph-off"]}
    lengths = [8191, 8192, 8193]
    kw = dict(store_path=tmp_path / "live.jsonl", prefix="t", engine=no_engine(), gpus=[None],
              make_probe=planted_at_8192, probe_timeout_s=30, ready_timeout_s=60, poll_s=0.1)
    rows = list(L.stream(scenario, lengths, knobs, **kw))
    assert [(r["setting"], r["tokens"]) for r in rows] == \
        [(s, n) for s in ("switches=none", "switches=cudagraph-off") for n in lengths]
    assert not any(r["stored"] for r in rows)
    grid = L.heatmap_frame(rows, lengths)
    assert grid.loc["switches=none"].tolist() == ["ok", "python_error", "ok"]
    assert L.progress(grid) == (6, 6)
    assert set(grid.to_numpy().ravel()) <= set(L.OUTCOME_COLORS)
    # The switch set's flags reached the engine vLLM would have been built from.
    engines = [r for r in store.read(tmp_path / "live.jsonl") if r["type"] == "engine"]
    assert any("NONE" in " ".join(e["spec"]["argv"]) for e in engines)
    # A re-run yields what the store holds and runs nothing.
    before = len(store.read(tmp_path / "live.jsonl"))
    again = list(L.stream(scenario, lengths, knobs, **kw))
    assert all(r["stored"] for r in again) and len(again) == 6
    assert len(store.read(tmp_path / "live.jsonl")) == before


def test_heatmap_marks_pending_cells():
    grid = L.heatmap_frame([{"setting": "a", "tokens": 2, "outcome": "ok"}], lengths=[1, 2], labels=["a", "b"])
    assert grid.to_dict("index") == {"a": {1: "pending", 2: "ok"}, "b": {1: "pending", 2: "pending"}}
    assert L.progress(grid) == (1, 4)


def test_bad_settings_and_lengths(scenario, tmp_path):
    with pytest.raises(DiagError, match="unknown kill switch"):
        L.settings(scenario, {"switches": ["graphs-off"]})
    with pytest.raises(DiagError, match="max_num_seqs=many"):
        L.settings(scenario, {"max_num_seqs": ["many"]})
    with pytest.raises(DiagError, match="lengths >= 1"):
        next(L.stream(scenario, [0], {}, store_path=tmp_path / "s.jsonl", prefix="t"))


def test_cli_sweep_live_needs_a_gpu(scenario_name, capsys):
    from diaglib.cli import main
    from diaglib.whatif import real_gpu_present

    if real_gpu_present():
        pytest.skip("a GPU is here: the sweep would run")
    assert main(["sweep", scenario_name, "--lengths", "8191:8193", "--live"]) == 2
    assert "this host has none" in capsys.readouterr().err


def test_rows_arrive_while_the_sweep_still_runs(scenario, tmp_path):
    import time

    def make(n):  # the second probe hangs until its 3 s timeout
        return Probe(f"p{n}", [n], planted={"fault": "hang"} if n == 2 else None, timeout_s=3)

    t0, seen = time.monotonic(), []
    for row in L.stream(scenario, [1, 2], {}, store_path=tmp_path / "s.jsonl", prefix="t", engine=no_engine(),
                        gpus=[None], make_probe=make, ready_timeout_s=60, poll_s=0.1):
        seen.append((row["tokens"], row["outcome"], time.monotonic() - t0))
    assert [s[:2] for s in seen] == [(1, "ok"), (2, "timeout")]
    assert seen[1][2] - seen[0][2] > 2.5  # the first row came out before the hang ended
