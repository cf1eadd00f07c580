"""`diaglib show`'s summary: read off vLLM's objects, stable per version (golden files)."""
from __future__ import annotations

from diaglib import compat
from diaglib.paths import ROOT
from diaglib.predict.summarize import format_text, summarize


def test_summary_matches_golden_file(scenario, golden):
    s = summarize(scenario)
    s["model"]["path"] = str(scenario.model_dir.relative_to(ROOT))
    golden(f"show-{compat.installed()}.json", s)


def test_summary_fields_come_from_vllm(scenario):
    from vllm.platforms import current_platform

    cfg = scenario.vllm_config
    s = summarize(scenario)
    assert s["gpu"]["name"] == current_platform.get_device_name()
    assert s["scheduler"]["max_num_batched_tokens"] == cfg.scheduler_config.max_num_batched_tokens
    assert s["cache"]["gpu_memory_utilization"] == cfg.cache_config.gpu_memory_utilization
    assert s["parallel"]["tensor_parallel_size"] == cfg.parallel_config.tensor_parallel_size
    assert s["quantization"] == cfg.model_config.quantization


def test_text_lists_capture_sizes_as_runs(scenario):
    text = format_text(summarize(scenario))
    caps = sorted(scenario.vllm_config.compilation_config.cudagraph_capture_sizes)
    line = next(l for l in text.splitlines() if l.startswith("capture sizes"))
    assert f"{len(caps)} sizes, max {caps[-1]}" in line
    assert "1, 2, 4, 8.." in line
