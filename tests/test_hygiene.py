"""Clean output: stdout carries the answer alone (vLLM's and torch's lines go to the log, to stderr with -v);
pages show no machine paths; charts stay readable with 100 runs or 100 boundary rows; progress goes to stderr
as a bar on a terminal, as plain lines in a log, and nowhere with --json. (The built report's pages are checked
for warnings and paths in tests/test_notebooks.py.)"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from diaglib import progress  # noqa: E402
from diaglib.paths import DATA, ROOT  # noqa: E402

TINY = DATA / "models" / "tiny-glm-fp8"
VLLM_LINE = ("INFO ", "WARNING ", "DEBUG ", "NIXL", "[W ", "UserWarning", "FutureWarning")


def machine_places() -> list[str]:
    """Absolute places of this machine that no page may show."""
    places = [str(ROOT), sys.prefix, sys.base_prefix, str(Path.home()) + "/", tempfile.gettempdir() + "/"]
    host = socket.gethostname()
    return places + ([host] if len(host) >= 4 and host != "localhost" else [])


def _cli(tmp_path, *argv):
    env = {**os.environ, "DIAGLIB_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "diaglib", *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)


def test_stdout_is_the_answer_alone_and_minus_v_shows_vllms_lines(tmp_path):
    argv = ["dispatch", "--cmd", f"vllm serve {TINY} --max-num-batched-tokens 8192", "--gpu", "NVIDIA H200",
            "--gpu-count", "1", "--tokens", "8", "--json", "--no-cache"]
    quiet = _cli(tmp_path, *argv)
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads(quiet.stdout)[0]["num_tokens"] == 8, "stdout parses as the answer, nothing else"
    assert quiet.stderr == "", "without -v nothing of vLLM's reaches the terminal"
    log = (tmp_path / "diaglib.log").read_text()
    assert any(m in log for m in ("INFO", "WARNING")), "vLLM's lines are in the log instead"
    loud = _cli(tmp_path, "-v", *argv)
    assert loud.returncode == 0 and json.loads(loud.stdout) == json.loads(quiet.stdout)
    assert any(m in loud.stderr for m in ("INFO", "WARNING")), "-v: vLLM's own lines on stderr"


def test_an_internal_error_is_one_line_naming_it_and_the_log(tmp_path, monkeypatch, capsys):
    from diaglib import cli

    monkeypatch.setenv("DIAGLIB_CACHE_DIR", str(tmp_path))

    def broken(args):
        return {}["no such key"]

    monkeypatch.setattr(cli, "cmd_cache", broken)
    assert cli.main(["cache"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("diaglib: internal error: KeyError: 'no such key' (in test_hygiene.py:")
    assert str(tmp_path / "diaglib.log") in err and "-v shows it" in err
    assert "Traceback" in (tmp_path / "diaglib.log").read_text() and "Traceback" not in err
    assert cli.main(["-v", "cache"]) == 1
    assert "Traceback" in capsys.readouterr().err, "-v shows the traceback"


# --- pages: machine paths --------------------------------------------------------------------------------

def test_pages_replace_this_machines_paths():
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    from diaglib.present import report

    text = "\n".join(f"at {p.rstrip('/')}/x/y.py:3" for p in machine_places()) + f"\nstore {ROOT / 'data/live/a.jsonl'}"
    png = "iVBORw0KGgo/root/AAAA" + "/tmp/" + "QmCC"  # base64 may hold such runs: images stay untouched
    nb = new_notebook(cells=[new_code_cell("x", outputs=[new_output("stream", name="stderr", text=text),
                                                        new_output("display_data", data={"image/png": png})])])
    nb.cells[0].id = "c"
    page = report.to_html(nb, "t")
    for place in machine_places():
        assert place not in page.replace(png, ""), place
    assert "store data/live/a.jsonl" in page and png in page


# --- charts at scale ---------------------------------------------------------------------------------------

def _draw(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_outcome_chart_with_100_long_runs_is_readable():
    from diaglib.present import plots

    runs = [f"standin-sweep-cudagraph-off-async-off-with-a-long-descriptive-name-{i:03d}" for i in range(100)]
    probes = pd.DataFrame([{"run": r, "key": f"p{t}", "total_tokens": t,
                            "outcome": "illegal_memory_access" if (i + t) % 9 == 0 else "ok"}
                           for i, r in enumerate(runs) for t in (8191, 8192, 8193)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "constrained_layout not applied" would raise
        fig = plots.probe_outcomes(probes)
        _draw(fig)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) <= plots.MAX_ROWS and len(set(labels)) == len(labels)
    assert max(map(len, labels)) <= plots.LABEL_CHARS
    assert fig.get_size_inches()[1] <= plots.rows_height(plots.MAX_ROWS)
    assert "not drawn" in ax.get_title() and "not labelled" in ax.get_title()
    bbox = ax.get_position()
    assert bbox.width > 0.4 and bbox.height > 0.5, "the plot keeps most of the figure"


def test_boundary_map_with_100_rows_is_readable():
    from diaglib.present import plots

    df = pd.DataFrame([{"axis": ("step", "prompt", "knob")[i % 3], "tokens": 2 ** (i % 18) + i, "distance": i,
                        "kind": f"a boundary kind with a long rule name, number {i // 2}"} for i in range(200)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.boundary_map(df, budget=8192)
        _draw(fig)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == plots.MAX_ROWS and max(map(len, labels)) <= plots.LABEL_CHARS
    assert "more in the table" in fig.axes[0].get_title()


def test_short_labels_stay_distinct():
    from diaglib.present.plots import short_labels

    long = ["x" * 60 + str(i % 2) for i in range(4)]
    out = short_labels(long, 20)
    assert len(set(out)) == 4 and all(len(s) <= 20 for s in out)
    assert short_labels(["short"]) == ["short"]


# --- progress ----------------------------------------------------------------------------------------------

def test_progress_plain_lines_in_a_log_and_nothing_when_off(monkeypatch):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    log = io.StringIO()
    progress.use_stream(log)
    try:
        for _ in progress.bar(range(3), desc="sweep", unit="pt"):
            pass
        assert log.getvalue().splitlines()[-1].startswith("sweep: 3/3 pt (100%)")
        quiet = io.StringIO()
        progress.use_stream(quiet)
        list(progress.bar(range(3), desc="x", enabled=False))
        monkeypatch.setenv("DIAGLIB_PROGRESS", "0")
        list(progress.bar(range(3), desc="y"))
        assert quiet.getvalue() == ""
    finally:
        progress.use_stream(None)


def test_progress_is_a_bar_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    term = Tty()
    progress.use_stream(term)
    try:
        with progress.bar(total=2, desc="report", unit="page") as b:
            assert type(b).__module__.startswith("tqdm")
            b.update()
            b.update()
        assert "report:" in term.getvalue() and "/2 [" in term.getvalue(), "tqdm's bar, drawn on the terminal"
    finally:
        progress.use_stream(None)


@pytest.mark.parametrize("as_json", [True, False])
def test_sweep_progress_reaches_stderr_only_without_json(as_json, monkeypatch, capsys, tmp_path):
    from diaglib import cli

    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    monkeypatch.setenv("DIAGLIB_CACHE_DIR", str(tmp_path))
    argv = ["sweep", "--cmd", f"vllm serve {TINY} --max-num-batched-tokens 512", "--gpu", "NVIDIA H200",
            "--gpu-count", "1", "--lengths", "100:103"] + (["--json"] if as_json else [])
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert ("sweep: 4/4 pt" in err) != as_json
    if as_json:
        assert len(json.loads(out)) >= 4
    assert not any(m in out for m in VLLM_LINE)
