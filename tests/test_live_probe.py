"""The probe machinery on the CPU: planted faults in real child processes are classified right, each
record is on disk before the next probe, the driver survives, and a re-run resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diaglib.errors import DiagError
from diaglib.live import probe as P
from diaglib.live import store
from diaglib.live.engine import no_engine


def _run(tmp_path, probes, **kw):
    path = tmp_path / "live.jsonl"
    df = P.run(probes, no_engine(), store_path=path, run_name="t", gpus=[None], probe_timeout_s=kw.pop("timeout", 20),
               ready_timeout_s=60, log_dir=tmp_path / "logs", **kw)
    return path, df


def test_each_planted_cpu_fault_is_classified_and_the_sweep_goes_on(tmp_path):
    probes = [P.planted_fault("exit", key="warm"), P.Probe("ok1", [8]),
              P.planted_fault("raise"), P.Probe("ok2", [8]),
              P.planted_fault("segfault"), P.Probe("ok3", [8]),
              P.planted_fault("cuda_abort"), P.planted_fault("killed"),
              P.planted_fault("hang", timeout_s=3), P.Probe("ok4", [8])]
    path, df = _run(tmp_path, probes)
    got = dict(zip(df.key, df.outcome))
    assert got == {"warm": "python_error", "ok1": "ok", "planted-raise": "python_error", "ok2": "ok",
                   "planted-segfault": "killed", "ok3": "ok", "planted-cuda_abort": "illegal_memory_access",
                   "planted-killed": "killed", "planted-hang": "timeout", "ok4": "ok"}
    rows = df.set_index("key")
    assert "SIGSEGV" in rows.detail["planted-segfault"]
    assert "SIGKILL" in rows.detail["planted-killed"]
    assert "planted Python error" in rows.detail["planted-raise"]
    # a Python error keeps the engine; a crash costs a fresh one
    assert rows.engine_id["ok2"] == rows.engine_id["planted-raise"]
    assert rows.engine_id["ok3"] != rows.engine_id["planted-segfault"]
    assert bool(rows.engine_started["ok3"]) and not bool(rows.engine_started["ok2"])
    engines = store.engines(path, "t")
    assert (engines.outcome == "ok").all() and len(engines) == rows.engine_id.nunique()


def test_records_resume_and_skip_what_is_stored(tmp_path):
    path, df = _run(tmp_path, [P.Probe("a", [4]), P.Probe("b", [4])])
    assert list(df.key) == ["a", "b"]
    before = len(store.read(path))
    path, df = _run(tmp_path, [P.Probe("a", [4]), P.Probe("b", [4]), P.Probe("c", [4])])
    assert list(df.key) == ["a", "b", "c"]
    assert len([r for r in store.read(path)[before:] if r["type"] == "probe"]) == 1


_DRIVER = """
import sys
from diaglib.live import probe as P
from diaglib.live.engine import no_engine
P.run([P.Probe("first", [4]), P.planted_fault("hang", key="stuck"), P.Probe("after", [4])], no_engine(),
      store_path=sys.argv[1], run_name="k", gpus=[None], probe_timeout_s=600, log_dir=sys.argv[2])
"""


def _gone(pid: int, within: float) -> bool:
    """The process has ended (absent, or a zombie nobody reaped yet)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


def test_kill_9_of_the_driver_loses_nothing_and_a_rerun_resumes(tmp_path):
    path = tmp_path / "live.jsonl"
    drv = subprocess.Popen([sys.executable, "-c", _DRIVER, str(path), str(tmp_path / "logs")])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "first" not in store.done_keys(path, "k"):
        time.sleep(0.2)
    time.sleep(1.0)  # the hang probe is now in flight
    os.kill(drv.pid, signal.SIGKILL)
    drv.wait()
    assert store.done_keys(path, "k") == {"first"}
    with open(path, "a") as f:  # a torn line, as a writer killed mid-write would leave
        f.write('{"type": "probe", "run": "k", "ke')
    assert store.done_keys(path, "k") == {"first"}
    # the orphaned child died with its parent (PR_SET_PDEATHSIG), so it holds no GPU
    pid = store.read(path)[0]["pid"]
    assert _gone(pid, within=10)
    df = P.run([P.Probe("first", [4]), P.planted_fault("hang", key="stuck", timeout_s=2), P.Probe("after", [4])],
               no_engine(), store_path=path, run_name="k", gpus=[None], log_dir=tmp_path / "logs")
    assert dict(zip(df.key, df.outcome)) == {"first": "ok", "stuck": "timeout", "after": "ok"}


def test_engine_that_cannot_start_is_recorded_and_stops_the_lane(tmp_path):
    from diaglib.live.engine import EngineSpec

    bad = EngineSpec(kind="vllm", argv=["serve", "/nonexistent-model", "--load-format", "dummy"])
    path = tmp_path / "live.jsonl"
    df = P.run([P.Probe("x", [4]), P.Probe("y", [4]), P.Probe("z", [4])], bad, store_path=path, run_name="e",
               gpus=[None], ready_timeout_s=120, max_engine_failures=2, log_dir=tmp_path / "logs")
    assert list(df.key) == ["x", "y"]  # z is left for a re-run
    assert set(df.outcome) == {"python_error"}
    engines = store.engines(path, "e")
    assert list(engines.outcome) == ["python_error", "python_error"]


def test_bad_probe_input_is_a_diag_error():
    with pytest.raises(DiagError):
        P.Probe("has space", [4])
    with pytest.raises(DiagError):
        P.Probe("x", [0])
    with pytest.raises(DiagError):
        P.Probe("x", [4, 4], arrivals=[0])
    with pytest.raises(DiagError):
        P.Probe("x")
    with pytest.raises(DiagError):
        P.planted_fault("meltdown")
    with pytest.raises(DiagError):
        P.run([P.Probe("a", [1]), P.Probe("a", [2])], no_engine(), store_path="/tmp/x", run_name="r")


def test_lengths_and_batches_parse():
    assert P.parse_lengths("8190-8192,16384") == [8190, 8191, 8192, 16384]
    assert P.parse_batch("8x1001+184") == [1001] * 8 + [184]
    assert P.batch([1001] * 8 + [184]).key == "b8x1001+184"
    assert [p.key for p in P.exact([8191, 8192])] == ["p8191", "p8192"]
    for bad in ("", "a-b", "9-3"):
        with pytest.raises(DiagError):
            P.parse_lengths(bad)
    for bad in ("", "ax3", "0"):
        with pytest.raises(DiagError):
            P.parse_batch(bad)


def test_token_ids_stay_below_the_vocab_and_differ_between_probes():
    from diaglib.live.child import token_ids

    a = token_ids(8192, 18944, "p8192", 0)
    b = token_ids(8192, 18944, "p8193", 0)
    assert len(a) == 8192 and 1 <= min(a) and max(a) < 18944
    assert a[:16] != b[:16] and a == token_ids(8192, 18944, "p8192", 0)
    assert json.dumps(a)  # plain ints


def test_probes_spread_over_lanes_and_workloads_become_probes(tmp_path):
    from diaglib.predict import workload as W

    path = tmp_path / "live.jsonl"
    df = P.run([P.Probe(f"k{i}", [4]) for i in range(6)], no_engine(), store_path=path, run_name="m",
               gpus=[None, None], log_dir=tmp_path / "logs")
    assert sorted(df.key) == [f"k{i}" for i in range(6)] and (df.outcome == "ok").all()
    assert df.engine_id.nunique() == 2 and len(store.engines(path, "m")) == 2
    w = W.Workload((W.Req("a", 8192, 2, 0), W.Req("b", 100, 3, 2)), "two")
    p = P.from_workload(w)
    assert (p.key, p.prompts, p.arrivals, p.max_tokens) == ("w-two", [8192, 100], [0, 2], [2, 3])
    with pytest.raises(DiagError):
        P.from_workload(W.Workload((W.Req("a", 10), W.Req("d", 5, background=True)), "bg"))
    with pytest.raises(DiagError):
        P.Probe("x", [4, 4], max_tokens=[1])


def test_a_set_stop_event_starts_nothing(tmp_path):
    import threading

    stop = threading.Event()
    stop.set()
    df = P.run(P.exact([5, 6]), no_engine(), store_path=tmp_path / "s.jsonl", run_name="r", gpus=[None], stop=stop)
    assert df.empty and not (tmp_path / "s.jsonl").exists()
