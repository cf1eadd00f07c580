"""The `diaglib` command as a user runs it: real processes, real exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diaglib import compat
from diaglib.errors import DiagError


def run(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "diaglib", *args], capture_output=True, text=True, timeout=600)


def test_show_json_is_what_vllm_resolved(scenario, scenario_name):
    from diaglib.predict.summarize import summarize

    p = run("show", scenario_name, "--json")
    assert p.returncode == 0, p.stderr
    shown = json.loads(p.stdout)
    assert shown == json.loads(json.dumps(summarize(scenario), default=str))
    assert shown["vllm_version"] == compat.installed()


def test_show_text_names_every_boundary_setting(scenario_name):
    p = run("show", scenario_name)
    assert p.returncode == 0, p.stderr
    for label in ("compile", "compile ranges", "cudagraph mode", "capture sizes", "splitting ops", "scheduler",
                  "KV cache", "parallel", "quantization", "attention", "MoE"):
        assert any(line.startswith(label + " ") for line in p.stdout.splitlines()), label
    assert "max_num_batched_tokens 8192" in p.stdout and "TP 8" in p.stdout


def _has_environment(version: str) -> bool:
    try:
        compat.venv_python(version)
    except DiagError:
        return False
    return True


def test_vllm_flag_hands_over_to_the_other_version():
    others = [v for v in compat.CI if v != compat.installed()]
    here = [v for v in others if _has_environment(v)]
    if not here:
        pytest.skip(f"no other CI release's environment is installed here ({', '.join(others)})")
    other = here[0]
    p = run("--vllm", other, "show", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["vllm_version"] == other


@pytest.mark.parametrize("args, message", [
    (["--vllm", "0.9.0", "show"], "vLLM 0.9.0 is not supported"),
    (["show", "--gpu", "NVIDIA Z100"], "unknown GPU 'NVIDIA Z100'"),
    (["show", "no-such-scenario"], "scenario 'no-such-scenario' not found"),
    (["show", "--cmd", "vllm serve zai-org/GLM-4.6-FP8 -tp 8 --max-num-batched-tokenz 8192"],
     "unknown serve flag: --max-num-batched-tokenz (did you mean --max-num-batched-tokens?)"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    p = run(*args)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("diaglib: error: ") and message in last
    assert "Traceback" not in p.stderr


def test_a_config_field_of_the_wrong_type_is_the_readers_one_line(scenario, tmp_path):
    """transformers (huggingface_hub's strict dataclasses on newer ones) refuses the field while vLLM reads
    the config for the command: its reason, in one line, exit 2; never an internal error."""
    cfg = json.loads((scenario.model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": "big"}))
    p = run("show", "--no-cache", "--cmd", f"vllm serve {tmp_path}")
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("diaglib: error: ") and "hidden_size" in last and "internal error" not in last
    assert "Traceback" not in p.stderr


def _raised_in_vllm(exc: BaseException, calls_through_vllm: bool = True) -> BaseException:
    """``exc`` raised from code that lives in the installed vLLM's package (compiled under its path)."""
    import vllm
    from pathlib import Path

    where = str(Path(next(iter(vllm.__path__))) / "model_executor" / "planted.py")
    scope: dict = {}
    exec(compile("def planted(e):\n    raise e\n", where if calls_through_vllm else "/elsewhere/x.py", "exec"), scope)
    try:
        scope["planted"](exc)
    except BaseException as e:  # noqa: BLE001 - the exception under test
        return e
    raise AssertionError("not raised")


def test_vllm_own_checks_and_unreadable_model_files_are_refusals():
    from diaglib.errors import vllm_refusal

    r = vllm_refusal(_raised_in_vllm(ValueError("output_size 192 is not divisible by block_n 128")))
    assert r.startswith("vLLM refused: output_size 192") and "vllm/model_executor/planted.py:2" in r
    r = vllm_refusal(_raised_in_vllm(OSError("Can't load image processor for '/m'")))
    assert r.startswith("vLLM could not read the model's files: Can't load image processor")
    assert vllm_refusal(_raised_in_vllm(OSError("disk"), calls_through_vllm=False)) is None
    assert vllm_refusal(_raised_in_vllm(KeyError("x"))) is None  # not one of vLLM's checks: diaglib's fault


def test_a_vllm_module_that_does_not_import_here_is_one_line():
    import vllm
    from pathlib import Path

    from diaglib.errors import vllm_refusal

    where = str(Path(next(iter(vllm.__path__))) / "distributed" / "planted_module.py")
    try:  # a module body using syntax of a newer Python, as vLLM 0.27.1's fd_exchange.py does on 3.11
        exec(compile("import array\nx: array.array[int] = None\nraise TypeError(\"type 'array.array' is not "
                     "subscriptable\")\n", where, "exec"), {"__name__": "planted"})
    except TypeError as e:
        r = vllm_refusal(e)
    assert r.startswith("vLLM cannot import its module vllm/distributed/planted_module.py:3 on Python ")
    assert r.endswith("TypeError: type 'array.array' is not subscriptable")
