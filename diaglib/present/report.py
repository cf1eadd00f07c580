"""The notebook suite as a report: execute every notebook headless and export self-contained HTML.

`build()` runs notebooks/NN-*.ipynb with a scenario's parameters injected after each notebook's cell
tagged ``parameters`` (papermill's convention), in a few kernels of the scenario's vLLM environment
working in parallel (each resolves the scenario once, through :func:`scenario`), and writes one HTML
page per notebook plus ``index.html``. Pages carry their figures, styles and widget controls inline
and fetch nothing; strings are escaped, secret-looking values redacted and this machine's own paths (the
checkout, the Python environment, the home and temporary folders) replaced by placeholders. The kernels send
Python warnings and library log lines to diaglib's log (diaglib.cache.root()/report.log), not into the pages.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import html
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .. import compat
from ..errors import DiagError
from ..paths import ROOT, SCENARIOS
from ..secrets import SECRET_NAME, scrub

NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 300
KERNEL_NAME = "diaglib"


class ReportError(Exception):
    """A notebook failed while the report was built; the message names notebook and cell."""


@dataclass
class Page:
    """One executed notebook of a report."""

    notebook: str
    title: str
    html: str
    seconds: float
    error: str | None = None
    summary: str = ""
    slowest: str = ""


# --- parameters and the kernel side -------------------------------------------------------------

def notebooks(source: Path = NOTEBOOKS) -> list[Path]:
    """The suite in reading order (notebooks/NN-topic.ipynb)."""
    return sorted(Path(source).glob("[0-9][0-9]-*.ipynb"))


def parameters(scenario: str | None = None, *, cmd: str | None = None, gpu: str | None = None,
               gpu_count: int | None = None, vllm: str | None = None) -> dict:
    """The parameters every notebook takes, checked before any kernel starts."""
    from ..gpus import gpu_spec
    from ..scenario import find_scenario

    if cmd is not None and scenario is not None:
        raise DiagError("give either a scenario file or --cmd, not both")
    if cmd is None:
        path = find_scenario(scenario)
        scenario = path.stem if path.parent == SCENARIOS else str(path)
    if gpu is not None or gpu_count is not None:
        gpu_spec(gpu or "NVIDIA H20", 1 if gpu_count is None else gpu_count)
    if vllm is not None and vllm not in compat.supported():
        raise DiagError(f"vLLM {vllm} is not supported; supported: {', '.join(compat.supported())}")
    return {"scenario": scenario, "cmd": cmd, "gpu": gpu, "gpu_count": gpu_count, "vllm": vllm}


def wanted_version(params: dict) -> str:
    """The vLLM version whose environment must run the notebooks for these parameters."""
    from ..scenario import find_scenario, read_scenario_file

    if params.get("vllm"):
        return params["vllm"]
    if params.get("scenario"):
        v = read_scenario_file(find_scenario(params["scenario"])).get("vllm")
        if v:
            return v
    return compat.installed() or compat.REFERENCE


def kernel_python(params: dict) -> Path:
    """This interpreter when its vLLM answers for the scenario, else that version's project venv."""
    v = wanted_version(params)
    return Path(sys.executable) if v == compat.installed() else compat.venv_python(v)


@lru_cache(maxsize=4)
def scenario(scenario: str | None = None, *, cmd: str | None = None, gpu: str | None = None,
             gpu_count: int | None = None, vllm: str | None = None):
    """The notebooks' scenario, resolved once per kernel (every notebook in a kernel shares it)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from ..scenario import load

    return load(scenario, cmd=cmd, gpu=gpu, gpu_count=gpu_count, vllm=vllm)


def kept(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` for a notebook, kept in diaglib's cache (diaglib.cache) under the function, its
    arguments (a scenario by :meth:`~diaglib.scenario.Scenario.key_parts`, bytes by their hash) and the
    environment, as it was computed (DataFrames too): a report built again makes no prediction twice."""
    from .. import cache

    parts = {"fn": f"{fn.__module__}.{fn.__qualname__}", "args": [_key_of(a) for a in args],
             "kwargs": {k: _key_of(v) for k, v in sorted(kwargs.items())}}
    return cache.memo("notebook", parts, lambda: fn(*args, **kwargs), pickled=True)


def _key_of(arg):
    from dataclasses import asdict, is_dataclass

    from ..scenario import Scenario

    if isinstance(arg, Scenario):
        return {"scenario": arg.key_parts()}
    if isinstance(arg, bytes):
        return {"bytes": hashlib.sha256(arg).hexdigest()}
    if is_dataclass(arg) and not isinstance(arg, type):
        return {type(arg).__qualname__: asdict(arg)}
    return arg


def live_stores(version: str, root: Path | None = None) -> list[Path]:
    """The live record stores (data/live/**/*.jsonl, or under $DIAGLIB_LIVE_DIR) with an engine started by vLLM
    ``version``: the observations a notebook may put next to that version's predictions."""
    from ..live import store
    from ..paths import DATA

    found = sorted(Path(root or os.environ.get("DIAGLIB_LIVE_DIR") or DATA / "live").glob("**/*.jsonl"))
    return [p for p in found if any(r.get("type") == "engine" and (r.get("info") or {}).get("vllm") == version
                                    for r in store.read(p))]


class Banner:
    """What a notebook reports on, shown at its top: scenario, command, vLLM and GPU (escaped in HTML)."""

    def __init__(self, sc):
        gpu = f"{sc.gpu.count} x {sc.gpu.name}" + (" (what-if: no GPU here)" if sc.simulated else "")
        vllm = f"{sc.vllm_version} ({sc.vllm_why})" + ("" if sc.verified else ", unverified: not covered by diaglib's tests")
        self.rows = [("scenario", sc.name), ("command", sc.command), ("vLLM", vllm), ("GPU", gpu)]

    def __repr__(self) -> str:
        return "\n".join(f"{k:<9} {v}" for k, v in self.rows)

    def _repr_html_(self) -> str:
        cells = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                        f"<td style='text-align:left'><code>{html.escape(v)}</code></td></tr>" for k, v in self.rows)
        return f"<table>{cells}</table>"


def banner(sc) -> Banner:
    """The scenario's identity card for a notebook's first output."""
    return Banner(sc)


def inject(nb, params: dict):
    """A copy of ``nb`` with a cell assigning ``params`` after its ``parameters`` cell (papermill's way)."""
    import nbformat

    nb = copy.deepcopy(nb)
    at = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if at is None:
        raise DiagError("notebook has no cell tagged `parameters`")
    src = "# Injected by diaglib report\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    cell.id = "injected-parameters"
    nb.cells.insert(at + 1, cell)
    return nb


# --- HTML -----------------------------------------------------------------------------------------

_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}<style>{{ resources.diaglib_css }}</style>{%- endblock extra_css -%}
{%- block body_footer -%}{{ super() }}
{%- if resources.diaglib_widget_state %}
<script type="application/vnd.jupyter.widget-state+json">{{ resources.diaglib_widget_state }}</script>
{%- endif -%}
{%- endblock body_footer -%}
{% block error -%}
<div class="jp-RenderedText jp-OutputArea-output dg-error" data-mime-type="application/vnd.jupyter.stderr">
<pre>{{- super() -}}</pre>
</div>
{%- endblock error %}
"""

_CSS = """
.dg-widget { display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: center; padding: 6px 0;
             font: 13px system-ui, sans-serif; }
.dg-widget label { display: inline-flex; gap: 6px; align-items: center; }
.dg-widget .dg-value { font-variant-numeric: tabular-nums; min-width: 3em; }
.dg-widget-note { font: italic 12px system-ui, sans-serif; color: #666; }
.jp-OutputArea-output pre, .jp-RenderedText pre { white-space: pre !important; overflow-x: auto; }
"""

REDACTED = "[redacted]"


def redact(text: str) -> str:
    """``text`` with secret-looking values (tokens, keys, this environment's secret variables) and this
    machine's paths and host name replaced."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 8:
            text = text.replace(value, REDACTED)
    for pattern, placeholder in _machine_paths():
        text = pattern.sub(placeholder, text)
    return scrub(text, REDACTED)


@lru_cache(maxsize=1)
def _machine_paths() -> tuple[tuple[re.Pattern, str], ...]:
    """(pattern, placeholder) for the places of this machine a page must not show, longest first: the
    checkout (paths inside it become relative), the Python environment and installation, the home and
    temporary folders, the host name."""
    import socket

    places = {sys.prefix: "<python-env>", sys.exec_prefix: "<python-env>", sys.base_prefix: "<python>",
              str(Path.home()): "~", tempfile.gettempdir(): "<tmp>", str(ROOT): "."}
    out = []
    for place, placeholder in sorted(places.items(), key=lambda kv: -len(kv[0])):
        if len(place) < 2:
            continue
        if placeholder == ".":
            out.append((re.compile(re.escape(place) + "/"), ""))
        out.append((re.compile(re.escape(place) + r"(?![\w.-])"), placeholder))
    host = socket.gethostname()
    if len(host) >= 4 and host != "localhost":
        out.append((re.compile(rf"\b{re.escape(host)}\b"), "<host>"))
    return tuple(out)


_BINARY = ("image/", "application/pdf")  # base64 data: never rewritten


def _redact_nb(nb) -> None:
    def walk(x):
        if isinstance(x, str):
            return redact(x)
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            for k in list(x):
                if not (isinstance(k, str) and k.startswith(_BINARY)):
                    x[k] = walk(x[k])
        return x

    for cell in nb.cells:
        cell.source = walk(cell.source)
        for out in cell.get("outputs", []):
            walk(out)
    walk(nb.metadata.get("widgets", {}))


def to_html(nb, title: str) -> str:
    """One executed notebook as a self-contained page: figures inline, widgets as static controls."""
    import jinja2
    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    _redact_nb(nb)
    _render_widgets(nb)
    state = nb.metadata.pop("widgets", None)
    state_json = json.dumps(state).translate({ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}) if state else ""
    nb.metadata["title"] = title
    exporter = HTMLExporter(template_name="lab", extra_loaders=[jinja2.DictLoader({"diaglib.html.j2": _TEMPLATE})],
                            template_file="diaglib.html.j2", embed_images=True)
    body, _ = exporter.from_notebook_node(nb, resources={"diaglib_css": _CSS, "diaglib_widget_state": state_json})
    return body


def _render_widgets(nb) -> None:
    """Replace widget views by what they showed: static controls (escaped) and their Output widgets' outputs."""
    import nbformat

    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for cell in nb.cells:
        outs = []
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            if view is None:
                outs.append(out)
                continue
            for kind, item in _widget_parts(view.get("model_id"), state):
                outs.append(item if kind == "output" else nbformat.v4.new_output(
                    "display_data", data={"text/html": f'<div class="dg-widget">{item}</div>'}))
        if "outputs" in cell:
            cell.outputs = outs


def _widget_parts(model_id: str | None, state: dict, depth: int = 0) -> list[tuple[str, object]]:
    """("html", controls) and ("output", nbformat output) parts of one widget, in display order."""
    model = state.get(model_id or "", {})
    w = model.get("state")
    if w is None or depth > 20:
        return [("html", '<span class="dg-widget-note">(widget state not saved)</span>')]
    name = w.get("_model_name", "")
    if name == "OutputModel":
        import nbformat

        return [("output", nbformat.from_dict(o)) for o in w.get("outputs", [])]
    if name == "ImageModel":
        import nbformat

        data = next((b["data"] for b in model.get("buffers", []) if b.get("path") == ["value"]), None)
        fmt = re.sub(r"[^a-z+]", "", str(w.get("format", "png")))
        return [("output", nbformat.v4.new_output("display_data", data={f"image/{fmt}": data}))] if data else []
    if "children" not in w:
        control = _control(name, w)
        return [("html", control)] if control else []
    parts: list[tuple[str, object]] = []
    for child in w["children"]:
        for kind, item in _widget_parts(child.removeprefix("IPY_MODEL_"), state, depth + 1):
            if kind == "html" and parts and parts[-1][0] == "html" and name != "VBoxModel":
                parts[-1] = ("html", parts[-1][1] + item)  # a row of controls stays one row
            else:
                parts.append((kind, item))
    return parts


def _control(name: str, w: dict) -> str:
    """One ipywidgets control as disabled HTML showing its saved value (every string escaped)."""
    e = html.escape
    desc = e(str(w.get("description", "")))
    label = f"<span>{desc}</span>" if desc else ""
    if name in ("IntSliderModel", "FloatSliderModel", "FloatLogSliderModel"):
        v = w.get("value")
        return (f'<label>{label}<input type="range" disabled min="{e(str(w.get("min", "")))}" '
                f'max="{e(str(w.get("max", "")))}" step="{e(str(w.get("step", "")))}" value="{e(str(v))}">'
                f'<span class="dg-value">{e(str(v))}</span></label>')
    if name in ("IntRangeSliderModel", "FloatRangeSliderModel"):
        lo, hi = w.get("value", ["", ""])
        return f'<label>{label}<span class="dg-value">{e(str(lo))} – {e(str(hi))}</span></label>'
    if name in ("DropdownModel", "SelectModel", "RadioButtonsModel", "ToggleButtonsModel", "SelectionSliderModel"):
        labels = w.get("_options_labels", [])
        idx = w.get("index")
        opts = "".join(f'<option{" selected" if i == idx else ""}>{e(str(o))}</option>' for i, o in enumerate(labels))
        return f"<label>{label}<select disabled>{opts}</select></label>"
    if name in ("CheckboxModel", "ToggleButtonModel"):
        checked = " checked" if w.get("value") else ""
        return f'<label><input type="checkbox" disabled{checked}>{label}</label>'
    if name in ("IntTextModel", "BoundedIntTextModel", "FloatTextModel", "BoundedFloatTextModel", "TextModel"):
        return f'<label>{label}<input type="text" disabled value="{e(str(w.get("value", "")))}"></label>'
    if name == "ButtonModel":
        return f"<button disabled>{desc}</button>"
    if name in ("LabelModel", "HTMLModel", "HTMLMathModel"):
        return f"<span>{e(str(w.get('value', '')))}</span>" if name == "LabelModel" else str(w.get("value", ""))
    return ""


# --- execution ------------------------------------------------------------------------------------

def _kernel_spec_dir(python: Path, tmp: Path) -> Path:
    d = tmp / "kernels" / KERNEL_NAME
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 f"--IPKernelApp.exec_lines=import {__name__} as _diaglib_report",
                 "--IPKernelApp.exec_lines=_diaglib_report.kernel_setup()",
                 "--IPKernelApp.exec_lines=del _diaglib_report"],
        "display_name": f"diaglib ({python})", "language": "python"}))
    return d.parent


def kernel_log() -> Path:
    """Where a report's kernels send Python warnings and library log lines."""
    from ..cache import root

    return root() / "report.log"


def kernel_setup() -> None:
    """Run in every report kernel before its first cell: Python warnings go to :func:`kernel_log` (vLLM's
    own log lines are sent there by the logging config the kernel's environment names), so no page shows
    them."""
    import logging

    path = kernel_log()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s kernel {os.getpid()} %(name)s: %(message)s"))
    logging.captureWarnings(True)
    log = logging.getLogger("py.warnings")
    log.handlers[:] = [handler]
    log.propagate = False


def _logging_config(tmp: Path) -> Path:
    """A logging config for vLLM (VLLM_LOGGING_CONFIG_PATH, read by every supported release when it is first
    imported): its log lines go to :func:`kernel_log` instead of the kernel's stdout, i.e. into no page."""
    path = tmp / "vllm-logging.json"
    kernel_log().parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
        "handlers": {"log": {"class": "logging.FileHandler", "filename": str(kernel_log()), "formatter": "plain"}},
        "loggers": {"vllm": {"handlers": ["log"], "level": "INFO", "propagate": False}}}))
    return path


def _failure(nb_name: str, nb, exc: Exception) -> str:
    """`NN-topic.ipynb, cell 7 (id x): ValueError: ...` for the first cell with an error output."""
    cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    for i, cell in enumerate(cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"{nb_name}, cell {i + 1} (id {cell.get('id', '?')}): {out.get('ename')}: {out.get('evalue')}"
    first = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
    return f"{nb_name}: {type(exc).__name__}: {first[0]}"


async def _execute_all(paths: list[Path], params: dict, python: Path, jobs: int) -> list[Page]:
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    queue: asyncio.Queue[Path] = asyncio.Queue()
    for p in paths:
        queue.put_nowait(p)
    from .. import cache, progress

    pages: dict[Path, Page] = {}
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1", JUPYTER_PLATFORM_DIRS="1", DIAGLIB_PROGRESS="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("VLLM_CONFIGURE_LOGGING", None)
    prefix = cache.bytecode_prefix()
    if prefix:  # the kernels import vLLM: keep its bytecode (see diaglib.cache.bytecode_prefix)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = prefix
    bar = progress.bar(total=len(paths), desc="report", unit="page")
    reset = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "get_ipython().run_line_magic('reset', '-f')\nimport matplotlib.pyplot as _plt\n_plt.close('all')")])

    with tempfile.TemporaryDirectory(prefix="diaglib-kernels-") as tmp:
        env["VLLM_LOGGING_CONFIG_PATH"] = str(_logging_config(Path(tmp)))
        ksm = KernelSpecManager(kernel_dirs=[str(_kernel_spec_dir(python, Path(tmp)))])

        async def worker(i: int) -> None:
            km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm, transport="ipc",
                                    ip=f"{tmp}/kernel{i}")
            await km.start_kernel(cwd=str(paths[0].parent), env=env)
            kc = km.client()  # one client per kernel: a client per notebook can lose IOPub messages
            kc.start_channels()
            await kc.wait_for_ready(timeout=300)

            async def run(nb, **kw) -> None:
                client = NotebookClient(nb, km=km, kernel_name=KERNEL_NAME, allow_errors=False, **kw)
                client.kc = kc
                await client.async_execute()

            try:
                while not queue.empty():
                    path = queue.get_nowait()
                    nb = inject(nbformat.read(path, as_version=4), params)
                    title, summary = _title(nb, path)
                    t0 = time.monotonic()
                    error = None
                    try:
                        await run(nb, timeout=CELL_TIMEOUT_S, store_widget_state=True)
                    except Exception as exc:  # a failed cell, a timeout or a dead kernel
                        error = _failure(path.name, nb, exc)
                        await km.restart_kernel(now=True)
                    else:
                        await run(copy.deepcopy(reset))
                    seconds = time.monotonic() - t0
                    pages[path] = Page(path.name, title, to_html(nb, title), seconds, error, summary, _slowest(nb))
                    bar.update()
            finally:
                kc.stop_channels()
                await km.shutdown_kernel(now=True)

        try:
            await asyncio.gather(*(worker(i) for i in range(max(1, min(jobs, len(paths))))))
        finally:
            bar.close()
    return [pages[p] for p in paths]


def _slowest(nb) -> str:
    """`cell 7: 12.3 s` for the code cell that took longest (nbclient's timing metadata)."""
    from datetime import datetime

    best = (0.0, 0)
    for i, cell in enumerate(c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])):
        ex = cell.get("metadata", {}).get("execution", {})
        a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if a and b:
            best = max(best, ((datetime.fromisoformat(b.rstrip("Z")) - datetime.fromisoformat(a.rstrip("Z"))).total_seconds(), i + 1))
    return f"cell {best[1]}: {best[0]:.1f} s" if best[1] else ""


def _title(nb, path: Path) -> tuple[str, str]:
    """The notebook's H1 and the first sentence of the paragraph under it."""
    first = next((c.source for c in nb.cells if c.cell_type == "markdown"), "")
    lines = first.strip().splitlines()
    title = lines[0][2:].strip() if lines and lines[0].startswith("# ") else path.stem
    para = " ".join(x.strip() for x in lines[1:] if x.strip())
    return title, re.split(r"(?<=[.:])\s", para.replace("`", ""), maxsplit=1)[0]


# --- the report -----------------------------------------------------------------------------------

def build(scenario: str | None = None, *, out: str | Path = "reports", cmd: str | None = None,
          gpu: str | None = None, gpu_count: int | None = None, vllm: str | None = None,
          jobs: int | None = None, only: list[str] | None = None, source: Path = NOTEBOOKS) -> list[Page]:
    """Execute the suite for one scenario and write OUT/NN-topic.html and OUT/index.html.

    Raises ReportError naming every failed notebook and cell (their pages are still written).
    """
    params = parameters(scenario, cmd=cmd, gpu=gpu, gpu_count=gpu_count, vllm=vllm)
    python = kernel_python(params)
    paths = notebooks(source)
    if only:
        paths = [p for p in paths if any(o in p.stem for o in only)]
        if not paths:
            raise DiagError(f"no notebook matches {', '.join(only)}")
    if not paths:
        raise DiagError(f"no notebooks under {source}")
    jobs = jobs or min(len(paths), os.cpu_count() or 1, 4)
    out = Path(out)
    try:  # before the work: a folder that cannot be made is known at once
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".diaglib-", delete=True)
        probe.close()
    except OSError as e:
        raise DiagError(f"cannot write the report into {out}: {e.strerror or e}") from None
    t0 = time.monotonic()
    pages = asyncio.run(_execute_all(paths, params, python, jobs))
    try:
        for page in pages:
            (out / f"{Path(page.notebook).stem}.html").write_text(page.html)
        (out / "index.html").write_text(index_html(pages, params, wanted_version(params), time.monotonic() - t0))
    except OSError as e:
        raise DiagError(f"cannot write the report into {out}: {e.strerror or e}") from None
    failed = [p.error for p in pages if p.error]
    if failed:
        raise ReportError("; ".join(failed))
    return pages


def index_html(pages: list[Page], params: dict, version: str, seconds: float) -> str:
    """The report's front page: what was analysed, and one line per notebook page."""
    from ..scenario import find_scenario, read_scenario_file

    e = html.escape
    data = read_scenario_file(find_scenario(params["scenario"])) if params.get("scenario") else {}
    name = data.get("name", "command line")
    command = params.get("cmd") or data.get("command", "")
    g = data.get("gpu", {})
    gpu = f"{params.get('gpu_count') or g.get('count', 8)} x {params.get('gpu') or g.get('name', 'NVIDIA H20')}"
    rows = "".join(
        f'<tr><td><a href="{e(Path(p.notebook).stem)}.html">{e(p.title)}</a><div class="sum">{e(p.summary)}</div></td>'
        f'<td class="{"bad" if p.error else "ok"}">{e(p.error or "ok")}</td><td>{p.seconds:.1f} s'
        f'<div class="sum">{e(p.slowest)}</div></td></tr>'
        for p in pages)
    return redact(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>diaglib report: {e(name)}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }}
code {{ background: #f3f3f3; padding: 2px 4px; border-radius: 3px; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ text-align: left; padding: 6px 10px; border-bottom: 1px solid #ddd; }}
.sum {{ color: #555; font-size: 13px; }} .ok {{ color: #1a7f37; }} .bad {{ color: #cf222e; }} dt {{ font-weight: 600; }} dd {{ margin: 0 0 .6em 0; }}
</style></head><body>
<h1>diaglib report</h1>
<dl><dt>scenario</dt><dd>{e(name)}</dd><dt>command</dt><dd><code>{e(command)}</code></dd>
<dt>GPU</dt><dd>{e(gpu)}</dd><dt>vLLM</dt><dd>{e(version)}</dd>
<dt>built</dt><dd>{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {seconds:.0f} s</dd></dl>
<table><tr><th>notebook</th><th>status</th><th>run time</th></tr>{rows}</table>
</body></html>
""")
