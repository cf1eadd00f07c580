"""The one figure style of the suite: colours per phase and graph mode, the boundary marker, units.

Every figure in every notebook draws with these helpers, so a colour means the same thing everywhere:
blue shades are prefill, green is decode, grey hatching is padding; orange, purple and dark grey are
the CUDA-graph modes FULL, PIECEWISE and NONE. The token boundary (max_num_batched_tokens) is a red
dashed line. Figures are sized for a report page (about 900 px wide).
"""
from __future__ import annotations

from contextlib import suppress

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

WIDTH_IN = 9.0
DPI = 100

# Okabe-Ito, readable by colour-blind readers.
PHASE = {
    "prefill": "#0072B2",        # a partial prefill chunk
    "last prefill": "#56B4E9",   # the chunk that completes the prompt
    "decode": "#009E73",
    "padding": "#D9D9D9",
}
MODE = {"FULL": "#E69F00", "PIECEWISE": "#CC79A7", "NONE": "#555555"}
MODE_LABEL = {"FULL": "FULL graph replay", "PIECEWISE": "PIECEWISE graph replay",
              "NONE": "no graph (compiled, run eagerly)"}
PREDICTED, OBSERVED = "#0072B2", "#000000"
BOUNDARY = "#D62728"
SERIES = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#555555"]

_RC = {
    "figure.dpi": DPI, "savefig.dpi": DPI, "figure.figsize": (WIDTH_IN, 3.6),
    "figure.constrained_layout.use": True,
    "font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold", "axes.labelsize": 10,
    "legend.fontsize": 9, "legend.frameon": False,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "axes.prop_cycle": mpl.cycler(color=SERIES), "axes.formatter.use_mathtext": False,
}


def apply() -> None:
    """Use the suite's style for every later figure and table (notebooks call this once)."""
    import pandas as pd

    mpl.rcParams.update(_RC)
    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.max_rows", 200)
    with suppress(ImportError):  # in a kernel: crisp inline PNGs, no bbox cropping surprises
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")


def figure(nrows: int = 1, ncols: int = 1, *, height: float = 3.6, **kw):
    """A report-width figure in the suite's style: (fig, ax or axes)."""
    apply()
    return plt.subplots(nrows, ncols, figsize=(WIDTH_IN, height), **kw)


def tokens_axis(ax, axis: str = "x", label: str = "tokens in the step") -> None:
    """Label a token-count axis, with thousands separators."""
    fmt = mpl.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(fmt)
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label)


def mark_boundary(ax, at: float = 8192, *, axis: str = "x", label: str | None = None) -> None:
    """The token boundary as a red dashed line, labelled (default: max_num_batched_tokens = AT)."""
    text = label if label is not None else f"max_num_batched_tokens = {at:,.0f}"
    if axis == "x":
        ax.axvline(at, color=BOUNDARY, ls="--", lw=1.4, zorder=5)
        ax.annotate(text, (at, 1), xycoords=("data", "axes fraction"), xytext=(-4, -4),
                    textcoords="offset points", ha="right", va="top", color=BOUNDARY, fontsize=9)
    else:
        ax.axhline(at, color=BOUNDARY, ls="--", lw=1.4, zorder=5)
        ax.annotate(text, (0, at), xycoords=("axes fraction", "data"), xytext=(4, 3),
                    textcoords="offset points", ha="left", va="bottom", color=BOUNDARY, fontsize=9)


LABEL_CHARS = 32  # longest category label drawn on an axis; longer ones are shortened in the middle
ROW_IN, MAX_ROWS = 0.32, 40  # height of one category row; the most rows one figure draws


def short_labels(labels, width: int = LABEL_CHARS) -> list[str]:
    """Axis labels of at most ``width`` characters (the middle of a long one replaced by an ellipsis),
    still telling every label apart."""
    out = []
    for text in map(str, labels):
        if len(text) > width:
            keep = width - 1
            text = text[: (keep + 1) // 2] + "…" + text[len(text) - keep // 2:]
        out.append(text)
    counts: dict[str, int] = {}
    for text in out:
        counts[text] = counts.get(text, 0) + 1
    for i, text in enumerate(out):
        if counts[text] > 1:  # shortened alike: number them by position
            tag = f"…#{i + 1}"
            out[i] = text[: width - len(tag)] + tag
    return out


def rows_height(n: int, *, base: float = 1.2) -> float:
    """A figure height for ``n`` category rows (``MAX_ROWS`` at most are drawn)."""
    return base + ROW_IN * min(max(n, 1), MAX_ROWS)


def legend_handles(palette: dict[str, str], keys=None, labels: dict[str, str] | None = None) -> list[Patch]:
    """Legend patches for some keys of PHASE or MODE (padding drawn hatched, as in the bars)."""
    labels = labels or {}
    return [Patch(facecolor=palette[k], edgecolor="#888888" if k == "padding" else palette[k],
                  hatch="///" if k == "padding" else None, label=labels.get(k, k))
            for k in (keys if keys is not None else palette)]


def bar_style(phase: str) -> dict:
    """Keyword arguments for a bar segment of a phase (padding: light grey, hatched)."""
    if phase == "padding":
        return {"color": PHASE["padding"], "edgecolor": "#888888", "hatch": "///", "linewidth": 0.5}
    return {"color": PHASE[phase], "edgecolor": "white", "linewidth": 0.5}


def mode_spans(ax, df, *, x: str = "num_tokens", y0: float = 0.0, y1: float = 1.0) -> None:
    """Colour the x ranges of ``df`` (sorted by ``x``) by their ``cudagraph_mode``, as a strip."""
    df = df.sort_values(x)
    xs, modes = df[x].to_list(), df["cudagraph_mode"].to_list()
    start = 0
    for i in range(1, len(xs) + 1):
        if i == len(xs) or modes[i] != modes[start]:
            right = xs[i] - 0.5 if i < len(xs) else xs[-1] + 0.5
            ax.axvspan(xs[start] - 0.5, right, ymin=y0, ymax=y1, color=MODE.get(modes[start], "#BBBBBB"), lw=0)
            start = i


def dispatch_map(df, *, budget: int, max_capture: int | None, compile_ranges=()):
    """How vLLM runs a step of N tokens: graph mode, compile range and padding (log2 token axis)."""
    fig, (modes, ranges, ax) = figure(3, 1, height=4.4, sharex=True, gridspec_kw={"height_ratios": [0.5, 0.5, 4]})
    mode_spans(modes, df)
    for i, (a, b) in enumerate(compile_ranges):
        ranges.axvspan(a - 0.5, b + 0.5, color=("#E8E8E8", "#C8C8C8")[i % 2], lw=0)
        ranges.annotate(f"[{a:,}, {b:,}]", (max(a, 1) * 1.08, 0.5), xycoords=("data", "axes fraction"),
                        va="center", fontsize=8)
    for strip, label in ((modes, "graph mode"), (ranges, "compile range")):
        strip.set_yticks([0.5], [label])
        strip.tick_params(axis="y", length=0)
        strip.grid(False)
        mark_boundary(strip, budget, label="")
    modes.set_title(f"How vLLM runs a step of N tokens (one request; budget {budget:,} tokens)")
    for mode, part in df.groupby("cudagraph_mode"):
        ax.vlines(part["num_tokens"], 0, part["padding"], color=MODE.get(mode, "#BBBBBB"), lw=0.8)
        ax.scatter(part["num_tokens"], part["padding"], s=5, color=MODE.get(mode, "#BBBBBB"))
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.8, budget * 1.3)
    ax.set_ylim(bottom=-0.5)
    ax.set_ylabel("padding (tokens added)")
    tokens_axis(ax, label="tokens in the step (log2 scale)")
    if max_capture:
        ax.axvline(max_capture + 0.5, color=MODE["PIECEWISE"], ls=":", lw=1.2)
        ax.annotate(f"largest capture size {max_capture:,}", (max_capture * 1.08, 0.6), xycoords=("data", "axes fraction"),
                    ha="left", va="top", fontsize=9, color=MODE["PIECEWISE"])
    mark_boundary(ax, budget, label=f"max_num_batched_tokens\n= {budget:,}")
    present = [m for m in MODE if m in set(df["cudagraph_mode"])]
    fig.legend(handles=legend_handles(MODE, present, MODE_LABEL), loc="outside lower center", ncol=len(present))
    return fig


INT32_MAX = 2**31 - 1


def offset_headroom(curves, *, budget: int):
    """Largest element offset of each buffer against M (log-log), with 2^31 - 1 and the budget marked.

    ``curves``: columns M, path, buffer, max_offset. Buffers growing identically share one line.
    """
    fig, ax = figure(height=4.0)
    wide = curves.pivot_table(index="M", columns=["path", "buffer"], values="max_offset")
    groups: dict[tuple, list[str]] = {}
    for (path, buf), col in wide.items():
        groups.setdefault(tuple(col.round(0)), []).append(f"{path}.{buf}")
    ranked = sorted(groups.items(), key=lambda kv: -kv[0][-1])
    for i, (values, names) in enumerate(ranked[:6]):
        label = ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
        ax.plot(wide.index, values, color=SERIES[i % len(SERIES)], lw=1.6, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.axhline(INT32_MAX, color="black", lw=1.2)
    ax.annotate("INT32_MAX = 2^31 - 1", (0, INT32_MAX), xycoords=("axes fraction", "data"), xytext=(4, 3),
                textcoords="offset points", fontsize=9)
    tokens_axis(ax, label="tokens M in one MoE call (log2 scale)")
    ax.set_ylabel("largest element offset (log2 scale)")
    ax.set_title("Index headroom of every MoE buffer against M")
    mark_boundary(ax, budget)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    return fig


PHASE_OF = {"prefill-chunk": "prefill", "last-prefill-chunk": "last prefill", "decode": "decode"}


def step_composition(per_request, per_step, *, budget: int, ax=None, title: str | None = None, labels: bool = True):
    """Tokens per engine step, stacked by request (labelled) and coloured by phase; padding hatched on top;
    each step's CUDA-graph mode as a coloured tick under its bar; the budget as a red dashed line, and a red
    triangle over every step that holds exactly the budget. ``labels=False``: no axis or boundary labels
    (for small multiples)."""
    fig = None
    if ax is None:
        fig, ax = figure(height=3.8)
    steps = per_step[per_step["forward"]].set_index("step")
    base = {s: 0 for s in steps.index}
    for r in per_request.itertuples():
        if r.step not in base:
            continue
        ax.bar(r.step, r.tokens, bottom=base[r.step], width=0.7, **bar_style(PHASE_OF[r.phase]))
        if labels and r.tokens >= 0.12 * budget:
            ax.text(r.step, base[r.step] + r.tokens / 2, f"{r.req_id}\n{r.tokens:,}", ha="center", va="center",
                    fontsize=8, color="black" if PHASE_OF[r.phase] == "last prefill" else "white")
        base[r.step] += r.tokens
    for s, row in steps.iterrows():
        if row["total_tokens"] < 0.12 * budget:
            ax.annotate(f"{row['total_tokens']:,}", (s, row["padded_tokens"]), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
        pad = row["padded_tokens"] - row["total_tokens"]
        if pad > 0:
            ax.bar(s, pad, bottom=row["total_tokens"], width=0.7, **bar_style("padding"))
        ax.plot([s - 0.35, s + 0.35], [-0.04 * budget] * 2, color=MODE.get(row["cudagraph_mode"], "#BBBBBB"),
                lw=5, solid_capstyle="butt", clip_on=False)
    full = steps[steps["at_budget"]]
    ax.scatter(full.index, [budget * 1.06] * len(full), marker="v", s=40, color=BOUNDARY, zorder=6)
    ax.set_xticks(list(steps.index))
    ax.set_xlim(min(steps.index) - 0.6, max(steps.index) + 0.6)
    tokens_axis(ax, "y", "tokens scheduled in the step" if labels else "")
    ax.set_xlabel("engine step (coloured tick: CUDA-graph mode)" if labels else "engine step")
    ax.set_ylim(-0.07 * budget, budget * 1.12)
    mark_boundary(ax, budget, axis="y", label="")
    if title:
        ax.set_title(title)
    if fig is not None:
        step_legend(fig, per_request, steps, budget)
    return fig if fig is not None else ax


def step_legend(fig, per_request, per_step, budget: int) -> None:
    """The legend of step_composition: phases present, padding if any, graph modes present, the budget."""
    phases = [p for p in PHASE if p != "padding" and p in {PHASE_OF[x] for x in per_request["phase"]}]
    if (per_step["padded_tokens"] > per_step["total_tokens"]).any():
        phases.append("padding")
    modes = [m for m in MODE if m in set(per_step["cudagraph_mode"].dropna())]
    handles = legend_handles(PHASE, phases) + legend_handles(MODE, modes, MODE_LABEL)
    handles.append(mpl.lines.Line2D([], [], color=BOUNDARY, ls="--", label=f"max_num_batched_tokens = {budget:,}"))
    if per_step["at_budget"].any():
        handles.append(mpl.lines.Line2D([], [], marker="v", color=BOUNDARY, ls="", label="step of exactly the budget"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4))


def schedules(traces: dict, *, budget: int):
    """step_composition for several workloads side by side (a dict title -> diaglib.predict.schedule.Trace)."""
    import pandas as pd

    fig, axes = figure(1, len(traces), height=3.8, sharey=True, squeeze=False)
    for ax, (title, tr) in zip(axes[0], traces.items()):
        step_composition(tr.per_request, tr.per_step, budget=budget, ax=ax, title=title, labels=False)
    tokens_axis(axes[0][0], "y", "tokens scheduled in the step")

    step_legend(fig, pd.concat([t.per_request for t in traces.values()]),
                pd.concat([t.per_step[t.per_step["forward"]] for t in traces.values()]), budget)
    return fig


def sweep_map(df, *, budget: int, x: str = "prompt_len", title: str | None = None):
    """Every forward step of a sweep: tokens in the step against the swept value, coloured by graph mode;
    open markers for steps that hit the budget exactly."""
    fig, ax = figure(height=3.8)
    fwd = df[df["forward"]]
    for mode, part in fwd.groupby("cudagraph_mode"):
        full = part[part["at_budget"]]
        rest = part[~part["at_budget"]]
        ax.scatter(rest[x], rest["total_tokens"], s=16, color=MODE.get(mode, "#BBBBBB"), label=MODE_LABEL.get(mode, mode))
        ax.scatter(full[x], full["total_tokens"], s=40, facecolors="none", edgecolors=MODE.get(mode, "#BBBBBB"), lw=1.4)
    ax.set_yscale("symlog", linthresh=64)
    tokens_axis(ax, "y", "tokens in the step (symlog)")
    tokens_axis(ax, "x", {"prompt_len": "prompt length"}.get(x, x.replace("_", " ")) + " (tokens)")
    mark_boundary(ax, budget, axis="y")
    if fwd[x].min() <= budget <= fwd[x].max():
        mark_boundary(ax, budget, label="")
    ax.set_title(title or "Steps of each swept prompt (open circle: the step holds exactly the budget)")
    fig.legend(loc="outside lower center", ncol=3)
    return fig


AXIS_MARKER = {"step": "o", "prompt": "s", "knob": "D"}
AXIS_LABEL = {"step": "tokens in one step", "prompt": "prompt length", "knob": "tokens per step past the budget"}


def boundary_map(df, *, budget: int):
    """Every boundary of diaglib.predict.boundaries on one log2 token axis, one row per kind (marker: which axis);
    each kind's boundary nearest to the budget is labelled with its token count."""
    kinds = list(dict.fromkeys(df.sort_values("distance")["kind"]))
    dropped = kinds[MAX_ROWS:]
    kinds = kinds[:MAX_ROWS]
    df = df[df["kind"].isin(kinds)]
    fig, ax = figure(height=rows_height(len(kinds), base=0.9))
    y = {k: i for i, k in enumerate(reversed(kinds))}
    for axis, part in df.groupby("axis"):
        ax.scatter(part["tokens"], part["kind"].map(y), marker=AXIS_MARKER.get(axis, "o"), s=26, color="#333333",
                   facecolors="none" if axis == "prompt" else "#333333", label=AXIS_LABEL.get(axis, axis), zorder=4)
    for r in df.sort_values("distance").drop_duplicates("kind").itertuples():
        ax.annotate(f"{r.tokens:,}", (r.tokens, y[r.kind]), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.set_yticks(list(y.values()), short_labels(y.keys()))
    ax.set_ylim(-0.7, len(kinds) - 0.3)
    ax.set_xscale("log", base=2)
    tokens_axis(ax, label="token count where behaviour changes (first count on the new side, log2 scale)")
    ax.set_title("Boundary map: where vLLM's behaviour changes"
                 + (f" (the {len(kinds)} kinds nearest the budget; {len(dropped)} more in the table)" if dropped else ""))
    mark_boundary(ax, budget)
    fig.legend(loc="outside lower center", ncol=3)
    return fig


MEMORY = {"weights": "#332288", "activation peak (profile run)": "#AA4499", "non-torch (NCCL, cuBLAS, context)": "#DDCC77",
          "KV cache": "#117733", "CUDA-graph pool": "#CC6677", "free after start-up": "#FFFFFF"}
KIND_HATCH = {"exact": None, "vLLM": None, "estimate": "//", "guess": "xx", "observed": None}


def memory_budget(budget, observed: dict[str, float] | None = None, *, title: str = "Per-GPU memory"):
    """The per-GPU budget as one stacked bar (GiB), estimates hatched, usable memory marked; with
    ``observed`` (item -> GiB, e.g. what vLLM logged in a live run) a second bar below for comparison."""
    rows = budget.set_index("item")
    items = [i for i in MEMORY if i in rows.index]
    bars = [("predicted", {i: (rows.loc[i, "GiB"], rows.loc[i, "kind"]) for i in items})]
    if observed:
        bars.append(("observed", {i: (observed[i], "observed") for i in items if i in observed}))
    fig, ax = figure(height=1.6 + 0.7 * len(bars))
    for y, (_, parts) in enumerate(reversed(bars)):
        left = 0.0
        for item in items:
            if item not in parts:
                continue
            gib, kind = parts[item]
            ax.barh(y, gib, left=left, height=0.6, color=MEMORY[item], edgecolor="#555555", lw=0.6,
                    hatch=KIND_HATCH.get(kind))
            if gib >= 4:
                ax.text(left + gib / 2, y, f"{gib:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if item in ("non-torch (NCCL, cuBLAS, context)", "free after start-up") else "white")
            left += gib
    ax.set_yticks(range(len(bars)), [b[0] for b in reversed(bars)])
    total = rows.loc["GPU memory", "GiB"]
    usable = rows.loc["usable (x gpu_memory_utilization)", "GiB"]
    ax.axvline(total, color="black", lw=1)
    ax.axvline(usable, color="black", ls=":", lw=1.2)
    ax.annotate(f"usable: {usable:.1f} GiB", (usable, 1), xycoords=("data", "axes fraction"), xytext=(-4, 2),
                textcoords="offset points", ha="right", va="bottom", fontsize=9)
    ax.set_xlim(0, total * 1.01)
    ax.set_xlabel(f"GiB per GPU (total {total:.1f} GiB)")
    ax.grid(axis="y", visible=False)
    ax.set_title(title, loc="left")
    handles = legend_handles(MEMORY, items)
    for h in handles:
        h.set_edgecolor("#555555")
    handles += [Patch(facecolor="white", edgecolor="#555555", hatch="//", label="estimate"),
                Patch(facecolor="white", edgecolor="#555555", hatch="xx", label="guess")]
    fig.legend(handles=handles, loc="outside lower center", ncol=4)
    return fig


FAULT = "#D55E00"


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def steps_predicted_observed(steps, *, budget: int = 8192):
    """Every forward step of the live probes: predicted tokens (diaglib.predict.schedule) against observed (inside
    vLLM), coloured by the observed graph mode; a cross marks a step whose tokens or mode disagree."""
    fig, ax = figure(height=1.2 if steps.empty else 4.0)
    if steps.empty:
        _empty(ax, "no live steps recorded for this comparison")
        return fig
    agree = steps["tokens_match"] & steps["mode_match"]
    for mode, part in steps[agree].groupby("observed_mode"):
        ax.scatter(part["predicted_tokens"], part["observed_tokens"], s=30, color=MODE.get(mode, "#BBBBBB"),
                   label=f"observed {MODE_LABEL.get(mode, mode)}", zorder=4)
    bad = steps[~agree]
    if not bad.empty:
        ax.scatter(bad["predicted_tokens"], bad["observed_tokens"], s=60, marker="x", color=FAULT, lw=2,
                   label="tokens or graph mode differ", zorder=5)
    top = max(steps["predicted_tokens"].max(), steps["observed_tokens"].max(), budget) * 1.5
    ax.plot([0.8, top], [0.8, top], color="#999999", lw=1, ls="-", zorder=1, label="observed = predicted")
    for a in ("x", "y"):
        getattr(ax, f"set_{a}scale")("log", base=2)
    ax.set_xlim(0.8, top)
    ax.set_ylim(0.8, top)
    tokens_axis(ax, "x", "predicted tokens in the step (vLLM's scheduler on the CPU, log2)")
    tokens_axis(ax, "y", "observed tokens (inside vLLM on the GPU, log2)")
    mark_boundary(ax, budget)
    ax.set_title(f"{len(steps)} forward steps of {steps.groupby(['run', 'key']).ngroups} live probes: "
                 f"{int(agree.sum())} agree on tokens, graph mode and padding")
    fig.legend(loc="outside lower center", ncol=3)
    return fig


def probe_outcomes(probes, *, max_notes: int = 12):
    """Each live probe by its total prompt tokens and run: circles ran clean, crosses faulted. Long run names are
    shortened (the table beside the figure has them in full); past MAX_ROWS runs, those with faults and the
    latest are drawn; at most ``max_notes`` faults are labelled."""
    runs = list(dict.fromkeys(probes["run"])) if not probes.empty else []
    if len(runs) > MAX_ROWS:
        faulted = list(dict.fromkeys(probes.loc[probes["outcome"] != "ok", "run"]))[:MAX_ROWS]
        keep = set(faulted) | set(runs[-(MAX_ROWS - len(faulted)):] if len(faulted) < MAX_ROWS else [])
        shown = [r for r in runs if r in keep]
    else:
        shown = runs
    fig, ax = figure(height=rows_height(len(shown)))
    if probes.empty:
        _empty(ax, "no live probes recorded")
        return fig
    part = probes[probes["run"].isin(shown)]
    y = {r: i for i, r in enumerate(reversed(shown))}
    x = part["total_tokens"].where(part["total_tokens"] > 0, part["key"].str.extract(r"m(\d+)")[0].astype(float))
    ok = part["outcome"] == "ok"
    ax.scatter(x[ok], part.loc[ok, "run"].map(y), s=28, facecolors="none", edgecolors="black", label="ran clean")
    ax.scatter(x[~ok], part.loc[~ok, "run"].map(y), s=70, marker="X", color=FAULT, label="faulted", zorder=5)
    faults = part.index[~ok]
    for i in faults[:max_notes]:
        ax.annotate(short_labels([f"{part.at[i, 'key']}: {part.at[i, 'outcome']}"], 40)[0], (x[i], y[part.at[i, "run"]]),
                    xytext=(6, 6), textcoords="offset points", fontsize=8, color=FAULT)
    ax.set_yticks(list(y.values()), short_labels(y.keys()))
    ax.set_ylim(-0.7, len(shown) - 0.3)
    tokens_axis(ax, label="prompt tokens in the probe (planted faults: the M they fire at)")
    mark_boundary(ax, 8192, label="8,192")
    notes = [f"{len(runs) - len(shown)} of {len(runs)} runs not drawn"] if len(shown) < len(runs) else []
    notes += [f"{len(faults) - max_notes} more faults not labelled"] if len(faults) > max_notes else []
    ax.set_title("Live probes and their outcome" + (f" ({'; '.join(notes)})" if notes else ""))
    fig.legend(loc="outside lower center", ncol=2)
    return fig


def memory_predicted_observed(mem):
    """Predicted against observed GiB per memory item (diaglib.live.compare.memory), one engine start."""
    fig, ax = figure(height=1.2 + 0.55 * len(mem))
    if mem.empty:
        _empty(ax, "no live engine start recorded")
        return fig
    ys = range(len(mem))[::-1]
    ax.barh([y + 0.18 for y in ys], mem["predicted_gib"], height=0.34, color=PREDICTED, label="predicted")
    ax.barh([y - 0.18 for y in ys], mem["observed_gib"].fillna(0), height=0.34, color=OBSERVED, label="observed (vLLM's log)")
    for y, r in zip(ys, mem.itertuples()):
        if r.observed_gib is not None and r.error_pct == r.error_pct and r.error_pct is not None:
            ax.annotate(f"{r.error_pct:+.1f}%", (max(r.predicted_gib, r.observed_gib), y), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(list(ys), short_labels(mem["item"], 40))
    ax.set_xlabel("GiB per GPU")
    ax.grid(axis="y", visible=False)
    ax.set_title(f"Memory, predicted against observed: run {mem['run'].iloc[0]}, engine {mem['engine_id'].iloc[0]}",
                 loc="left")
    fig.legend(loc="outside lower center", ncol=2)
    return fig


def live_heatmap(grid, *, title: str | None = None):
    """A live sweep's outcomes (diaglib.live.livesweep.heatmap_frame): knob setting (rows) x prompt tokens
    (columns), one cell per probe coloured by outcome (livesweep.OUTCOME_COLORS), grey where still pending.
    Built outside pyplot, so the live panel can draw it from its worker thread."""
    import numpy as np
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    from ..live.livesweep import OUTCOME_COLORS

    other = "#BBBBBB"  # an outcome without a colour of its own
    with mpl.rc_context(_RC):
        fig = Figure(figsize=(WIDTH_IN, 1.5 + 0.32 * len(grid.index)))
        ax = fig.subplots()
        ax.set_title(title or "Live sweep: outcome of each probe", loc="left")
        if grid.empty:
            _empty(ax, "no settings or token counts to show")
            return fig
        ax.imshow(np.array([[to_rgba(OUTCOME_COLORS.get(o, other)) for o in row] for row in grid.to_numpy()]),
                  aspect="auto", interpolation="nearest")
        cols, rows = list(grid.columns), list(grid.index)
        step = -(-len(cols) // 24)  # at most 24 column labels
        ax.set_xticks(range(0, len(cols), step), [f"{int(c):,}" for c in cols[::step]],
                      rotation=90 if len(cols) > 12 else 0)
        ax.set_yticks(range(len(rows)), short_labels(rows))
        ax.set_xticks(np.arange(len(cols) + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(len(rows) + 1) - 0.5, minor=True)
        ax.grid(False)
        ax.grid(which="minor", color="white", lw=1.5)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel("prompt tokens (one probe each)")
        present = [o for o in OUTCOME_COLORS if (grid == o).any().any()]
        present += sorted({str(o) for o in grid.to_numpy().ravel()} - set(OUTCOME_COLORS))
        fig.legend(handles=[Patch(facecolor=OUTCOME_COLORS.get(o, other), label=o.replace("_", " ")) for o in present],
                   loc="outside lower center", ncol=min(len(present), 5))
    return fig


def release_grid(features, *, title: str = "What the seed's command gets, release by release"):
    """A feature x release grid (present.versions.release_features): equal colours in a row are equal answers; a
    colour change is where an upgrade changed it. Each value is written once, where it first appears."""
    import numpy as np

    rows, cols = list(features.index), list(features.columns)
    fig, ax = figure(height=0.55 * len(rows) + 1.6)
    codes = np.full((len(rows), len(cols)), np.nan)
    for i, f in enumerate(rows):
        seen: dict = {}
        for j, v in enumerate(cols):
            val = features.loc[f, v]
            if val is None or val != val:
                continue
            codes[i, j] = seen.setdefault(val, len(seen)) % len(SERIES)
            if j == 0 or features.loc[f, cols[j - 1]] != val:
                ax.text(j - 0.45, i, _short(str(val)), va="center", ha="left", fontsize=7, clip_on=True)
    cmap = mpl.colors.ListedColormap([mpl.colors.to_rgba(c, 0.35) for c in SERIES])
    ax.imshow(codes, aspect="auto", cmap=cmap, vmin=0, vmax=len(SERIES) - 1, interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.grid(False)
    ax.set_title(title)
    return fig


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def census_headroom(th, *, budget: int, top: int = 8, horizon: int = 1 << 24):
    """Every op's headroom against N (log-log): the largest index of each op tensor (from the census's affine fits)
    over tokens per step, with 2^31 - 1 and the budget marked; the ops that cross first are drawn in colour and
    labelled, the rest in grey. ``th``: census.thresholds rows (slope, const, tokens, op, role, formula)."""
    import numpy as np

    fig, ax = figure(height=4.4)
    rows = th[~th["role"].str.startswith("grid.") & (th["slope"] > 0)]
    ns = np.logspace(np.log2(max(budget // 64, 1)), np.log2(horizon), 200, base=2)
    ranked = rows.assign(t=rows["tokens"].astype(float).fillna(np.inf)).sort_values(["t", "slope"],
                                                                                    ascending=[True, False])
    firsts = ranked.drop_duplicates(["slope", "const"]).head(top)
    for r in ranked.drop_duplicates(["slope", "const"]).itertuples():
        if r.Index in firsts.index:
            continue
        ax.plot(ns, r.const + r.slope * ns, color="#BBBBBB", lw=0.7, zorder=1)
    for i, r in enumerate(firsts.itertuples()):
        label = f"{_short(r.op.split('::')[-1], 24)} {r.role} [{r.formula}]" + \
            (f": {int(r.tokens):,}" if r.tokens == r.tokens and r.tokens is not None else "")
        ax.plot(ns, r.const + r.slope * ns, color=SERIES[i % len(SERIES)], lw=1.8, label=label, zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.axhline(INT32_MAX, color="black", lw=1.2)
    ax.annotate("INT32_MAX = 2^31 - 1", (0, INT32_MAX), xycoords=("axes fraction", "data"), xytext=(4, 3),
                textcoords="offset points", fontsize=9)
    tokens_axis(ax, label="tokens N in one step (log2 scale)")
    ax.set_ylabel("largest index into the tensor (log2 scale)")
    ax.set_title("Headroom of every op of the forward against N (kernel census)")
    mark_boundary(ax, budget)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    return fig


def census_nearest(ops, *, top: int = 12, title: str = "Ops nearest the int32 limit at the operating point"):
    """Horizontal bars: the per-step tensors of the ops nearest 2^31 - 1 (fraction of the limit), coloured by who
    runs them (Inductor, a custom kernel, eager torch). ``ops``: census.ops rows (module, op, largest, frac_int32,
    runs_as)."""
    import re

    df = ops[~ops["runs_as"].isin(["no kernel", "host"])].copy()
    folded = [re.sub(r"\blayers\.\d+\.", "layers.*.", m + ".").rstrip(".") if m else p
              for m, p in zip(df["module"], df["phase"])]
    df["label"] = [f"{_short(m, 34)} {o.split('::')[-1]} {r}" for m, o, r in zip(folded, df["op"], df["largest"])]
    df = df.sort_values("frac_int32", ascending=False).drop_duplicates("label").head(top).iloc[::-1]
    fig, ax = figure(height=0.9 + 0.28 * max(len(df), 1))
    kinds = list(dict.fromkeys(df["runs_as"].map(lambda r: r.split(" (")[0])))
    colour = {k: SERIES[i % len(SERIES)] for i, k in enumerate(kinds)}
    ax.barh(df["label"], df["frac_int32"], color=[colour[r.split(" (")[0]] for r in df["runs_as"]])
    ax.axvline(1.0, color="black", lw=1.2)
    ax.set_xlabel("largest index / (2^31 - 1)")
    ax.set_title(title)
    fig.legend(handles=[Patch(color=c, label=k) for k, c in colour.items()], loc="outside lower center",
               ncol=min(len(colour), 4))
    return fig
