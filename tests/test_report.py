"""diaglib.present.report: parameter checks, injection, self-contained and escaped HTML, failures named by cell."""
from __future__ import annotations

import re
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.present import report

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _nb(*cells):
    nb = new_notebook(cells=list(cells))
    for i, c in enumerate(nb.cells):
        c.id = f"t-{i}"
    return nb


def _params_cell():
    return new_code_cell("scenario = None\ncmd = None", metadata={"tags": ["parameters"]})


# --- parameters --------------------------------------------------------------------------------------

def test_parameters_name_a_known_scenario_by_its_name():
    assert report.parameters()["scenario"] == "default"
    assert report.parameters("seed-vllm-0.10.1.1")["scenario"] == "seed-vllm-0.10.1.1"


@pytest.mark.parametrize("kw, words", [
    ({"scenario": "no-such-scenario"}, "not found"),
    ({"scenario": "default", "cmd": "vllm serve x"}, "not both"),
    ({"gpu": "NVIDIA Z9000"}, "unknown GPU"),
    ({"gpu_count": 0}, "at least 1"),
    ({"vllm": "0.1.0"}, "not supported"),
])
def test_bad_parameters_are_one_line_errors(kw, words):
    with pytest.raises(DiagError, match=words) as e:
        report.parameters(kw.pop("scenario", None), **kw)
    assert "\n" not in str(e.value)


def test_kernel_is_the_scenarios_vllm_environment():
    assert report.wanted_version(report.parameters("seed-vllm-0.10.1.1")) == "0.10.1.1"
    assert report.wanted_version(report.parameters("default")) == compat.installed()  # the default pins none
    assert report.wanted_version(report.parameters("default", vllm="0.10.1.1")) == "0.10.1.1"
    try:
        py = report.kernel_python(report.parameters("seed-vllm-0.10.1.1"))
    except DiagError as e:  # the seed's environment is not installed here (a tight disk: noxfile.py)
        pytest.skip(str(e))
    out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "0.10.1.1"


def test_cli_rejects_bad_input_with_exit_2():
    r = subprocess.run([sys.executable, "-m", "diaglib", "report", "no-such-scenario", "-o", "/tmp/unused"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("diaglib: error: scenario 'no-such-scenario' not found")


# --- injection ---------------------------------------------------------------------------------------

def test_parameters_are_injected_after_the_parameters_cell():
    nb = _nb(new_markdown_cell("# T"), _params_cell(), new_code_cell("print(scenario)"))
    out = report.inject(nb, {"scenario": "x'y", "cmd": None})
    cell = out.cells[2]
    assert cell.metadata.tags == ["injected-parameters"]
    ns: dict = {}
    exec(cell.source, ns)
    assert ns["scenario"] == "x'y" and ns["cmd"] is None
    assert len(nb.cells) == 3, "the original notebook is left alone"


def test_a_notebook_without_parameters_cell_is_refused():
    with pytest.raises(DiagError, match="parameters"):
        report.inject(_nb(new_code_cell("1")), {})


# --- HTML --------------------------------------------------------------------------------------------

def _widget_nb():
    """A notebook whose output is a saved widget panel: a slider, a dropdown and an Output with a PNG."""
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    state = {
        "box": {"_model_name": "VBoxModel", "children": ["IPY_MODEL_row", "IPY_MODEL_out", "IPY_MODEL_img"]},
        "img": {"_model_name": "ImageModel", "format": "png"},
        "row": {"_model_name": "HBoxModel", "children": ["IPY_MODEL_s", "IPY_MODEL_d"]},
        "s": {"_model_name": "IntSliderModel", "description": "prompt " + EVIL, "value": 8192, "min": 1,
              "max": 16384, "step": 1},
        "d": {"_model_name": "DropdownModel", "description": "GPU", "_options_labels": ["NVIDIA H20", EVIL],
              "index": 0},
        "out": {"_model_name": "OutputModel", "outputs": [
            {"output_type": "display_data", "data": {"image/png": png, "text/plain": "<Figure>"}, "metadata": {}}]},
    }
    nb = _nb(_params_cell(), new_code_cell("panel"))
    nb.cells[1].outputs = [new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "box", "version_major": 2, "version_minor": 0},
        "text/plain": "VBox()"})]
    nb.metadata.widgets = {"application/vnd.jupyter.widget-state+json": {
        "state": {k: {"model_name": v["_model_name"], "state": v} for k, v in state.items()},
        "version_major": 2, "version_minor": 0}}
    nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]["img"]["buffers"] = [
        {"data": png[:-4] + "AAAA", "encoding": "base64", "path": ["value"]}]  # as nbclient stores an Image's bytes
    return nb


def test_html_is_self_contained():
    page = report.to_html(_widget_nb(), "t")
    assert not re.search(r"""<script[^>]+src=|<link[^>]+href=["']?https?:|@import""", page)
    assert "cdn" not in page.lower() and "require.js" not in page
    assert 'src="data:image/png;base64,' in page


def test_widgets_render_as_static_controls_with_their_figures():
    page = report.to_html(_widget_nb(), "t")
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 2 and imgs[1].endswith("AAAA"), "the Output's figure and the Image widget's bytes"
    slider = re.search(r"<input [^>]*>", page[page.index("dg-widget"):]).group(0)
    for attr in ('type="range"', "disabled", 'min="1"', 'max="16384"', 'value="8192"'):
        assert attr in slider
    assert re.search(r"<option selected[^>]*>NVIDIA H20</option>", page)
    assert page.index('type="range"') < re.search(r'<img [^>]*src="data:image/png', page).start()
    assert "application/vnd.jupyter.widget-state+json" in page, "the widget state is kept"


def test_html_escapes_every_embedded_string():
    nb = _widget_nb()
    nb.cells.append(new_code_cell(f"name = {EVIL!r}", outputs=[
        new_output("stream", name="stdout", text=EVIL),
        new_output("execute_result", data={"text/plain": EVIL}, execution_count=1),
        new_output("error", ename="ValueError", evalue=EVIL, traceback=[EVIL])]))
    page = report.to_html(nb, EVIL)
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert" in page


def test_index_escapes_scenario_strings(tmp_path):
    spec = tmp_path / "evil.toml"
    spec.write_text(f'name = {EVIL!r}\ncommand = "vllm serve m --served-model-name {EVIL.replace(chr(34), "")}"\n')
    page = report.index_html([report.Page(EVIL + ".ipynb", EVIL, "", 1.0, EVIL, EVIL)], report.parameters(str(spec)),
                             "0.20.2", 1.0)
    assert "<script>alert" not in page and "<img src=x" not in page


def test_secrets_are_redacted(monkeypatch):
    token = "hf_" + "Qx7w" * 9
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "correct-horse-battery")
    nb = _nb(_params_cell(), new_code_cell("import os", outputs=[
        new_output("stream", name="stdout",
                   text=f"token {token} pw correct-horse-battery key=sk-" + "b" * 24 + " OPENAI_API_KEY=abcdefgh12\n")]))
    page = report.to_html(nb, "t")
    for secret in ("Qx7w", "correct-horse-battery", "b" * 24, "abcdefgh12"):
        assert secret not in page, secret
    assert report.REDACTED in page


# --- failures ----------------------------------------------------------------------------------------

def test_a_failing_cell_fails_the_build_naming_notebook_and_cell(tmp_path, scenario_name):
    src = tmp_path / "notebooks"
    src.mkdir()
    nb = _nb(new_markdown_cell("# Broken"), _params_cell(), new_code_cell("x = 1"), new_code_cell("1 / 0"))
    nbformat.write(nb, src / "01-broken.ipynb")
    nbformat.write(_nb(new_markdown_cell("# Fine"), _params_cell(), new_code_cell("print(2)")), src / "02-fine.ipynb")
    with pytest.raises(report.ReportError) as e:
        report.build(scenario_name, out=tmp_path / "out", source=src)
    assert str(e.value) == "01-broken.ipynb, cell 4 (id t-3): ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in (tmp_path / "out" / "01-broken.html").read_text()
    assert "02-fine.html" in (tmp_path / "out" / "index.html").read_text()


def test_live_stores_are_those_written_by_the_same_vllm(tmp_path):
    import json

    for name, version in (("a/live.jsonl", "0.20.2"), ("b.jsonl", "0.10.1.1"), ("c.jsonl", None)):
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        rec = {"type": "engine", "run": "r", "engine_id": "e"}
        if version:
            rec["info"] = {"vllm": version}
        p.write_text(json.dumps(rec) + "\n")
    assert report.live_stores("0.20.2", tmp_path) == [tmp_path / "a/live.jsonl"]
    assert report.live_stores("0.10.1.1", tmp_path) == [tmp_path / "b.jsonl"]


@pytest.mark.skipif(not compat.installed(), reason="needs vLLM")
def test_a_notebooks_answer_is_kept_and_a_changed_question_computed_afresh(scenario, tmp_path, monkeypatch):
    """report.kept: what a notebook asks comes back as computed (a DataFrame as it was), from the cache the
    second time, and afresh when the scenario or an argument changes."""
    import pandas as pd

    from diaglib.predict.dispatch import dispatch_table

    monkeypatch.setenv("DIAGLIB_CACHE_DIR", str(tmp_path))
    calls = []

    def table(sc, counts):
        calls.append(counts)
        return dispatch_table(sc, counts)

    first = report.kept(table, scenario, [8191, 8192])
    pd.testing.assert_frame_equal(first, dispatch_table(scenario, [8191, 8192]))
    pd.testing.assert_frame_equal(report.kept(table, scenario, [8191, 8192]), first)
    assert len(calls) == 1
    report.kept(table, scenario, [8190])
    report.kept(table, scenario.derive("--max-num-batched-tokens", "16384"), [8191, 8192])
    assert len(calls) == 3
