"""Scenario resolution goes through vLLM's own parser and config code, and bad input fails clearly."""
from __future__ import annotations

import pytest

from diaglib import compat
from diaglib import scenario as scn
from diaglib.errors import DiagError
from diaglib.gpus import gpu_spec

pytestmark = pytest.mark.contract

SEED_CMD = "vllm serve zai-org/GLM-4.6-FP8 --enable-chunked-prefill --max-num-batched-tokens 8192 -tp 8"


def test_scenario_file_names_command_gpu_and_version(scenario, scenario_name):
    data = scn.read_scenario_file(scn.find_scenario(scenario_name))
    assert scenario.command == data["command"] == SEED_CMD
    assert scenario.gpu.name == data["gpu"]["name"] and scenario.gpu.count == data["gpu"]["count"]
    assert scenario.gpu.memory_mib == data["gpu"]["memory_mib"]
    assert "vllm" not in data  # the default scenario is answered by the vLLM installed here
    assert scenario.vllm_version == compat.installed() and scenario.vllm_why == "installed in this environment"
    assert (scenario.model_dir / "config.json").is_file()


def test_serve_parser_path_equals_vllm_engine_args(scenario):
    """Our `vllm serve` parsing yields the VllmConfig vLLM builds from the same settings directly."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    direct = AsyncEngineArgs(model=str(scenario.model_dir), enable_chunked_prefill=True,
                             max_num_batched_tokens=8192, tensor_parallel_size=8,
                             served_model_name=["zai-org/GLM-4.6-FP8"]).create_engine_config(
        usage_context=UsageContext.OPENAI_API_SERVER)
    ours = scenario.vllm_config
    for section in ("scheduler_config", "cache_config", "parallel_config"):
        for key in ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill", "async_scheduling",
                    "block_size", "gpu_memory_utilization", "enable_prefix_caching",
                    "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if hasattr(getattr(direct, section), key):
                assert getattr(getattr(ours, section), key) == getattr(getattr(direct, section), key), key
    assert compat.compilation_summary(ours) == compat.compilation_summary(direct)


def test_compilation_summary_reads_vllm_objects(scenario):
    cc = scenario.vllm_config.compilation_config
    s = compat.compilation_summary(scenario.vllm_config)
    assert s["cudagraph_capture_sizes"] == sorted(cc.cudagraph_capture_sizes)
    if hasattr(cc, "cudagraph_mode"):
        assert s["cudagraph_mode"] == cc.cudagraph_mode.name
    assert s["max_cudagraph_capture_size"] == max(cc.cudagraph_capture_sizes)
    # The compile ranges tile 1..max_num_batched_tokens without gaps.
    mnbt = scenario.vllm_config.scheduler_config.max_num_batched_tokens
    ranges = s["compile_ranges"]
    assert ranges[0][0] == 1 and ranges[-1][1] == mnbt
    assert all(b + 1 == c for (_, b), (c, _) in zip(ranges, ranges[1:]))


def test_what_if_gpu_reaches_vllm_platform(scenario):
    from vllm.platforms import current_platform

    if not scenario.simulated:
        pytest.skip("a real GPU answers here")
    assert current_platform.get_device_name() == "NVIDIA H20"
    assert current_platform.get_device_capability().to_int() == 90
    assert current_platform.get_device_total_memory() == scenario.gpu.memory_bytes
    h200 = scn.load(cmd=SEED_CMD, gpu="NVIDIA H200")
    assert current_platform.get_device_name() == "NVIDIA H200" and h200.gpu.memory_mib == 143771
    scn.load(cmd=SEED_CMD, gpu="NVIDIA H20")  # leave the session's GPU as it was


def test_other_gpu_takes_its_own_memory_not_the_files(scenario_name):
    assert scn.load(scenario_name, gpu="NVIDIA H200").gpu.memory_mib == gpu_spec("NVIDIA H200").memory_mib
    scn.load(scenario_name)  # leave the session's GPU as it was


def test_derive_appends_flags_and_vllm_re_resolves(scenario):
    eager = scenario.derive("--enforce-eager")
    assert eager.vllm_config.model_config.enforce_eager
    assert compat.compilation_summary(eager.vllm_config)["cudagraph_mode"] == "NONE"
    assert scenario.derive("--max-num-batched-tokens", "8191").vllm_config.scheduler_config.max_num_batched_tokens == 8191


@pytest.mark.parametrize("cmd, gpu, message", [
    (SEED_CMD + " --max-num-batched-tokenz 8192", None, "unknown serve flag: --max-num-batched-tokenz (did you mean --max-num-batched-tokens?)"),
    (SEED_CMD + " --frobnicate", None, "unknown serve flag: --frobnicate"),
    (SEED_CMD.replace("-tp 8", "-tp 16"), None, "needs 16 GPUs, but the scenario has 8 x NVIDIA H20"),
    (SEED_CMD + " --gpu-memory-utilization 1.5", None, "vLLM rejected the configuration"),
    (SEED_CMD + " -tp abc", None, "invalid int value: 'abc'"),
    ("vllm serve /nonexistent/model-dir", None, "no local folder found"),
    ("vllm bench latency", None, "expected a `vllm serve MODEL [flags]` command"),
    ("vllm serve 'unclosed", None, "cannot split the serve command"),
    (SEED_CMD, "NVIDIA Z100", "unknown GPU 'NVIDIA Z100'"),
])
def test_bad_input_is_one_clear_message(scenario, cmd, gpu, message):
    with pytest.raises(DiagError) as e:
        scn.load(cmd=cmd, gpu=gpu)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_missing_model_folder_is_said_before_vllm_is_imported(tmp_path):
    """The folder check needs no vLLM: a mistyped path answers in a blink, not after vLLM's import."""
    import subprocess
    import sys

    code = ("import sys\nfrom diaglib import scenario\nfrom diaglib.errors import DiagError\n"
            f"try:\n    scenario.load(cmd='vllm serve {tmp_path / 'nothing-here'} -tp 8')\n"
            "except DiagError as e:\n    print(e)\nprint('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120).stdout
    assert "no local folder found" in out
    assert out.split()[-1] == "False"


def test_model_folder_problems(scenario, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiagError, match="has no config.json"):
        scn.load(cmd=f"vllm serve {empty}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": [')
    with pytest.raises(DiagError, match="config.json: malformed JSON"):
        scn.load(cmd=f"vllm serve {bad}")
    (bad / "config.json").write_bytes(bytes(range(128, 256)))
    with pytest.raises(DiagError, match="config.json: not UTF-8 text"):
        scn.load(cmd=f"vllm serve {bad}")
    (bad / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(DiagError, match="config.json: the top level is a JSON list"):
        scn.load(cmd=f"vllm serve {bad}")


def test_scenario_file_problems(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text('command = "vllm serve x\n')
    with pytest.raises(DiagError, match="malformed scenario file"):
        scn.load(broken)
    nocmd = tmp_path / "nocmd.toml"
    nocmd.write_text('name = "x"\n')
    with pytest.raises(DiagError, match="needs a `command"):
        scn.load(nocmd)
    with pytest.raises(DiagError, match="scenario 'no-such-scenario' not found"):
        scn.load("no-such-scenario")


def test_other_vllm_version_is_refused_in_process(tmp_path):
    other = next(v for v in compat.CI if v != compat.installed())
    f = tmp_path / "other.toml"
    f.write_text(f'command = "{SEED_CMD}"\nvllm = "{other}"\n')
    with pytest.raises(DiagError, match=f"the scenario file names vLLM {other}, but this environment has vLLM"):
        scn.load(f)


def test_gpu_catalog_lookup_is_forgiving_about_prefix_and_case():
    assert gpu_spec("h200").name == "NVIDIA H200"
    assert gpu_spec("NVIDIA H20", 8).count == 8
    with pytest.raises(DiagError, match="at least 1"):
        gpu_spec("H20", 0)
