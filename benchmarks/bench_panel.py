"""The sweep panel (diaglib.present.widgets): seconds per redraw after a control changes, as in a notebook.

    python benchmarks/bench_panel.py [SCENARIO]

Builds the panel once (not counted: vLLM's import, the first resolution, the KV guess), then changes one control
at a time and times each redraw: vLLM resolves the new setting, replays the prompt and the 25 lengths around it
through its scheduler, and both figures are drawn to PNG. Prints wall and CPU time per redraw.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's diaglib

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from diaglib.present import widgets  # noqa: E402
from diaglib.scenario import load  # noqa: E402

CHANGES = [("prompt_len", 8193), ("max_num_batched_tokens", 8191), ("max_num_seqs", 256), ("chunked_prefill", False),
           ("chunked_prefill", True), ("prompt_len", 20000), ("max_num_batched_tokens", 8192), ("tp", 4)]


def main() -> None:
    sc = load(sys.argv[1] if len(sys.argv) > 1 else None)
    t0 = time.perf_counter()
    panel = widgets.panel(sc)
    print(f"first draw {time.perf_counter() - t0:.2f} s (not counted): {panel.status.value}")
    walls, cpus = [], []
    for name, value in CHANGES:
        w0, c0 = time.perf_counter(), time.process_time()
        panel.controls[name].value = value
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        status = panel.status.value
        assert "answered" in status or "not computed: vLLM" in status, status  # vLLM's refusal is an answer too
        said = "answered" if "answered" in status else "vLLM refused the setting"
        print(f"{name} = {value!r}: redraw {walls[-1]:.2f} s wall, {cpus[-1]:.2f} s CPU ({said})")
    print(f"redraw: median {sorted(walls)[len(walls) // 2]:.2f} s wall, {sorted(cpus)[len(cpus) // 2]:.2f} s CPU; "
          f"worst {max(walls):.2f} s wall")


if __name__ == "__main__":
    main()
