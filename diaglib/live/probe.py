"""Crash-isolated probes: exact-length prompts (as token ids) run by a child process with a timeout.

One child engine serves probes until it faults; then a fresh child resumes with the next probe. Every
probe's classified outcome is appended to the store before the next one starts, and a re-run skips the
probes the store already holds. With several GPUs, probes are spread over them, one child per GPU.
"""
from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..errors import DiagError
from ..paths import ROOT
from ..secrets import scrub
from . import store
from .classify import classify
from .engine import EngineSpec
from .observe import NvmlTimeline, gpu_count, logged_figures


@dataclass
class Probe:
    """One probe: prompts of exact lengths arriving at scheduler steps, or a planted fault."""

    key: str
    prompts: list[int] = field(default_factory=list)
    arrivals: list[int] | None = None
    max_tokens: int | list[int] = 2
    planted: dict | None = None
    profile: bool = False
    profile_run: bool = False  # run vLLM's start-up profile run again (as the probe's first step)
    fresh: bool = False
    timeout_s: float | None = None

    def __post_init__(self):
        if not self.key or any(c.isspace() for c in self.key):
            raise DiagError(f"a probe key must be a non-empty word, got {self.key!r}")
        if any(int(n) < 1 for n in self.prompts):
            raise DiagError(f"probe {self.key}: prompt lengths must be >= 1, got {self.prompts}")
        if self.arrivals is not None and len(self.arrivals) != len(self.prompts):
            raise DiagError(f"probe {self.key}: {len(self.arrivals)} arrivals for {len(self.prompts)} prompts")
        mt = self.max_tokens if isinstance(self.max_tokens, list) else [self.max_tokens] * len(self.prompts)
        if len(mt) != len(self.prompts) or any(int(n) < 1 for n in mt):
            raise DiagError(f"probe {self.key}: max_tokens must be >= 1, one per prompt or one for all")
        if not self.prompts and not self.planted and not self.profile_run:
            raise DiagError(f"probe {self.key}: no prompts, no planted fault and no profile run")

    def as_dict(self) -> dict:
        return asdict(self)


def exact(lengths, **kw) -> list[Probe]:
    """One single-prompt probe per length (keys ``p8192`` ...)."""
    return [Probe(f"p{int(n)}", [int(n)], **kw) for n in lengths]


def batch(lengths, *, key: str | None = None, arrivals=None, **kw) -> Probe:
    """One probe of several prompts arriving together (or at ``arrivals`` steps); key like ``b8x1001+184``."""
    lengths = [int(n) for n in lengths]
    if key is None:
        parts, i = [], 0
        while i < len(lengths):
            j = i
            while j < len(lengths) and lengths[j] == lengths[i]:
                j += 1
            parts.append(f"{j - i}x{lengths[i]}" if j - i > 1 else str(lengths[i]))
            i = j
        key = "b" + "+".join(parts)
    return Probe(key, lengths, arrivals=list(arrivals) if arrivals is not None else None, **kw)


def from_workload(workload, *, key: str | None = None) -> Probe:
    """A probe replaying a diaglib.predict.workload.Workload: its prompt lengths, output lengths and arrival steps."""
    reqs = list(workload)
    if any(r.background for r in reqs):
        raise DiagError("background requests (aborted when the others finish) cannot be probed live")
    name = key or "w-" + "".join(c if c.isalnum() or c in "+-x" else "-" for c in workload.name)[:60]
    return Probe(name, [r.prompt_len for r in reqs], arrivals=[r.arrival_step for r in reqs],
                 max_tokens=[r.output_len for r in reqs])


def in_forward(n: int, at: int, **kw) -> Probe:
    """A rehearsal probe (key ``p<n>``): one prompt of ``n`` tokens, with the planted fault that fires only
    inside a forward pass of exactly ``at`` tokens and only when the engine runs with CUDA graphs on."""
    return Probe(f"p{int(n)}", [int(n)], planted={"fault": "oob_in_forward", "tokens": int(at)}, **kw)


def planted_fault(fault: str, *, key: str | None = None, timeout_s: float | None = None, fresh: bool = False,
                  **params) -> Probe:
    """A probe that runs a planted fault (diaglib.live.planted) inside the child; ``params`` go to the fault."""
    from .planted import CPU_FAULTS, GPU_FAULTS

    if fault not in CPU_FAULTS + GPU_FAULTS:
        raise DiagError(f"unknown planted fault {fault!r}; known: {', '.join(CPU_FAULTS + GPU_FAULTS)}")
    return Probe(key or f"planted-{fault}", planted={"fault": fault, **params}, timeout_s=timeout_s, fresh=fresh)


_ENGINES = itertools.count(1)  # engine ids are unique within this process (runs may share a process)


# --- one child ---------------------------------------------------------------------------------------

class _Child:
    """A probe child process, its protocol pipe and its log."""

    def __init__(self, engine: EngineSpec, gpu: int | None, log_path: Path, extra_env: dict,
                 launcher: list[str] | None = None):
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        job = tempfile.NamedTemporaryFile("w", suffix=".json", prefix="diaglib-job-", delete=False)
        json.dump({"engine": engine.as_dict()}, job)
        job.close()
        self.job = Path(job.name)
        r, w = os.pipe()
        self.env = {**os.environ, **engine.env, **extra_env, "DIAGLIB_PROTO_FD": str(w),
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if gpu is not None:
            self.env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        self.log_start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            argv = [*(launcher or []), sys.executable, "-m", "diaglib.live.child", str(self.job)]
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=(w,), env=self.env, start_new_session=True, cwd=str(ROOT))
        os.close(w)
        self.fd, self.buf, self.t0 = r, b"", time.monotonic()

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def read_log(self, start: int, limit: int = 400_000) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            data = f.read()
        return data[-limit:].decode("utf-8", "replace")

    def message(self, timeout: float) -> tuple[dict | None, bool]:
        """The next protocol message, or (None, timed_out) if the child ended or time ran out."""
        end = time.monotonic() + timeout
        while True:
            if b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                return json.loads(line), False
            left = end - time.monotonic()
            if left <= 0:
                return None, True
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.fd, 1 << 20)
                if chunk:
                    self.buf += chunk
                    continue
                self.proc.wait()
                return None, False
            if self.proc.poll() is not None:
                ready, _, _ = select.select([self.fd], [], [], 0.5)
                if not ready:
                    return None, False

    def send(self, probe: Probe) -> bool:
        try:
            self.proc.stdin.write((json.dumps(probe.as_dict()) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """Close stdin (the child leaves its loop), then kill its process group if it lingers."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._cleanup()
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.job.unlink(missing_ok=True)


# --- the runner --------------------------------------------------------------------------------------

@dataclass
class _Lane:
    """One GPU's sequence of probes and its current child."""

    gpu: int | None
    probes: list[Probe]
    child: _Child | None = None
    engine_id: str = ""
    engine_ready_s: float | None = None
    seq: int = 0


def run(probes: list[Probe], engine: EngineSpec, *, store_path: str | Path, run_name: str,
        gpus: list[int] | None = None, probe_timeout_s: float = 300, ready_timeout_s: float = 900,
        log_dir: str | Path | None = None, env: dict | None = None, max_engine_failures: int = 2,
        deadline: float | None = None, stop: threading.Event | None = None,
        launcher: list[str] | None = None) -> pd.DataFrame:
    """Run ``probes`` (skipping those the store holds for ``run_name``); returns the run's probe table.

    ``gpus``: device indices to spread over (default: all NVML sees, else one lane without a GPU).
    ``deadline``: a time.monotonic() value after which no new probe or engine is started; ``stop``: an
    event that does the same once set (a Stop button). ``launcher``: an argv prefix the child runs under
    (compute-sanitizer and its options); recorded with the engine.
    """
    keys = [p.key for p in probes]
    if len(set(keys)) != len(keys):
        raise DiagError(f"probe keys must be unique in a run: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    done = store.done_keys(store_path, run_name)
    todo = [p for p in probes if p.key not in done]
    if gpus is None:
        gpus = list(range(gpu_count())) or [None]
    lanes = [_Lane(g, todo[i::len(gpus)]) for i, g in enumerate(gpus)]
    log_dir = Path(log_dir) if log_dir else Path(store_path).parent / "logs" / run_name
    args = dict(engine=engine, store_path=Path(store_path), run_name=run_name, probe_timeout_s=probe_timeout_s,
                ready_timeout_s=ready_timeout_s, log_dir=log_dir, env=env or {},
                max_engine_failures=max_engine_failures, deadline=deadline, stop=stop, launcher=list(launcher or []))
    threads = [threading.Thread(target=_run_lane, args=(lane,), kwargs=args) for lane in lanes if lane.probes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return store.probes(store_path, run_name)


def _run_lane(lane: _Lane, *, engine, store_path, run_name, probe_timeout_s, ready_timeout_s, log_dir, env,
              max_engine_failures, deadline, stop, launcher) -> None:
    failures = 0
    try:
        for probe in lane.probes:
            if (deadline is not None and time.monotonic() > deadline) or (stop is not None and stop.is_set()):
                return
            if probe.fresh and lane.child is not None:
                lane.child.stop()
                lane.child = None
            started = lane.child is None or not lane.child.alive()
            if started:
                err = _start_engine(lane, engine, store_path, run_name, ready_timeout_s, log_dir, env, launcher)
                if err is not None:
                    failures += 1
                    _record_probe(store_path, run_name, lane, probe, err, {}, None, started=True,
                                  phase="engine_start", probe_s=None)
                    if failures >= max_engine_failures:
                        return
                    continue
            failures = 0
            _one_probe(lane, probe, store_path, run_name, probe_timeout_s, started)
    finally:
        if lane.child is not None:
            lane.child.stop()


def _start_engine(lane, engine, store_path, run_name, ready_timeout_s, log_dir, env, launcher):
    """Start a child engine; on failure return its classified outcome (and record the engine)."""
    lane.engine_id = f"{'cpu' if lane.gpu is None else f'gpu{lane.gpu}'}-{os.getpid()}-{next(_ENGINES)}"
    lane.seq = 0
    log = log_dir / f"{lane.engine_id}.log"
    t0 = time.monotonic()
    with NvmlTimeline(lane.gpu, period=0.5) as tl:
        child = _Child(engine, lane.gpu, log, env, launcher)
        msg, timed_out = child.message(ready_timeout_s)
    ready_s = round(time.monotonic() - t0, 3)
    text = child.read_log(child.log_start)
    rec = {"type": "engine", "run": run_name, "engine_id": lane.engine_id, "gpu": lane.gpu, "time": _now(),
           "pid": child.proc.pid, "ready_s": ready_s, "spec": engine.as_dict(), "logged": logged_figures(text),
           "env": store.redact_env(child.env), "launcher": scrub(" ".join(launcher)) or None, "log": str(log),
           "nvml": tl.downsampled(300)}
    if msg is not None and msg.get("event") == "ready":
        lane.child, lane.engine_ready_s = child, ready_s
        store.append(store_path, {**rec, "outcome": "ok", "child_ready_s": msg.get("ready_s"),
                                  "info": msg.get("info")})
        return None
    if timed_out:
        child.kill()
    else:
        child.stop(grace=1)
    out = classify(child.read_log(child.log_start), returncode=child.proc.returncode, timed_out=timed_out)
    store.append(store_path, {**rec, **out.as_dict(), "returncode": child.proc.returncode})
    lane.child, lane.engine_ready_s = None, None
    return out


def _one_probe(lane: _Lane, probe: Probe, store_path, run_name, probe_timeout_s, started: bool) -> None:
    child = lane.child
    lane.seq += 1
    start = child.log_size()
    t0 = time.monotonic()
    with NvmlTimeline(lane.gpu, period=0.05) as tl:
        sent = child.send(probe)
        msg, timed_out = child.message(probe.timeout_s or probe_timeout_s) if sent else (None, False)
    probe_s = round(time.monotonic() - t0, 4)
    if timed_out:
        child.kill()
    elif msg is None or msg.get("fatal"):
        try:
            child.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
    report = msg if msg and msg.get("event") == "result" else None
    rc = None if child.alive() else child.proc.returncode
    out = classify(child.read_log(start), returncode=rc, timed_out=timed_out, report=report)
    _record_probe(store_path, run_name, lane, probe, out, report or {}, tl, started=started, phase="probe",
                  probe_s=probe_s, returncode=rc)
    if not child.alive():
        child.stop(grace=0)
        lane.child = None


def _record_probe(store_path, run_name, lane, probe, out, report, tl, *, started, phase, probe_s, returncode=None):
    kernel_file = None
    if report.get("kernel_steps"):  # the per-step kernel table goes beside the store, not into it
        from . import kernels

        packed = report["kernel_steps"]
        df = pd.DataFrame(packed["data"], columns=packed["columns"])
        for c in ("grid", "block"):
            df[c] = df[c].map(lambda d: tuple(d) if d else None)
        path = kernels.write(df, kernels.kernel_path(store_path, run_name, probe.key))
        kernel_file = str(path.relative_to(Path(store_path).parent))
    store.append(store_path, {
        "type": "probe", "run": run_name, "key": probe.key, "time": _now(), "probe": probe.as_dict(),
        "gpu": lane.gpu, "engine_id": lane.engine_id, "engine_seq": lane.seq, "engine_started": started,
        "engine_ready_s": lane.engine_ready_s, "phase": phase, "probe_s": probe_s,
        "child_probe_s": report.get("probe_s"), **out.as_dict(), "returncode": returncode,
        "steps": report.get("steps"), "forwards": report.get("forwards"), "output_tokens": report.get("output_tokens"),
        "memory": report.get("memory"), "memory_snapshot": report.get("memory_snapshot"),
        "kernels": report.get("kernels"), "kernel_file": kernel_file, "runner_steps": report.get("runner_steps"),
        "kernel_error": report.get("kernel_error"),
        "child_error": scrub(report.get("message", ""))[:500] or None,
        "nvml": tl.downsampled() if tl is not None else None,
    })


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- parsing user input ------------------------------------------------------------------------------

def parse_lengths(text: str) -> list[int]:
    """``"8180-8200,16384"`` -> [8180, ..., 8200, 16384]."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise DiagError(f"bad token count {part!r}: use N or N-M, comma-separated") from None
        if a < 1 or b < a or b - a > 100_000:
            raise DiagError(f"bad token range {part!r}")
        out.extend(range(a, b + 1))
    if not out:
        raise DiagError("no token counts given")
    return out


def parse_batch(text: str) -> list[int]:
    """``"8x1001+184"`` -> [1001] * 8 + [184]."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split("+"))):
        count, _, n = part.rpartition("x")
        try:
            out += [int(n)] * (int(count) if count else 1)
        except ValueError:
            raise DiagError(f"bad batch term {part!r}: use COUNTxLEN or LEN joined by '+'") from None
    if not out or min(out) < 1:
        raise DiagError(f"bad batch {text!r}")
    return out
