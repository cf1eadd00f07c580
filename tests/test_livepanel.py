"""The live sweep panel on the CPU: stored results in their cells, Run off without a GPU, bad input as a
status line, the heatmap's colours, and a real sweep (CPU probe children) streamed in, stopped and resumed."""
from __future__ import annotations

import time

import pytest
from matplotlib.colors import to_rgba

from diaglib.live import livesweep as L
from diaglib.live import probe as P
from diaglib.live import store
from diaglib.live.engine import no_engine
from diaglib.live.observe import gpu_count
from diaglib.present import livepanel, plots

KNOBS = "switches=none,cudagraph-off"


def planted_at_8192(n: int) -> P.Probe:
    return P.Probe(f"p{n}", [n], planted={"fault": "raise"} if n == 8192 else None)


@pytest.fixture(scope="module")
def recorded(scenario, tmp_path_factory):
    """A store written by real probe children: switches=none ran 8191-8193 (a Python error planted at
    8192), switches=cudagraph-off only 8191."""
    path = tmp_path_factory.mktemp("live") / "live.jsonl"
    table = L.settings(scenario, {"switches": ["none", "cudagraph-off"]})
    for setting, lengths in zip(table, ([8191, 8192, 8193], [8191])):
        P.run([planted_at_8192(n) for n in lengths], no_engine(), store_path=path, gpus=[None],
              run_name=L.run_name(L.prefix(scenario), setting), probe_timeout_s=30, ready_timeout_s=60)
    return path


def test_panel_shows_stored_results_in_their_cells(scenario, recorded):
    p = livepanel.panel(scenario, store=recorded, lengths="8191-8193", knobs=KNOBS)
    assert p.grid.to_dict("index") == {"switches=none": {8191: "ok", 8192: "python_error", 8193: "ok"},
                                       "switches=cudagraph-off": {8191: "ok", 8192: "pending", 8193: "pending"}}
    assert (p.bar.value, p.bar.max) == (4, 6) and "4 of 6 probes stored in" in p.status.value
    assert bytes(p.image.value[:4]) == b"\x89PNG"
    p.controls["lengths"].value = "8192"
    assert p.grid.to_dict() == {8192: {"switches=none": "python_error", "switches=cudagraph-off": "pending"}}
    assert (p.bar.value, p.bar.max) == (1, 2)
    p.controls["planted"].value = True  # a rehearsal has runs of its own: none stored
    assert "no stored results in" in p.status.value and (p.bar.value, p.bar.max) == (0, 2)


def test_run_is_disabled_without_a_gpu(scenario, tmp_path):
    if gpu_count():
        pytest.skip("a GPU is here")
    p = livepanel.panel(scenario, store=tmp_path / "live.jsonl")
    assert p.run_button.disabled and p.stop_button.disabled
    assert "no stored results in" in p.status.value and "no GPU on this host: Run is disabled" in p.status.value
    p.run()
    assert not p.running and not (tmp_path / "live.jsonl").exists()


def test_bad_input_becomes_the_status_line(scenario, tmp_path):
    p = livepanel.panel(scenario, store=tmp_path / "live.jsonl", engine=no_engine())
    for control, text, message in [("lengths", "8190-x", "bad token count"),
                                   ("knobs", "switches=graphs-off", "unknown kill switch"),
                                   ("knobs", "max_num_seqs", "expected NAME=V1,V2"),
                                   ("knobs", "max_num_seqs=many", "max_num_seqs=many")]:
        p.controls[control].value = text
        assert message in p.status.value and "#cf222e" in p.status.value, (text, p.status.value)
        p.run()
        assert not p.running and message in p.status.value
        p.controls[control].value = {"lengths": "8190-8194", "knobs": KNOBS}[control]
    assert "no stored results" in p.status.value
    p.controls["planted"].value, p.controls["planted_at"].value = True, 0
    assert "N &gt;= 1" in p.status.value
    folder = livepanel.panel(scenario, store=tmp_path, knobs="switches=none")
    assert "is a folder" in folder.status.value


def test_live_heatmap_draws_one_cell_per_probe_in_its_outcome_colour():
    rows = [{"setting": "a", "tokens": 1, "outcome": "ok"}, {"setting": "a", "tokens": 2, "outcome": "timeout"},
            {"setting": "b", "tokens": 3, "outcome": "illegal_memory_access"}]
    grid = L.heatmap_frame(rows, lengths=[1, 2, 3], labels=["a", "b"])
    fig = plots.live_heatmap(grid)
    ax = fig.axes[0]
    cells = ax.images[0].get_array()
    assert cells.shape == (2, 3, 4)
    for i, setting in enumerate(grid.index):
        for j, tokens in enumerate(grid.columns):
            assert tuple(cells[i, j]) == to_rgba(L.OUTCOME_COLORS[grid.loc[setting, tokens]])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ok", "illegal memory access", "timeout", "pending"]
    wide = plots.live_heatmap(L.heatmap_frame([], lengths=range(8160, 8220), labels=["a"]))
    assert 10 <= len(wide.axes[0].get_xticklabels()) <= 24


def test_prefix_keeps_planted_runs_apart(scenario):
    from diaglib.live.bisect import store_prefix

    plain = L.prefix(scenario)
    assert plain == "sweep-" + store_prefix(scenario).removeprefix("bisect-")  # what `diaglib sweep --live` writes
    assert L.prefix(scenario, 8192) == plain + "-planted8192" != L.prefix(scenario, 8193)


def test_run_streams_into_the_heatmap_stops_and_resumes(scenario, tmp_path):
    path = tmp_path / "live.jsonl"

    def make(n):  # 2 tokens: the probe hangs until its 3 s timeout
        return P.Probe(f"p{n}", [n], planted={"fault": "hang"} if n == 2 else None, timeout_s=3)

    p = livepanel.panel(scenario, store=path, lengths="1-3", knobs="", engine=no_engine(), make_probe=make)
    assert not p.run_button.disabled and "no stored results" in p.status.value
    p.run_button.click()
    assert p.running and p.run_button.disabled and not p.stop_button.disabled and p.controls["knobs"].disabled
    end = time.monotonic() + 60
    while "running: 1 of 3" not in p.status.value and time.monotonic() < end:  # the grid, then the status line
        time.sleep(0.1)
    assert p.running and p.grid.loc["base"].tolist() == ["ok", "pending", "pending"]  # drawn while probe 2 hangs
    assert p.bar.value == 1 and "running: 1 of 3 probes" in p.status.value
    p.stop_button.click()
    p.wait(60)
    assert p.grid.loc["base"].tolist() == ["ok", "timeout", "pending"] and "stopped: 2 of 3" in p.status.value
    assert not p.run_button.disabled and p.stop_button.disabled and not p.controls["knobs"].disabled
    p.run_button.click()  # resumes: only the third probe runs
    p.wait(60)
    assert p.grid.loc["base"].tolist() == ["ok", "timeout", "ok"] and "finished: 3 of 3" in p.status.value
    assert (p.bar.value, p.bar.max) == (3, 3)
    assert sorted(r["key"] for r in store.read(path) if r["type"] == "probe") == ["p1", "p2", "p3"]


def test_recorded_sweeps_are_read_without_vllm():
    """The H200 rehearsal's sweep, read from its store by run label: graphs-on faults at 8192 and 8193 only."""
    from diaglib.live import livesweep

    rows = livesweep.recorded("data/live/h200-vllm-0.20.2-i7/live.jsonl", planted=8192)
    grid = livesweep.heatmap_frame(rows)
    assert list(grid.columns) == [8191, 8192, 8193]
    assert set(grid.index) == {"switches=none", "switches=cudagraph-off", "switches=enforce-eager"}
    faults = {(s, t) for s in grid.index for t in grid.columns if grid.loc[s, t] != "ok"}
    assert faults == {("switches=none", 8192), ("switches=none", 8193)}
    assert livesweep.recorded("data/live/h200-vllm-0.20.2-i7/live.jsonl") == []  # plain sweeps: none stored
