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


def test_architecture_section_reads_the_built_layers(scenario):
    """Attention per layer kind comes off the meta model's layers; for the seed's one kind it agrees with
    vLLM's selector asked from the resolved config alone (two paths through vLLM)."""
    from diaglib.predict import layers

    s = summarize(scenario)
    arch = s["architecture"]
    backends = compat.layer_backends(layers.forward_context(scenario))
    assert sum(a["layers"] for a in arch["attention"]) == len(backends) == scenario.hf_config.num_hidden_layers
    assert {a["backend"] for a in arch["attention"]} == {b.get_name() for b in backends.values()}
    assert s["attention_backend"].startswith(compat.attention_backend_class(scenario.vllm_config).get_name())
    text = format_text(s)
    assert "attention layers" in text and "KV block size" in text
