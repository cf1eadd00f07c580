"""The notebook suite: committed clean, and the report built from it renders in headless Chromium.

The report for this environment's reference scenario is built once per session (both vLLM environments
run the tests, so both seed scenarios get a report). Screenshots land in $DIAGLIB_SCREENSHOTS, default
reports/screenshots/<scenario>/.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from diaglib.paths import ROOT
from diaglib.present import report

NOTEBOOKS = report.notebooks()
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-port=0"]


# --- committed notebooks ------------------------------------------------------------------------

def test_the_suite_exists_in_reading_order():
    names = [p.stem for p in NOTEBOOKS]
    assert "01-overview" in names[:2] and len(names) >= 2  # 00-triage may come first
    assert [n[:2] for n in names] == sorted(n[:2] for n in names)
    assert len({n[:2] for n in names}) == len(names), "two notebooks share a number"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    """No outputs, no execution counts, no widget state; one parameters cell; stable cell ids."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {cell.id} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {cell.id} has an execution count"
        assert cell.id.startswith(path.stem.split("-", 1)[1]), f"{path.name}: unstable cell id {cell.id}"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged `parameters`"
    for name in ("scenario", "cmd", "gpu", "gpu_count", "vllm"):
        assert f"\n{name} = None" in "\n" + tagged[0].source
    assert any("report.scenario(scenario, cmd=cmd, gpu=gpu, gpu_count=gpu_count, vllm=vllm)" in c.source
               for c in nb.cells), f"{path.name} ignores its parameters"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_diff_friendly(path):
    """nbformat's own layout (one source line per JSON string), so a re-save changes nothing."""
    text = path.read_text()
    assert text == nbformat.writes(nbformat.reads(text, as_version=4)) + "\n"


# --- the built report in Chromium -----------------------------------------------------------------

class Browser:
    """Headless Chromium driven over the DevTools protocol (websocket-client)."""

    def __init__(self, exe: str):
        import websocket

        self.profile = Path(tempfile.mkdtemp(prefix="diaglib-chromium-"))
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)

    def open(self, path: Path, width: int = 1100) -> None:
        self.events.clear()
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")

    def evaluate(self, js: str):
        return self.call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value")

    def problems(self) -> list[str]:
        """Failed or external resource loads, script exceptions and console errors since open()."""
        out = []
        for ev in self.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:", "about:")):
                out.append(f"external fetch: {p['request']['url']}")
            elif m == "Network.loadingFailed":
                out.append(f"failed load: {p.get('errorText')}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"script exception: {p['exceptionDetails'].get('text')}")
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"console error: {p['entry'].get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append("console.error call")
        return out

    def screenshot(self, path: Path, height: int = 1400, scale: float = 0.8) -> None:
        """A window of the page starting a little above its first figure (the top where it has none)."""
        top = self.evaluate("(() => { const i = document.images[0]; if (!i) return 0;"
                            " return Math.max(0, i.getBoundingClientRect().top + window.scrollY - 420); })()")
        full = int(self.evaluate("document.documentElement.scrollHeight"))
        top = max(0, min(int(top), full - height))
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": top, "width": 1100, "height": min(height, full), "scale": scale})
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


PAGE_CHECK = """(() => {
  const imgs = [...document.images];
  const text = document.body.innerText;
  return {
    errors: [...document.querySelectorAll('.dg-error')].map(e => e.innerText.slice(0, 300)),
    images: imgs.length,
    broken_images: imgs.filter(i => !i.complete || i.naturalWidth === 0).length,
    unrendered_figures: (text.match(/<Figure size [^>]*>/g) || []).length,
    unrendered_widgets: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length,
    widget_controls: document.querySelectorAll('.dg-widget input, .dg-widget select').length,
    external: [...document.querySelectorAll('[src], link[href]')].map(e => e.src || e.href)
              .filter(u => u && !/^(data:|file:|about:)/.test(u)),
  };
})()"""


@pytest.fixture(scope="session")
def built_report(scenario_name, tmp_path_factory):
    """The report for this environment's reference scenario: (output folder, pages, seconds)."""
    out = tmp_path_factory.mktemp("report")
    t0 = time.monotonic()
    pages = report.build(scenario_name, out=out)
    return out, pages, time.monotonic() - t0


@pytest.fixture(scope="session")
def browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium (apt-get install -y chromium)")
    pytest.importorskip("websocket")
    b = Browser(exe)
    yield b
    b.close()


def test_report_builds_every_notebook(built_report):
    out, pages, seconds = built_report
    assert [p.notebook for p in pages] == [p.name for p in NOTEBOOKS]
    assert all(p.error is None for p in pages)
    for p in NOTEBOOKS:
        assert (out / f"{p.stem}.html").stat().st_size > 10_000
    index = (out / "index.html").read_text()
    for p in NOTEBOOKS:
        assert f'href="{p.stem}.html"' in index
    print(f"report built in {seconds:.1f} s")


def test_the_moe_page_of_a_dense_model_says_so_once(tmp_path):
    """A model without MoE layers (vLLM builds none) gets an MoE page that says so, not a failed cell."""
    cmd = "vllm serve data/models/Llama-3.1-8B-Instruct --max-num-batched-tokens 8192"
    pages = report.build(cmd=cmd, gpu="NVIDIA H200", gpu_count=1, out=tmp_path, only=["moe"])
    assert [p.error for p in pages] == [None]
    text = (tmp_path / f"{Path(pages[0].notebook).stem}.html").read_text()
    said = "Llama-3.1-8B-Instruct (LlamaForCausalLM) has no MoE layers: nothing below applies."  # an output
    assert text.count(said) == 1 and "Traceback" not in text


PYTHON_WARNING = re.compile(r"\b[A-Z]\w*Warning\b|Traceback \(most recent call last\)")
BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{200,}")  # figures and widget buffers: not text a reader sees


def machine_places() -> list[str]:
    """Absolute places of the machine that built the report, which no page may show."""
    places = [str(ROOT), sys.prefix, sys.base_prefix, str(Path.home()) + "/", tempfile.gettempdir() + "/"]
    host = socket.gethostname()
    return places + ([host] if len(host) >= 4 and host != "localhost" else [])


@pytest.mark.parametrize("name", [p.stem for p in NOTEBOOKS] + ["index"])
def test_report_pages_show_no_warnings_and_no_machine_paths(name, built_report):
    """Checked on the exported HTML: no Python warning or traceback, no path of this machine."""
    out, _, _ = built_report
    text = BASE64_RUN.sub("", (out / f"{name}.html").read_text())
    found = PYTHON_WARNING.search(text)
    assert found is None, f"{name}.html: {text[max(0, found.start() - 200):found.end() + 200]}"
    for place in machine_places():
        assert place not in text, f"{name}.html shows {place}: ...{text[max(0, text.index(place) - 120):][:300]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_report_page_renders_in_chromium(path, built_report, browser, scenario_name):
    out, _, _ = built_report
    browser.open(out / f"{path.stem}.html")
    state = browser.evaluate(PAGE_CHECK)
    shots = Path(os.environ.get("DIAGLIB_SCREENSHOTS", ROOT / "reports" / "screenshots" / scenario_name))
    shots.mkdir(parents=True, exist_ok=True)
    browser.screenshot(shots / f"{path.stem}.png")
    assert state["errors"] == [], f"error outputs in {path.name}"
    assert browser.problems() == [] and state["external"] == []
    assert state["images"] >= 1 and state["broken_images"] == 0, f"figures missing in {path.name}: {state}"
    assert state["unrendered_figures"] == 0 and state["unrendered_widgets"] == 0
    if "widgets.panel(" in path.read_text():
        assert state["widget_controls"] >= 7, "the panel's controls render"


def test_index_page_renders_in_chromium(built_report, browser):
    out, pages, _ = built_report
    browser.open(out / "index.html")
    links = browser.evaluate("[...document.querySelectorAll('a')].map(a => a.getAttribute('href'))")
    assert links == [f"{Path(p.notebook).stem}.html" for p in pages]
    assert browser.problems() == []


# --- the sweep panel (diaglib.present.widgets) --------------------------------------------------------------

def test_panel_settings_become_serve_flags_vllm_resolves(scenario):
    from diaglib.present import widgets

    s = widgets.defaults(scenario)
    assert (s.prompt_len, s.max_num_batched_tokens, s.chunked_prefill, s.tp) == (8192, 8192, True, 8)
    moved = widgets.scenario_for(scenario, widgets.Settings(**{**s.__dict__, "max_num_batched_tokens": 4096,
                                                                "max_num_seqs": 64, "tp": 4, "gpu": "NVIDIA H200"}))
    cfg = moved.vllm_config
    assert cfg.scheduler_config.max_num_batched_tokens == 4096 and cfg.scheduler_config.max_num_seqs == 64
    assert cfg.parallel_config.tensor_parallel_size == 4 and moved.gpu.name == "NVIDIA H200"
    assert widgets.lengths_around(widgets.Settings(**{**s.__dict__, "prompt_len": 5})) == list(range(1, 18))


def test_panel_redraws_on_change_and_shows_a_rejected_setting_as_one_line(scenario):
    from diaglib.present import widgets

    p = widgets.panel(scenario, prompt_len=8193)
    assert "answered" in p.status.value
    p.controls["max_num_batched_tokens"].value = 512  # fewer than max_num_seqs (1024): vLLM refuses
    assert "not computed" in p.status.value and "max_num_seqs" in p.status.value
    p.controls["max_num_batched_tokens"].value = 8193
    assert "answered" in p.status.value
