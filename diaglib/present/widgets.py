"""The sweep panel: ipywidgets controls over a scenario's boundary knobs, redrawing its figures.

Knobs: prompt length, max_num_batched_tokens, chunked prefill, max_num_seqs, TP, GPU and vLLM version.
Each setting becomes serve flags on the scenario's command, resolved by vLLM again; the chosen prompt is
replayed through vLLM's scheduler (diaglib.predict.schedule) and so are the prompt lengths around it and around
the budget. Another vLLM version answers from its own environment (a subprocess, ~20-30 s). A rejected
setting is shown as one line in the panel; the panel itself never raises.
"""
from __future__ import annotations

import html
import io
import json
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from io import StringIO

import pandas as pd

from .. import compat
from ..errors import DiagError

TP_CHOICES = (1, 2, 4, 8, 16)
FRAMES = ("per_step", "per_request", "sweep")


@dataclass(frozen=True)
class Settings:
    """One point of the panel."""

    prompt_len: int
    max_num_batched_tokens: int
    chunked_prefill: bool
    max_num_seqs: int
    tp: int
    gpu: str
    vllm: str


def defaults(sc, prompt_len: int | None = None) -> Settings:
    """The scenario's own values (prompt length: the budget, the seed's crashing request)."""
    sch = sc.vllm_config.scheduler_config
    return Settings(prompt_len=prompt_len or sch.max_num_batched_tokens, max_num_batched_tokens=sch.max_num_batched_tokens,
                    chunked_prefill=bool(sch.enable_chunked_prefill), max_num_seqs=sch.max_num_seqs,
                    tp=sc.vllm_config.parallel_config.tensor_parallel_size, gpu=sc.gpu.name, vllm=sc.vllm_version)


def flags(s: Settings) -> list[str]:
    """The serve flags that put a scenario at these settings."""
    return ["--max-num-batched-tokens", str(s.max_num_batched_tokens),
            "--enable-chunked-prefill" if s.chunked_prefill else "--no-enable-chunked-prefill",
            "--max-num-seqs", str(s.max_num_seqs), "--tensor-parallel-size", str(s.tp)]


def scenario_for(sc, s: Settings):
    """The scenario at settings ``s`` (same command plus flags; another GPU if asked), resolved by vLLM."""
    from ..gpus import gpu_spec
    from ..scenario import from_command

    gpu = gpu_spec(s.gpu, max(sc.gpu.count, s.tp))
    command = sc.command + " " + " ".join(shlex.quote(f) for f in flags(s))
    return from_command(command, gpu=gpu, models=sc.models, name=sc.name, source=sc.source)


def lengths_around(s: Settings, span: int = 12) -> list[int]:
    """Prompt lengths swept next to the chosen one (+-span)."""
    return [n for n in range(s.prompt_len - span, s.prompt_len + span + 1) if n >= 1]


def compute(sc, s: Settings) -> dict[str, pd.DataFrame]:
    """per_step / per_request of the chosen prompt and the sweep around it, from this process's vLLM."""
    from ..predict.schedule import sweep, trace
    from ..predict.workload import single

    if s.vllm != compat.installed():
        raise DiagError(f"this process has vLLM {compat.installed()}, not {s.vllm}")
    at = scenario_for(sc, s)
    tr = trace(at, single(s.prompt_len, output_len=2))
    return {"per_step": tr.per_step, "per_request": tr.per_request,
            "sweep": sweep(at, lengths_around(s), progress=False)}


def compute_elsewhere(sc, s: Settings, timeout_s: int = 300) -> dict[str, pd.DataFrame]:
    """:func:`compute` in the project environment of vLLM ``s.vllm`` (a child process)."""
    py = compat.venv_python(s.vllm)
    job = {"command": sc.command, "models": sc.models, "name": sc.name, "gpu": sc.gpu.name,
           "gpu_count": sc.gpu.count, "settings": asdict(s)}
    r = subprocess.run([str(py), "-m", "diaglib.present.widgets"], input=json.dumps(job), capture_output=True, text=True,
                       timeout=timeout_s)
    if r.returncode != 0:
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        raise DiagError(f"vLLM {s.vllm}: {lines[-1] if lines else f'exit status {r.returncode}'}")
    data = json.loads(r.stdout)
    return {k: pd.read_json(StringIO(v), orient="table") for k, v in data.items()}


def _child() -> None:
    """`python -m diaglib.present.widgets`: a compute() job as JSON on stdin, frames as JSON on stdout."""
    import sys

    from ..gpus import gpu_spec
    from ..scenario import from_command, prepare_vllm

    job = json.loads(sys.stdin.read())
    try:
        gpu = gpu_spec(job["gpu"], job["gpu_count"])
        prepare_vllm(gpu)
        sc = from_command(job["command"], gpu=gpu, models=job["models"], name=job["name"])
        frames = compute(sc, Settings(**job["settings"]))
    except DiagError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    json.dump({k: v.astype({c: str for c in ("compile_range",) if c in v}).to_json(orient="table")
               for k, v in frames.items()}, sys.stdout)


def figures(frames: dict[str, pd.DataFrame], s: Settings) -> list:
    """The panel's figures for computed frames: the chosen prompt's steps, and the sweep around it."""
    from . import plots

    b = s.max_num_batched_tokens
    title = (f"One prompt of {s.prompt_len:,} tokens\nmnbt {b:,}, chunked prefill {'on' if s.chunked_prefill else 'off'}, "
             f"max_num_seqs {s.max_num_seqs}, TP {s.tp}, {s.gpu}, vLLM {s.vllm}")
    steps = plots.step_composition(frames["per_request"], frames["per_step"], budget=b)
    steps.axes[0].set_title(title)
    return [steps, plots.sweep_map(frames["sweep"], budget=b, title=f"Prompts of {s.prompt_len:,} +- 12 tokens, "
                                   "every step (open circle: the step holds exactly the budget)")]


class Panel:
    """The controls, a status line and the figures as images; recomputes on every change."""

    def __init__(self, sc, settings: Settings | None = None):
        import ipywidgets as w

        from ..gpus import catalog

        self.sc = sc
        s = settings or defaults(sc)
        max_len = sc.vllm_config.model_config.max_model_len
        style = {"description_width": "initial"}
        num = dict(style=style, layout=w.Layout(width="260px"), continuous_update=False)
        self.controls = {
            "prompt_len": w.BoundedIntText(s.prompt_len, min=1, max=max_len, description="prompt length", **num),
            "max_num_batched_tokens": w.BoundedIntText(s.max_num_batched_tokens, min=1, max=1 << 22,
                                                       description="max_num_batched_tokens", **num),
            "max_num_seqs": w.BoundedIntText(s.max_num_seqs, min=1, max=1 << 16, description="max_num_seqs", **num),
            "chunked_prefill": w.Checkbox(s.chunked_prefill, description="chunked prefill", indent=False,
                                          layout=w.Layout(width="150px")),
            "tp": w.Dropdown(options=sorted({*TP_CHOICES, s.tp}), value=s.tp, description="TP", style=style,
                             layout=w.Layout(width="110px")),
            "gpu": w.Dropdown(options=sorted({*catalog(), s.gpu}), value=s.gpu, description="GPU", style=style,
                              layout=w.Layout(width="280px")),
            "vllm": w.Dropdown(options=sorted({*compat.supported(), s.vllm}), value=s.vllm, description="vLLM",
                               style=style, layout=w.Layout(width="160px")),
        }
        c = self.controls
        self.status = w.HTML()
        # Image widgets, not an Output: the PNG travels as widget state (no output capture to mimic headless)
        self.images = [w.Image(format="png", layout=w.Layout(width="900px")) for _ in range(2)]
        self.widget = w.VBox([w.HBox([c["prompt_len"], c["max_num_batched_tokens"], c["max_num_seqs"]]),
                              w.HBox([c["chunked_prefill"], c["tp"], c["gpu"], c["vllm"]]),
                              self.status, *self.images])
        for ctl in c.values():
            ctl.observe(lambda _change: self.update(), names="value")
        self.update()

    @property
    def settings(self) -> Settings:
        return Settings(**{k: ctl.value for k, ctl in self.controls.items()})

    def update(self) -> None:
        """Recompute for the current settings and redraw; an error becomes the status line."""
        import matplotlib.pyplot as plt

        s = self.settings
        local = s.vllm == compat.installed()
        self._say("computing" + ("" if local else f" in vLLM {s.vllm}'s environment (about 30 s)") + " ...")
        t0 = time.monotonic()
        try:
            frames = compute(self.sc, s) if local else compute_elsewhere(self.sc, s)
        except (DiagError, subprocess.TimeoutExpired) as e:
            self._say(f"not computed: {e}", error=True)
            return
        for image, fig in zip(self.images, figures(frames, s)):
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            plt.close(fig)
            image.value = buf.getvalue()
        self._say(f"vLLM {s.vllm} answered in {time.monotonic() - t0:.1f} s")

    def _say(self, text: str, error: bool = False) -> None:
        self.status.value = status_html(text, error)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def status_html(text: str, error: bool = False) -> str:
    """A panel's status line: the text escaped, red for an error."""
    colour = "#cf222e" if error else "#555"
    return f'<span style="color:{colour}">{html.escape(text)}</span>'


def panel(sc, **overrides) -> Panel:
    """The sweep panel for a scenario, starting at its own settings (override any, e.g. prompt_len=8193)."""
    return Panel(sc, replace(defaults(sc), **overrides))


if __name__ == "__main__":
    _child()
