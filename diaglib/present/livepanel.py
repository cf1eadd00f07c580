"""The live sweep panel: token counts x knob settings run on this host's GPU, drawn as a heatmap as results arrive.

Each knob setting is one engine and each token count one crash-isolated probe (diaglib.live.livesweep); every
result is appended to the store first, so Run after a Stop or a crash continues where the store ends.
Without a GPU, Run is disabled and the panel shows what the store holds for the chosen lengths and knobs.
Knobs are written ``name=v1,v2; name2=...`` (each part as ``diaglib sweep --knob``). Errors become the
status line; the panel never raises.
"""
from __future__ import annotations

import functools
import io
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import DiagError
from ..live import livesweep
from ..paths import ROOT

REDRAW_S = 0.5  # while results stream in, the heatmap is redrawn at most this often


@dataclass(frozen=True)
class Job:
    """What the controls ask for, parsed and checked by vLLM."""

    lengths: tuple[int, ...]
    knobs: dict
    planted: int | None
    prefix: str
    labels: tuple[str, ...]


def parse_knobs(text: str) -> dict[str, list[str]]:
    """``"switches=none,cudagraph-off; max_num_seqs=64,128"`` -> {name: values}; empty text: no knobs."""
    from ..predict.schedule import parse_knob

    return dict(parse_knob(part) for part in text.split(";") if part.strip())


class LivePanel:
    """Controls, Run/Stop, a progress bar, a status line and the heatmap (an Image widget).

    ``store``: the live record store (relative paths are from the project root). ``planted``: run the
    rehearsal probe (diaglib.live.probe.in_forward) with its fault at that many tokens, under its own run
    names. ``engine`` / ``make_probe``: passed to livesweep.stream (an engine given enables Run without a
    GPU; ``make_probe`` replaces the plain or planted probe).
    """

    def __init__(self, sc, *, store: str | Path, lengths: str = "8190-8194", knobs: str = "switches=none,cudagraph-off",
                 planted: int | None = None, weights: str = "auto", engine=None, make_probe=None):
        import ipywidgets as w

        from ..live.observe import gpu_count

        self.sc, self.weights, self.engine, self.make_probe = sc, weights, engine, make_probe
        self.store = Path(store) if Path(store).is_absolute() else ROOT / store
        self.can_run = engine is not None or gpu_count() > 0
        self.rows: list[dict] = []
        self.grid = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dirty = False
        self._draw_lock = threading.Lock()
        style = {"description_width": "initial"}
        self.controls = {
            "lengths": w.Text(lengths, description="token counts", continuous_update=False, style=style,
                              layout=w.Layout(width="280px")),
            "knobs": w.Text(knobs, description="knobs", continuous_update=False, style=style,
                            layout=w.Layout(width="560px")),
            "planted": w.Checkbox(planted is not None, description="planted rehearsal fault at N tokens",
                                  indent=False, layout=w.Layout(width="250px")),
            "planted_at": w.IntText(8192 if planted is None else planted, description="N", style=style,
                                    layout=w.Layout(width="130px")),
        }
        self.run_button = w.Button(description="Run", button_style="primary", disabled=not self.can_run)
        self.stop_button = w.Button(description="Stop", disabled=True)
        self.bar = w.IntProgress(0, min=0, max=1, description="probes", style=style)
        self.status = w.HTML()
        # An Image, not an Output: the PNG travels as widget state (Output stalls headless runs)
        self.image = w.Image(format="png", layout=w.Layout(width="900px"))
        c = self.controls
        self.widget = w.VBox([w.HBox([c["lengths"], c["knobs"]]),
                              w.HBox([c["planted"], c["planted_at"], self.run_button, self.stop_button, self.bar]),
                              self.status, self.image])
        self.run_button.on_click(lambda _b: self.run())
        self.stop_button.on_click(lambda _b: self.stop())
        for ctl in c.values():
            ctl.observe(lambda _change: self.refresh(), names="value")
        self.refresh()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def job(self) -> Job:
        """The controls' sweep (DiagError for bad lengths or knobs, or a setting vLLM rejects)."""
        from ..live.probe import parse_lengths

        c = self.controls
        knobs = parse_knobs(c["knobs"].value)
        planted = c["planted_at"].value if c["planted"].value else None
        if planted is not None and planted < 1:
            raise DiagError(f"the planted fault needs N >= 1 tokens, not {planted}")
        return Job(tuple(parse_lengths(c["lengths"].value)), knobs, planted, livesweep.prefix(self.sc, planted),
                   tuple(s.label for s in livesweep.settings(self.sc, knobs)))

    def refresh(self) -> None:
        """Show what the store holds for the controls' sweep; runs nothing (ignored while a sweep runs)."""
        if self.running:
            return
        try:
            job = self.job()
            self.rows = livesweep.stored(self.sc, job.lengths, job.knobs, store_path=self.store, prefix=job.prefix)
            self._draw(job)
        except Exception as e:  # noqa: BLE001 - shown, never raised
            self._say(str(e), error=True)
            return
        done, total = livesweep.progress(self.grid)
        text = (f"{done} of {total} probes stored in {self._where()}" if self.rows
                else f"no stored results in {self._where()} for these settings")
        self._say(text + ("" if self.can_run else "; no GPU on this host: Run is disabled"))

    def run(self) -> None:
        """Start the sweep in a worker thread (the Run button); probes the store already holds are not rerun."""
        if self.running or not self.can_run:
            return
        try:
            job = self.job()
        except Exception as e:  # noqa: BLE001
            self._say(str(e), error=True)
            return
        self._stop = threading.Event()
        self.rows = []
        self._busy(True)
        self._say(f"starting: {len(job.labels)} engine(s) x {len(job.lengths)} probes ...")
        self._thread = threading.Thread(target=self._work, args=(job,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Start no new probe or engine (the Stop button); the running probe finishes and is stored."""
        self._stop.set()
        if self.running:
            self._say("stopping after the running probe ...")

    def wait(self, timeout: float | None = None) -> None:
        """Block until a running sweep ends (for scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _work(self, job: Job) -> None:
        from ..live.probe import in_forward

        make = self.make_probe or (functools.partial(in_forward, at=job.planted) if job.planted is not None else None)
        wanted, ended = set(job.lengths), threading.Event()
        painter = threading.Thread(target=self._paint, args=(job, ended), daemon=True)
        painter.start()
        try:
            for row in livesweep.stream(self.sc, job.lengths, job.knobs, store_path=self.store, prefix=job.prefix,
                                        weights=self.weights, engine=self.engine, make_probe=make, stop=self._stop):
                if row["tokens"] in wanted:
                    self.rows.append(row)
                    self._dirty = True
            outcome, error = ("stopped" if self._stop.is_set() else "finished"), False
        except Exception as e:  # noqa: BLE001 - shown, never raised
            outcome, error = f"failed: {e}", True
        finally:
            ended.set()
            painter.join()
            self._draw(job)
            self._busy(False)
        done, total = livesweep.progress(self.grid)
        self._say(f"{outcome}: {done} of {total} probes in {self._where()}", error=error)

    def _paint(self, job: Job, ended: threading.Event) -> None:
        while not ended.wait(REDRAW_S):
            if self._dirty:
                self._dirty = False
                self._draw(job)
                last = self.rows[-1]
                done, total = livesweep.progress(self.grid)
                state = "stopping" if self._stop.is_set() else "running"
                self._say(f"{state}: {done} of {total} probes; last: {last['setting']} at {last['tokens']:,} tokens: "
                          f"{last['outcome']}")

    def _draw(self, job: Job) -> None:
        from . import plots

        with self._draw_lock:
            grid = livesweep.heatmap_frame(list(self.rows), job.lengths, job.labels)
            title = (f"Live sweep: {len(job.labels)} engine setting(s) x {len(job.lengths)} token counts"
                     + (f", planted fault at {job.planted:,} tokens" if job.planted is not None else ""))
            buf = io.BytesIO()
            plots.live_heatmap(grid, title=title).savefig(buf, format="png")
            self.grid = grid
            done, total = livesweep.progress(grid)
            self.bar.max, self.bar.value = max(total, 1), done
            self.image.value = buf.getvalue()

    def _busy(self, on: bool) -> None:
        for ctl in self.controls.values():
            ctl.disabled = on
        self.run_button.disabled = on or not self.can_run
        self.stop_button.disabled = not on

    def _where(self) -> str:
        return str(self.store.relative_to(ROOT) if self.store.is_relative_to(ROOT) else self.store)

    def _say(self, text: str, error: bool = False) -> None:
        from .widgets import status_html

        self.status.value = status_html(text, error)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def panel(sc, **kw) -> LivePanel:
    """The live sweep panel for a scenario (keywords: LivePanel's), showing what the store already holds."""
    return LivePanel(sc, **kw)
