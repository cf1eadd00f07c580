"""Live sweeps: exact-length probes over token counts x knob settings on the GPU, streamed as they finish.

Each knob setting is one engine (serve flags, env vars; checked with vLLM first) and one run in the live
store; the prompt lengths are its probes. ``stream`` yields a row per probe as its record reaches the
store, rows already stored first, so an interrupted sweep resumes where it stopped (``stored`` reads
them without running anything; ``prefix`` names a scenario's runs). ``heatmap_frame`` turns rows into
setting x token count, coloured by outcome (``OUTCOME_COLORS``).
Knobs: those of ``diaglib sweep`` (schedule.knob_flags) plus ``switches`` (kill-switch sets, "none" or
names joined by "&", e.g. ``switches=none,cudagraph-off,inductor-off&budget+1``).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from .. import compat
from ..errors import DiagError

OUTCOME_COLORS = {"ok": "#4caf50", "illegal_memory_access": "#d32f2f", "cuda_error": "#e57373",
                  "out_of_memory": "#ff9800", "compile_error": "#9c27b0", "timeout": "#607d8b",
                  "python_error": "#795548", "killed": "#212121", "pending": "#eeeeee"}
COLUMNS = ["setting", "tokens", "outcome", "detail", "kernel", "probe_s", "stored"]


@dataclass(frozen=True)
class Setting:
    """One knob combination: its label (``a=1 b=2``), serve flags and env vars."""

    label: str
    flags: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


def settings(sc, knobs: dict[str, list[str]]) -> list[Setting]:
    """Every combination of knob values, each resolved by vLLM (a rejected one -> DiagError naming it)."""
    from ..predict import switches as sw
    from ..predict.schedule import knob_flags

    out = []
    for combo in itertools.product(*knobs.values()) if knobs else [()]:
        flags: list[str] = []
        env: dict[str, str] = {}
        for k, v in zip(knobs, combo):
            if k == "switches":
                names = [] if v.strip() == "none" else [n.strip() for n in v.split("&")]
                f, e = sw.apply(sc, names)
                flags += f
                env.update(e)
            else:
                flags += knob_flags(k, v)
        label = " ".join(f"{k}={v}" for k, v in zip(knobs, combo)) or "base"
        with compat.with_env(env):
            try:
                sc.derive(*flags)
            except DiagError as e:
                raise DiagError(f"{label}: {e}") from None
        out.append(Setting(label, tuple(flags), tuple(sorted(env.items()))))
    return out


def run_name(prefix: str, setting: Setting) -> str:
    return f"{prefix}/{setting.label}"


def prefix(sc, planted: int | None = None) -> str:
    """The run-name prefix of a scenario's live sweeps (as ``diaglib sweep --live``): ``sweep-<digest>``;
    with a planted rehearsal fault at ``planted`` tokens ``sweep-<digest>-planted<N>``, so never mixed."""
    from .bisect import store_prefix

    base = "sweep-" + store_prefix(sc).removeprefix("bisect-")
    return base if planted is None else f"{base}-planted{int(planted)}"


def stored(sc, lengths: Iterable[int], knobs: dict[str, list[str]], *, store_path: str | Path,
           prefix: str) -> list[dict]:
    """The rows of these lengths x settings the store already holds (what ``stream`` yields first); runs nothing."""
    from . import store

    records, want = store.read(store_path), {int(n) for n in lengths}
    return [r for s in settings(sc, knobs) for r in _rows(records, run_name(prefix, s), s, stored=True)
            if r["tokens"] in want]


def _rows(records: list[dict], name: str, setting: Setting, stored: bool) -> list[dict]:
    return [{"setting": setting.label, "tokens": sum(r["probe"]["prompts"]), "outcome": r.get("outcome"),
             "detail": r.get("detail"), "kernel": r.get("kernel"), "probe_s": r.get("probe_s"), "stored": stored}
            for r in records if r.get("type") == "probe" and r.get("run") == name]


def stream(sc, lengths: Iterable[int], knobs: dict[str, list[str]], *, store_path: str | Path, prefix: str,
           weights: str = "auto", gpus: list[int] | None = None, probe_timeout_s: float = 600,
           ready_timeout_s: float = 1800, poll_s: float = 0.5, engine=None, make_probe=None,
           stop: threading.Event | None = None) -> Iterator[dict]:
    """Yield one row per probe (COLUMNS) as it finishes, settings one after another; resumable.

    ``engine``: an EngineSpec to use instead of planning one from the scenario (its flags get the
    setting's appended); ``make_probe(tokens) -> Probe`` (key ``p<tokens>``): instead of one plain prompt,
    e.g. a planted fault (``functools.partial(probe.in_forward, at=8192)``). ``stop``: once set, no new
    probe or engine starts (the running probe finishes) and later settings yield only their stored rows.
    """
    from . import probe, store
    from .engine import plan
    from .observe import gpu_count

    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise DiagError("a live sweep needs prompt lengths >= 1")
    table = settings(sc, knobs)
    for setting in table:
        name = run_name(prefix, setting)
        have = _rows(store.read(store_path), name, setting, stored=True)
        yield from have
        if {r["tokens"] for r in have} >= set(lengths) or (stop is not None and stop.is_set()):
            continue
        if engine is None:
            spec = plan(sc.command, models=sc.models, gpus=len(gpus) if gpus else max(gpu_count(), 1),
                        flags=list(setting.flags), weights=weights)
        else:
            spec = dataclasses.replace(engine, argv=list(engine.argv) + list(setting.flags), env=dict(engine.env))
        spec.env.update(dict(setting.env))
        errors: list[BaseException] = []

        def work(spec=spec, name=name):
            try:
                probes = [make_probe(n) for n in lengths] if make_probe else probe.exact(lengths)
                probe.run(probes, spec, store_path=store_path, run_name=name, gpus=gpus,
                          probe_timeout_s=probe_timeout_s, ready_timeout_s=ready_timeout_s, stop=stop)
            except BaseException as e:  # noqa: BLE001 - re-raised in the generator's thread
                errors.append(e)

        offset = Path(store_path).stat().st_size if Path(store_path).exists() else 0
        t = threading.Thread(target=work, daemon=True)
        t.start()
        while True:
            alive = t.is_alive()
            new, offset = _tail(store_path, offset)
            yield from _rows(new, name, setting, stored=False)
            if not alive:
                break
            time.sleep(poll_s)
        if errors:
            raise errors[0]


def recorded(store_path: str | Path, planted: int | None = None) -> list[dict]:
    """Rows (COLUMNS) of every live sweep a store holds, setting = its run's label, read without vLLM (records
    made elsewhere, by another vLLM); ``planted``: the rehearsal sweeps with their fault at that many tokens."""
    from ..paths import ROOT
    from . import store

    path = Path(store_path) if Path(store_path).is_absolute() else ROOT / store_path
    run = re.compile(r"^sweep-[0-9a-f]+" + (f"-planted{int(planted)}" if planted else "") + r"/(.+)$")
    out = []
    for r in store.read(path):
        m = run.match(r.get("run", "")) if r.get("type") == "probe" else None
        if m:
            out += _rows([r], r["run"], Setting(m.group(1), (), ()), stored=True)
    return out


def _tail(path: str | Path, offset: int) -> tuple[list[dict], int]:
    """Complete records appended to the store after byte ``offset``, and the offset after them."""
    p = Path(path)
    if not p.exists():
        return [], offset
    with open(p, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end


def heatmap_frame(rows: Iterable[dict] | pd.DataFrame, lengths: Iterable[int] | None = None,
                  labels: Iterable[str] | None = None) -> pd.DataFrame:
    """Setting x token count -> outcome ("pending" where no result yet); the last result of a cell wins."""
    df = pd.DataFrame(list(rows) if not isinstance(rows, pd.DataFrame) else rows, columns=COLUMNS)
    cols = sorted(set(lengths or []) | set(df.tokens))
    idx = list(dict.fromkeys(list(labels or []) + list(df.setting)))
    grid = pd.DataFrame("pending", index=pd.Index(idx, name="setting"), columns=pd.Index(cols, name="tokens"))
    for r in df.itertuples():
        grid.loc[r.setting, r.tokens] = r.outcome
    return grid


def progress(grid: pd.DataFrame) -> tuple[int, int]:
    """(cells done, cells in all) of a heatmap frame."""
    return int((grid != "pending").to_numpy().sum()), int(grid.size)
