"""diaglib.present.plots: one colour per phase and graph mode in every figure, the boundary marked, axes labelled."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from diaglib.present import plots  # noqa: E402

BUDGET = 8192


def _steps():
    """A schedule as diaglib.predict.schedule.trace returns it: prompts 8192 and 20 arriving together."""
    per_request = pd.DataFrame([
        {"step": 0, "req_id": "a", "tokens": 8192, "phase": "last-prefill-chunk"},
        {"step": 1, "req_id": "a", "tokens": 1, "phase": "decode"},
        {"step": 1, "req_id": "b", "tokens": 20, "phase": "prefill-chunk"},
        {"step": 2, "req_id": "b", "tokens": 1, "phase": "decode"},
    ])
    per_step = pd.DataFrame([
        {"step": 0, "total_tokens": 8192, "padded_tokens": 8192, "cudagraph_mode": "NONE", "at_budget": True, "forward": True},
        {"step": 1, "total_tokens": 21, "padded_tokens": 24, "cudagraph_mode": "PIECEWISE", "at_budget": False, "forward": True},
        {"step": 2, "total_tokens": 1, "padded_tokens": 1, "cudagraph_mode": "FULL", "at_budget": False, "forward": True},
        {"step": 3, "total_tokens": 0, "padded_tokens": 0, "cudagraph_mode": None, "at_budget": False, "forward": False},
    ])
    return per_request, per_step


def _hex(c) -> str:
    return mcolors.to_hex(c).upper()


def _boundary_lines(ax, at=BUDGET):
    return [ln for ln in ax.get_lines() if _hex(ln.get_color()) == plots.BOUNDARY.upper() and ln.get_linestyle() == "--"
            and at in (list(ln.get_xdata()) + list(ln.get_ydata()))]


def test_palettes_are_distinct_and_cover_every_phase_and_mode():
    assert set(plots.PHASE) == {"prefill", "last prefill", "decode", "padding"}
    assert set(plots.MODE) == {"FULL", "PIECEWISE", "NONE"}
    colours = [c.upper() for c in [*plots.PHASE.values(), *plots.MODE.values(), plots.BOUNDARY]]
    assert len(set(colours)) == len(colours)
    assert set(plots.PHASE_OF.values()) <= set(plots.PHASE)


def test_step_composition_stacks_requests_by_phase_and_marks_padding_mode_and_budget():
    per_request, per_step = _steps()
    fig = plots.step_composition(per_request, per_step, budget=BUDGET)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if p.get_width() == pytest.approx(0.7)]
    heights = {}
    for p in bars:
        heights.setdefault(round(p.get_x() + 0.35), []).append((p.get_height(), _hex(p.get_facecolor()), p.get_hatch()))
    assert (8192, plots.PHASE["last prefill"].upper(), None) in heights[0]
    assert (20, plots.PHASE["prefill"].upper(), None) in heights[1]
    assert (1, plots.PHASE["decode"].upper(), None) in heights[1]
    assert (3, plots.PHASE["padding"].upper(), "///") in heights[1], "21 tokens padded to 24"
    assert 3 not in heights, "a step without a forward pass draws nothing"
    ticks = {_hex(ln.get_color()) for ln in ax.get_lines() if ln.get_linewidth() == 5}
    assert ticks == {plots.MODE[m].upper() for m in ("NONE", "PIECEWISE", "FULL")}
    assert _boundary_lines(ax), "the budget is marked"
    triangles = [c for c in ax.collections if len(c.get_offsets()) and c.get_offsets()[0][1] > BUDGET]
    assert [list(c.get_offsets()[:, 0]) for c in triangles] == [[0]], "only step 0 holds exactly the budget"
    assert ax.get_ylabel() and ax.get_xlabel()
    assert fig.get_size_inches()[0] == plots.WIDTH_IN
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"prefill", "last prefill", "decode", "padding", "step of exactly the budget"} <= legend


def test_small_multiples_share_the_legend_and_label_once():
    per_request, per_step = _steps()

    class T:  # what schedules() reads off a diaglib.predict.schedule.Trace
        def __init__(self):
            self.per_request, self.per_step = per_request, per_step

    fig = plots.schedules({"one": T(), "two": T()}, budget=BUDGET)
    first, second = fig.axes[:2]
    assert first.get_ylabel() and not second.get_ylabel()
    assert len(fig.legends) == 1 and all(_boundary_lines(ax) for ax in (first, second))


def test_dispatch_map_colours_modes_and_marks_capture_size_and_budget():
    df = pd.DataFrame({"num_tokens": [1, 7, 512, 513, 8192], "padding": [0, 1, 0, 0, 0],
                       "cudagraph_mode": ["FULL", "PIECEWISE", "PIECEWISE", "NONE", "NONE"]})
    fig = plots.dispatch_map(df, budget=BUDGET, max_capture=512, compile_ranges=[(1, 51), (52, 8192)])
    ax = fig.axes[-1]
    colours = {_hex(c.get_facecolors()[0]) for c in ax.collections if len(c.get_facecolors())}
    assert colours == {plots.MODE[m].upper() for m in ("FULL", "PIECEWISE", "NONE")}
    assert _boundary_lines(ax)
    assert any("largest capture size 512" in t.get_text() for t in ax.texts)
    assert ax.get_xscale() == "log" and "tokens" in ax.get_xlabel() and "padding" in ax.get_ylabel()
    assert sum("[52, 8,192]" in t.get_text() for t in fig.axes[1].texts) == 1


def test_sweep_map_circles_steps_at_the_budget():
    df = pd.DataFrame({"prompt_len": [8191, 8192, 8193, 8193], "total_tokens": [8191, 8192, 8192, 1],
                       "cudagraph_mode": ["NONE", "NONE", "NONE", "FULL"], "at_budget": [False, True, True, False],
                       "forward": [True, True, True, True]})
    fig = plots.sweep_map(df, budget=BUDGET)
    ax = fig.axes[0]
    hollow = [c for c in ax.collections if len(c.get_offsets()) and len(c.get_facecolors()) == 0]
    assert sorted(x for c in hollow for x in c.get_offsets()[:, 0]) == [8192, 8193]
    assert _boundary_lines(ax)


def test_offset_headroom_draws_int32_limit_and_merges_identical_buffers():
    Ms = [1, 1024, 8192, 65536]
    rows = [{"M": m, "path": p, "buffer": b, "max_offset": m * k - 1}
            for m in Ms for p, b, k in [("cutlass", "workspace13", 40960), ("triton", "cache3", 40960), ("x", "ids", 8)]]
    fig = plots.offset_headroom(pd.DataFrame(rows), budget=BUDGET)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == len(Ms)]
    assert len(lines) == 2, "identical growth shares one line"
    assert "cutlass.workspace13, triton.cache3" in {ln.get_label() for ln in lines}
    assert any(ln.get_ydata()[0] == plots.INT32_MAX for ln in ax.get_lines() if len(ln.get_ydata()) == 2)


def test_boundary_map_one_row_per_kind_nearest_labelled():
    df = pd.DataFrame([
        {"axis": "step", "tokens": 513, "kind": "cudagraph mode", "distance": 7679},
        {"axis": "step", "tokens": 8193, "kind": "budget", "distance": 1},
        {"axis": "prompt", "tokens": 8193, "kind": "prefill chunk", "distance": 1},
        {"axis": "prompt", "tokens": 16385, "kind": "prefill chunk", "distance": 8193},
        {"axis": "knob", "tokens": 52429, "kind": "int32", "distance": 44237},
    ])
    fig = plots.boundary_map(df, budget=BUDGET)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["int32", "cudagraph mode", "prefill chunk", "budget"]
    labels = sorted(t.get_text() for t in ax.texts if t.get_text()[0].isdigit())
    assert labels == ["513", "52,429", "8,193", "8,193"]
    assert _boundary_lines(ax)


def test_live_figures_compare_and_show_empty_records_plainly():
    steps = pd.DataFrame({"run": ["r"] * 3, "key": ["p8192", "p8192", "p8193"], "predicted_tokens": [8192, 1, 8192],
                          "observed_tokens": [8192, 1, 8191], "tokens_match": [True, True, False],
                          "mode_match": [True, True, True], "observed_mode": ["NONE", "FULL", "NONE"]})
    fig = plots.steps_predicted_observed(steps)
    ax = fig.axes[0]
    crosses = [c for c in ax.collections if _hex(c.get_facecolors()[0]) == plots.FAULT.upper()]
    assert [tuple(o) for c in crosses for o in c.get_offsets()] == [(8192, 8191)]
    assert "2 agree" in ax.get_title() and _boundary_lines(ax)
    empty = plots.steps_predicted_observed(steps.iloc[0:0])
    assert any("no live steps" in t.get_text() for t in empty.axes[0].texts)
    mem = pd.DataFrame({"run": ["r"], "engine_id": ["e"], "item": ["KV cache"], "predicted_gib": [84.4],
                        "observed_gib": [83.1], "error_pct": [1.6]})
    bars = [p for p in plots.memory_predicted_observed(mem).axes[0].patches]
    assert sorted((round(p.get_width(), 1), _hex(p.get_facecolor())) for p in bars) == [
        (83.1, plots.OBSERVED.upper()), (84.4, plots.PREDICTED.upper())]
