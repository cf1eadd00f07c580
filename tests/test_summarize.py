"""`diaglib show`'s summary: read off vLLM's objects, stable per version (golden files, one per CI release)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from diaglib import compat
from diaglib.paths import ROOT
from diaglib.predict.summarize import config_summary, format_text, summarize

pytestmark = pytest.mark.contract

# Fields read by other parts (compat.attention, predict.layers): compared only where they can be computed.
OTHERS = ("attention_backend", "moe")


@pytest.fixture(scope="module")
def shown(scenario) -> tuple[dict, dict[str, str]]:
    """The show summary as JSON would give it, and the others' fields that cannot be computed here yet."""
    from diaglib.predict.layers import moe_backend

    s = config_summary(scenario)
    s["model"]["path"] = str(scenario.model_dir.relative_to(ROOT))
    pending = {}
    for key, read in (("attention_backend", lambda: compat.attention_backend(scenario.vllm_config)),
                      ("moe", lambda: moe_backend(scenario))):
        try:
            s[key] = read()
        except Exception as e:  # noqa: BLE001 - pending in another part; only that field is marked
            s[key], pending[key] = None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return json.loads(json.dumps(s, default=str)), pending


def _golden_file() -> Path:
    return Path(__file__).parent / "golden" / f"show-{compat.installed()}.json"


def test_summary_matches_golden_file(shown, golden, request):
    s, pending = shown
    if request.config.getoption("--update-golden") or not _golden_file().exists():
        golden(_golden_file().name, s)  # writes it, or skips / fails as the golden fixture decides
        return
    want = json.loads(_golden_file().read_text())
    config = [k for k in s if k not in OTHERS]
    assert {k: s[k] for k in config} == {k: want.get(k) for k in config}, f"differs from {_golden_file().name}"


@pytest.mark.parametrize("field", OTHERS)
def test_others_fields_match_golden_file(shown, field):
    s, pending = shown
    if field in pending:
        pytest.xfail(f"{field} pending on this vLLM: {pending[field]}")
    if not _golden_file().exists():
        pytest.skip(f"no golden file {_golden_file().name}")
    assert s[field] == json.loads(_golden_file().read_text()).get(field)


def test_summary_fields_come_from_vllm(scenario):
    from vllm.platforms import current_platform

    cfg = scenario.vllm_config
    s = config_summary(scenario)
    assert s["gpu"]["name"] == current_platform.get_device_name()
    assert s["scheduler"]["max_num_batched_tokens"] == cfg.scheduler_config.max_num_batched_tokens
    assert s["cache"]["gpu_memory_utilization"] == cfg.cache_config.gpu_memory_utilization
    assert s["parallel"]["tensor_parallel_size"] == cfg.parallel_config.tensor_parallel_size
    assert s["quantization"] == cfg.model_config.quantization
    assert s["model_runner"] == compat.runner_kind(cfg)


def test_text_lists_capture_sizes_as_runs(scenario, shown):
    text = format_text({**shown[0], "moe": None, "attention_backend": shown[0]["attention_backend"] or "?"})
    caps = sorted(scenario.vllm_config.compilation_config.cudagraph_capture_sizes)
    line = next(l for l in text.splitlines() if l.startswith("capture sizes"))
    assert f"{len(caps)} sizes, max {caps[-1]}" in line
    assert "1, 2, 4, 8.." in line
    assert next(l for l in text.splitlines() if l.startswith("model runner")).endswith(shown[0]["model_runner"])


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


def test_weights_per_gpu_are_the_meta_models_and_a_model_too_large_is_said(scenario):
    """The weights line is diaglib.predict.memory's exact per-rank bytes against vLLM's usable memory; a model
    whose one rank outgrows the GPU is flagged as vLLM's start-up failure, not left to the KV-cache line."""
    from diaglib.predict.memory import weights_total_bytes
    from diaglib.scenario import load

    s = summarize(scenario)
    assert s["weights"]["bytes_per_gpu"] == weights_total_bytes(scenario) and s["weights"]["fit"]
    assert "DOES NOT FIT" not in format_text(s)
    big = load(cmd="vllm serve data/models/Llama-3.1-70B-Instruct", gpu="NVIDIA L40S", gpu_count=1)
    s = summarize(big)
    usable = big.gpu.memory_bytes * big.vllm_config.cache_config.gpu_memory_utilization
    assert not s["weights"]["fit"] and s["weights"]["bytes_per_gpu"] > usable
    assert "DOES NOT FIT" in next(ln for ln in format_text(s).splitlines() if ln.startswith("weights"))
