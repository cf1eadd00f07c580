"""The triage of a crash as one self-contained HTML page, safe to attach to a public issue.

Built from :func:`diaglib.triage.diagnose.as_dict` (already redacted: tokens, keys, host names, home folders);
every string is HTML-escaped here, styles are inline, nothing is fetched and no script runs.
"""
from __future__ import annotations

import html
import json
import time

from ..secrets import redact

_CSS = """
body { font: 14px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
code, pre { font: 12.5px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f5f5f5; }
pre { padding: 8px; overflow-x: auto; white-space: pre; } code { padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; width: 100%; } td, th { text-align: left; vertical-align: top; padding: 4px 8px;
  border-bottom: 1px solid #eee; } th { background: #fafafa; }
.fits { color: #b42318; font-weight: 600; } .possible { color: #b54708; font-weight: 600; }
.ruled { color: #667085; } .advice { color: #175cd3; } .for { color: #067647; } .against { color: #667085; }
.verdict { font-size: 16px; padding: 8px 12px; background: #fef3f2; border-left: 4px solid #b42318; }
.none { background: #f2f4f7; border-left-color: #667085; } dt { font-weight: 600; } dd { margin: 0 0 .5em 0; }
"""


_FIGURE = "<!--diaglib-figure-->"


def _e(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _dl(rows) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows if v not in (None, "")) + "</dl>"


def _ul(items, cls: str = "") -> str:
    items = [i for i in items if i]
    if not items:
        return ""
    c = f' class="{cls}"' if cls else ""
    return f"<ul{c}>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def _crash(c: dict | None) -> str:
    if not c:
        return "<p>No traceback or CUDA error in the log.</p>"
    first = (c.get("message") or "").splitlines()[:1]
    rows = [("error", f"<code>{_e(c['outcome'])}</code>: {_e((c.get('exc_type') or '') + ': ' + (first[0] if first else ''))}"),
            ("process", _e(c.get("stream") or "the main process") + f" (log line {_e(c.get('line'))})"),
            ("during", _e(c.get("during"))),
            ("surfaced at", f"<code>{_e(c.get('surfaced_at'))}</code>: {_e(c.get('surfaced_kind'))} "
                            f"({_e(c.get('surfaced_why'))})"),
            ("kernel", f"<code>{_e(c['kernel'])}</code> ({_e(c.get('kernel_kind'))}; from {_e(c.get('kernel_from'))})"
             if c.get("kernel") else "not named"),
            ("CUDA error", _e(c.get("cuda_error"))),
            ("reported by", _e(", ".join(c.get("reported_by") or [])))]
    tb = f"<details><summary>traceback</summary><pre>{_e(c.get('traceback'))}</pre></details>" if c.get("traceback") else ""
    return _dl(rows) + tb


def _step(data: dict) -> str:
    s = data.get("step")
    parts = []
    if s:
        parts.append(f"<p><b>{_e(data.get('step_described'))}</b> ({_e(s['source'])})<br>"
                     f"schedule <code>{_e(s['schedule'])}</code></p>")
    if data.get("candidates"):
        rows = "".join(f"<tr><td>{_e(c['described'])}</td><td><code>{_e(c['schedule'])}</code></td>"
                       f"<td>{_e(c['source'])}</td></tr>" for c in data["candidates"][:20])
        parts.append("<p>No input dump in the log: the steps the logged workload makes in vLLM's scheduler.</p>"
                     f"<table><tr><th>step</th><th>schedule</th><th>from</th></tr>{rows}</table>")
    return "".join(parts) or "<p>The step that crashed is unknown (no input dump, no workload in the log).</p>"


def _replay(r: dict) -> str:
    d = r.get("dispatch")
    if d is None:
        return _ul(r.get("notes") or [])
    rng = d.get("compile_range")
    rows = [("step", _e(r.get("describe"))),
            ("padded", f"{_e(d['padded_tokens'])} (+{_e(d['padding'])})"),
            ("CUDA graph", f"{_e(d['cudagraph_mode'])} (graph mode {_e(d['cudagraph_mode_config'])})"),
            ("compiled", f"{_e(d['compile_kind'])} {_e(tuple(rng) if isinstance(rng, list) else rng)}"),
            ("derived", _e(d.get("derived")))]
    m = r.get("moe")
    if m:
        lb = m["largest_buffer"]
        rows += [("MoE", f"{_e(m.get('backend'))} ({_e(m['selected_experts'])}, {_e(m['selected_path'])} path), "
                         f"{_e(m['num_chunks'])} activation chunk(s)"),
                 ("Triton MoE config", _e(m["triton_config"]["source"])),
                 ("largest MoE buffer", f"{_e(lb['path'])}.{_e(lb['buffer'])} {_e(tuple(lb['shape']))}: "
                                        f"{lb['frac_2_31']:.3f} x 2^31")]
    cen = r.get("census") or {}
    rows.append(("kernel census", _e(cen.get("summary") or f"not available ({cen.get('why', '?')})")))
    edges = "".join(f"<tr><td>{_e(x['axis'])}</td><td>{_e(x['kind'])}</td><td>{_e(x['rule'])}</td></tr>"
                    for x in r.get("edges") or [])
    return _dl(rows) + (f"<table><tr><th>axis</th><th>boundary</th><th>where the step sits</th></tr>{edges}</table>"
                        if edges else "<p>The step sits on no boundary.</p>")


def _suspects(items: list[dict]) -> str:
    cls = {"fits": "fits", "possible": "possible", "ruled out": "ruled", "does not apply": "ruled",
           "advice": "advice", "no evidence": "ruled"}
    rows = []
    for i, s in enumerate(items, 1):
        ev = _ul(["+ " + e for e in s["evidence_for"]], "for") + _ul(["- " + e for e in s["evidence_against"]], "against")
        links = " ".join(f'<a href="{_e(u)}">{_e(u.rsplit("/", 3)[-3] + "#" + u.rsplit("/", 1)[-1])}</a>'
                         for u in s.get("links") or [] if u.startswith("https://github.com/"))
        rows.append(f"<tr><td>{i}</td><td class=\"{cls.get(s['verdict'], '')}\">{_e(s['verdict'])}</td>"
                    f"<td><b>{_e(s['id'])}</b><br>{_e(s['title'])}<br><small>{_e(s.get('formula'))}</small>"
                    f"<br><small>{links}</small></td><td>{ev}</td></tr>")
    return ("<table><tr><th>#</th><th>verdict</th><th>class</th><th>evidence</th></tr>" + "".join(rows) + "</table>")


def page(data: dict) -> str:
    """The page for one triage (``data``: diagnose.as_dict)."""
    rb, ver, log = data["rebuilt"], data["version"], data["log"]
    verdict = data.get("verdict") or ""
    none = " none" if not data.get("explained") else ""
    nxt = "".join(f"<p>{_e(c['what'])}: {_e(c['why'])}</p><pre>{_e(c['command'])}</pre>" for c in data.get("next") or [])
    rebuilt = _dl([("command", f"<code>{_e(rb.get('command'))}</code>"),
                   ("resolved by", _e(f"vLLM {rb['resolved_by']} on {rb['gpu_count']} x {rb['gpu']}")
                    if rb.get("resolved_by") else _e(f"not resolved: {rb.get('error')}")),
                   ("recovered", _ul(rb.get("recovered") or [])), ("assumed", _ul(rb.get("assumed") or [])),
                   ("not recovered", _ul(rb.get("missing") or [])), ("differs from the log", _ul(rb.get("differs") or []))])
    body = "".join([
        f"<h1>diaglib triage: {_e(data.get('source'))}</h1>",
        f'<p class="verdict{none}">{_e(verdict)}</p>',
        _dl([("log", _e(f"{log['lines']:,} lines; found: {', '.join(log['found']) or 'errors only'}")),
             ("processes", _e(", ".join(p for p in log.get("processes") or {} if p) or "no process prefixes")),
             ("vLLM", _e(ver.get("note")))]),
        _FIGURE,
        "<h2>Crash</h2>", _crash(data.get("crash")),
        "<h2>The step that died</h2>", _step(data),
        *[f"<h2>Replay on vLLM {_e(ver.get('installed'))}</h2>" + _replay(r) for r in data.get("replays") or []],
        "<h2>Suspects</h2>", _suspects(data.get("suspects") or []),
        "<h2>Next commands</h2>" + (nxt or "<p>None: the step or the command is unknown.</p>") + "<p>Not run by diaglib.</p>",
        "<h2>Rebuilt scenario</h2>", rebuilt,
        "<h2>Notes</h2>" + _ul(data.get("notes") or []) if data.get("notes") else "",
        f"<details><summary>all facts (JSON)</summary><pre>{_e(json.dumps(data, indent=1, default=str))}</pre></details>",
        f"<p><small>made by diaglib triage, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</small></p>",
    ])
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>diaglib triage: {_e(data.get("source"))}'
           f"</title><style>{_CSS}</style></head><body>{body}</body></html>\n")
    png = figure_png(data)  # after redaction: base64 could look like a key to the redactor
    img = f'<img alt="the step against the token boundaries" src="data:image/png;base64,{png}">' if png else ""
    return redact(doc).replace(_FIGURE, img, 1)


# --- the figure: where the step sits --------------------------------------------------------------

ORDER_OF = {"fits": 0, "possible": 1, "no evidence": 2, "unlikely": 3, "ruled out": 4, "does not apply": 5}
VERDICT_COLOURS = {"unlikely": "#b0b8c4", "fits": "#b42318", "possible": "#e8590c", "no evidence": "#98a2b3", "ruled out": "#d0d5dd",
                   "does not apply": "#eaecf0"}


def figure(data: dict):
    """The step against what changes with the tokens per step: the CUDA-graph range, the compiled ranges, the
    budget (red dashed) and each class's threshold (coloured by verdict). None without a replay."""
    import matplotlib.pyplot as plt

    r = next((x for x in data.get("replays") or [] if x.get("dispatch")), None)
    if r is None:
        return None
    n, budget, comp = r["step"]["tokens"], r["budget"], r["compilation"]
    marks = [(s["threshold_tokens"], s) for s in data.get("suspects") or [] if s.get("threshold_tokens")]
    hi = max([budget, n] + [t for t, _ in marks]) * 2
    fig, ax = plt.subplots(figsize=(10, 3.6), layout="constrained")
    ax.set_xscale("log")
    ax.set_xlim(1, hi)
    top = comp.get("max_cudagraph_capture_size")
    if comp.get("cudagraph_mode") not in (None, "NONE") and top:
        ax.axvspan(1, top, ymin=0.86, ymax=0.97, color="#fd7e14", alpha=0.35, label=f"CUDA graphs (1..{top})")
    for i, (a, b) in enumerate(comp.get("compile_ranges") or []):
        ax.plot([a, b], [0.8 - 0.05 * (i % 2)] * 2, color="#6f42c1", lw=5, solid_capstyle="butt",
                label="compiled ranges" if i == 0 else None)
    ax.axvline(budget, color="red", ls="--", lw=1.5, label=f"max_num_batched_tokens {budget:,}")
    placed: list[float] = []
    for t, s in sorted(marks, key=lambda m: (m[0], ORDER_OF.get(m[1]["verdict"], 9))):
        c = VERDICT_COLOURS.get(s["verdict"], "#98a2b3")
        level = sum(1 for p in placed if t / p < 8)  # labels of nearby thresholds (about a label wide) stack
        placed.append(t)
        ax.axvline(t, ymin=0.02, ymax=0.08 + 0.07 * (level + 1), color=c, lw=2)
        ax.text(t * 1.04, 0.04 + 0.07 * level, f"{s['id']} ({s['verdict']})", fontsize=7, va="bottom",
                color="#344054" if s["verdict"] in ("fits", "possible") else "#667085")
    ax.plot([n], [0.62], marker="v", ms=13, color="#1f4e99", label=f"the step: {n:,} tokens", ls="none")
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("tokens in one step (log scale)")
    ax.set_title(r["describe"], fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=7, ncol=4, frameon=False)
    return fig


def figure_png(data: dict) -> str | None:
    """The figure as a base64 PNG for an <img> (None without a replay or matplotlib)."""
    import base64
    import io

    try:
        fig = figure(data)
    except ImportError:
        return None
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


# --- the notebook's panel: paste or upload a log ------------------------------------------------------

def _uploaded(value) -> bytes | None:
    """The first uploaded file's bytes (ipywidgets 8: a tuple of dicts; 7: a dict by file name)."""
    items = list(value.values()) if isinstance(value, dict) else list(value or ())
    if not items:
        return None
    content = items[0]["content"]
    return bytes(content)


def panel(gpu: str | None = None, gpu_count: int | None = None):
    """A paste box and a file upload; the button triages what was given and shows the text and the figure."""
    import ipywidgets as w
    from IPython.display import display

    from ..errors import DiagError
    from ..triage import diagnose

    paste = w.Textarea(placeholder="paste the server's log here", layout=w.Layout(width="100%", height="160px"))
    upload = w.FileUpload(accept="", multiple=False, description="log file")
    go = w.Button(description="Triage", button_style="primary")
    out = w.Output()

    def run(_=None):
        out.clear_output()
        data = _uploaded(upload.value) or paste.value.encode()
        with out:
            try:
                t = diagnose.triage(data, source="pasted log" if not _uploaded(upload.value) else "uploaded log",
                                    gpu=gpu, gpu_count=gpu_count)
            except DiagError as e:
                print(f"diaglib: error: {e}")
                return
            print(diagnose.format_text(t))
            fig = figure(diagnose.as_dict(t))
            if fig is not None:
                display(fig)

    go.on_click(run)
    return w.VBox([paste, w.HBox([upload, go]), out])
