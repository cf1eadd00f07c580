"""The H200 rehearsal (issue 7), replayed from its committed records: a fault planted to fire only with CUDA
graphs on and only in a forward pass of exactly 8192 tokens. The bisection answers from the store without a
run, and the evidence bundle's findings are derived again from the raw step outputs the GPU wrote."""
from __future__ import annotations

import json

import pytest

from diaglib import compat
from diaglib.live import evidence as E
from diaglib.live import planted
from diaglib.paths import DATA

RECORDS = DATA / "live" / "h200-vllm-0.20.2-i7"

pytestmark = pytest.mark.skipif(compat.installed() != "0.20.2", reason="the records were made with vLLM 0.20.2")


@pytest.fixture(autouse=True, scope="module")
def _seed_gpu_after(scenario_name):
    """The rehearsal resolves for one H200; the what-if GPU is process-wide, so the seed's comes back after."""
    yield
    from diaglib.scenario import load

    load(scenario_name)


def test_bisection_names_the_graph_switch_and_the_pair_from_the_store(capsys):
    from diaglib.cli import main

    rc = main(["bisect", "rehearsal", "--planted", "8192", "--tokens", "8192", "--store",
               str(RECORDS / "live.jsonl"), "--gpus", "0", "--max-runs", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["complete"]
    assert out["minimal"] == ["cudagraph-off"] and out["implicated"] == "CUDA graphs"
    assert out["pair"] == [8191, 8192] and out["failing_high"] == 8193
    assert out["runs"] == 0 and out["known_used"] >= 10 and out["checked_by_vllm"] >= 1
    assert out["prefix"].endswith("-planted8192")


def test_plain_probes_never_answer_for_a_planted_bisection(tmp_path, capsys):
    """The planted runs live under their own prefix: without them the store cannot answer."""
    from diaglib.cli import main

    plain = tmp_path / "live.jsonl"
    plain.write_text("".join(line for line in (RECORDS / "live.jsonl").read_text().splitlines(keepends=True)
                             if "-planted8192" not in line))
    rc = main(["bisect", "rehearsal", "--planted", "8192", "--tokens", "8192", "--store", str(plain)])
    assert rc == 2 and "no result for 8192 tokens" in capsys.readouterr().err


def _steps_from_bundle() -> list[E.StepResult]:
    table = E.steps(RECORDS / "evidence.work")
    out = []
    for d in sorted((RECORDS / "evidence" / "steps").iterdir()):
        san = d / "sanitizer.txt"
        out.append(E.StepResult(table[d.name], json.loads((d / "record.json").read_text()),
                                (d / "log.txt").read_text(), sanitizer=san.read_text() if san.exists() else None))
    return out


def test_evidence_names_the_planted_kernel_from_compute_sanitizer():
    """Caching allocator off, the engine could not capture its CUDA graphs (cudaMalloc while capturing);
    memcheck with it on named the planted kernel; the blocking run's caller is the planted launch."""
    results = _steps_from_bundle()
    assert {r.step.name for r in results} == {"blocking", "trace", "sanitizer", "sanitizer-cached"}
    f = E.findings(results, RECORDS / "evidence.work")
    assert f["kernel"] == planted.KERNEL_NAME
    assert f["kernel_from"] == "compute-sanitizer memcheck with the caching allocator on"
    assert f["sanitizer_error"]["error"].startswith("Invalid __global__ write")
    by = {s["step"]: s for s in f["steps"]}
    assert "cudaErrorStreamCaptureUnsupported" in by["sanitizer"]["sanitizer_error"]["error"]
    assert by["sanitizer"]["sanitizer_error"]["kernel"] is None
    assert by["blocking"]["outcome"] == "illegal_memory_access"
    assert by["blocking"]["caller"].startswith("oob_write (planted.py:")
    assert f["input_dump"] and "8192" in f["input_dump"]


def test_committed_bundle_agrees_with_its_steps():
    summary = json.loads((RECORDS / "evidence" / "summary.json").read_text())
    again = E.findings(_steps_from_bundle(), RECORDS / "evidence.work")
    assert summary["kernel"] == again["kernel"] and summary["kernel_from"] == again["kernel_from"]
    assert summary["memory_snapshot"]["step"] == "blocking" and summary["memory_snapshot"]["events"] > 0
