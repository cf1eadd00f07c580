"""The configuration side of diaglib.compat against the installed vLLM's own objects, on the seed scenario and
on a dense model; and how a release lacking an API fails (one line naming it, never a traceback)."""
from __future__ import annotations

import pytest

from diaglib import compat
from diaglib.compat import detect
from diaglib.errors import DiagError

pytestmark = pytest.mark.contract

DENSE = "vllm serve data/models/Llama-3.1-8B-Instruct --max-num-batched-tokens 8192"


@pytest.fixture(scope="module")
def dense():
    """A dense model at TP 1 on one H200, resolved by the installed vLLM."""
    from diaglib.scenario import load

    sc = load(cmd=DENSE, gpu="NVIDIA H200", gpu_count=1)
    yield sc
    load()  # leave the session's what-if GPU as the seed scenario has it


# --- detection helpers ---------------------------------------------------------------

def test_call_passes_only_what_the_signature_takes():
    def f(a, b=2):
        return a, b

    for _ in range(2):  # the second time from the arguments' shape bound once; a refusal is never kept
        assert detect.call("f", f, 1, b=3, gone=4) == (1, 3)
        with pytest.raises(compat.VllmApiMissing, match=r"^vLLM .*'s f does not take what diaglib gives: "
                                                        r"missing a required argument: 'a'$"):
            detect.call("f", f, b=3)


def test_call_follows_kwargs_passed_on_to_a_base():
    """A subclass whose __init__ takes **kwargs (AsyncScheduler) accepts only what its base's __init__ takes."""
    class Base:
        def __init__(self, a, b=1):
            self.got = (a, b)

    class Passing(Base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    assert detect.call("Passing", Passing, a=1, b=2, newer_only=3).got == (1, 2)

    from typing import NamedTuple

    class Descriptor(NamedTuple):  # like 0.10's BatchDescriptor: no has_lora yet
        num_tokens: int
        uniform_decode: bool = False

    assert detect.call("Descriptor", Descriptor, num_tokens=8, uniform_decode=True, has_lora=False) == (8, True)


def test_first_names_every_spelling_it_looked_for(scenario):  # (vLLM is imported after the what-if GPU)
    with pytest.raises(compat.VllmApiMissing) as e:
        detect.first("a frobnicator", "vllm.nope:Frob", "vllm.config:NoSuchThing")
    assert str(e.value) == (f"vLLM {compat.installed()} has no a frobnicator "
                            "(looked for vllm.nope:Frob, vllm.config:NoSuchThing)")
    assert isinstance(e.value, DiagError)


def test_a_release_without_known_kv_sizing_fails_in_one_line(scenario, monkeypatch):
    from vllm.v1.core import kv_cache_utils as ku

    for name in ("get_kv_cache_configs", "get_kv_cache_config"):
        monkeypatch.delattr(ku, name, raising=False)
    if detect.has("vllm.v1.core.kv_cache_planning"):
        from vllm.v1.core import kv_cache_planning as kp

        monkeypatch.delattr(kp, "get_kv_cache_configs", raising=False)
    detect.has.cache_clear()
    try:
        with pytest.raises(compat.VllmApiMissing, match=r"has no KV-cache sizing \(looked for "
                                                        r"vllm.v1.core.kv_cache_utils:get_kv_cache_config\)$"):
            compat.kv_cache_config(compat.private_config(scenario.vllm_config), 20 << 30)
    finally:
        detect.has.cache_clear()


# --- compile and graph configuration ------------------------------------------------------------------

@pytest.mark.parametrize("which", ["scenario", "dense"])
def test_compilation_summary_is_vllms(request, which):
    sc = request.getfixturevalue(which)
    cfg = sc.vllm_config
    cc = cfg.compilation_config
    s = compat.compilation_summary(cfg)
    assert s["cudagraph_capture_sizes"] == sorted(cc.cudagraph_capture_sizes)
    assert s["max_cudagraph_capture_size"] == max(cc.cudagraph_capture_sizes)
    mode = getattr(cc, "mode", None) if "mode" in detect.fields("vllm.config:CompilationConfig") else None
    if mode is not None:
        assert s["compile_mode"] == mode.name
    else:
        assert s["compile_mode"].endswith(f"(level {cc.level})")
    if detect.has("vllm.config:CompilationConfig.get_compile_ranges"):
        assert s["compile_ranges"] == [(r.start, r.end) for r in cc.get_compile_ranges()]
    # Either way the ranges tile 1..max_num_batched_tokens: the budget is the last range's end.
    ranges = s["compile_ranges"]
    assert ranges[0][0] == 1 and ranges[-1][1] == cfg.scheduler_config.max_num_batched_tokens
    assert all(b + 1 == c for (_, b), (c, _) in zip(ranges, ranges[1:]))


def test_capture_size_flags_reach_vllms_config(scenario):
    sizes = scenario.derive(compat.capture_sizes_flag(), "4", "16").vllm_config.compilation_config
    assert sorted(sizes.cudagraph_capture_sizes) == [4, 16]
    raised = scenario.derive(*compat.max_capture_size_flags("1024")).vllm_config
    assert compat.compilation_summary(raised)["max_cudagraph_capture_size"] == 1024


def test_model_runner_is_the_one_vllm_builds(scenario, dense):
    for sc in (scenario, dense):
        cfg = sc.vllm_config
        want = ("V2" if cfg.use_v2_model_runner else "V1") if hasattr(type(cfg), "use_v2_model_runner") else "V1"
        assert compat.runner_kind(cfg) == want


# --- scheduler and KV cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["scenario", "dense"])
def test_scheduler_summary_is_vllms(request, which):
    sc = request.getfixturevalue(which)
    sch = sc.vllm_config.scheduler_config
    s = compat.scheduler_summary(sc.vllm_config)
    assert s["max_num_batched_tokens"] == sch.max_num_batched_tokens == 8192
    assert s["async_scheduling"] == bool(sch.async_scheduling)
    cls = compat.scheduler_class(sc.vllm_config)
    assert s["scheduler_cls"] == f"{cls.__module__}.{cls.__qualname__}"
    # vLLM's own choice: AsyncScheduler exactly when async scheduling is on.
    assert (cls.__name__ == "AsyncScheduler") == s["async_scheduling"]


@pytest.mark.parametrize("which", ["scenario", "dense"])
def test_kv_cache_config_fits_the_memory(request, which):
    sc = request.getfixturevalue(which)
    cfg = compat.private_config(sc.vllm_config)
    kv, block, hash_block = compat.kv_cache_config(cfg, 20 << 30)
    layers = cfg.model_config.get_num_layers(cfg.parallel_config)
    per_block = compat.kv_cache_spec(cfg).page_size_bytes * layers
    assert kv.num_blocks * per_block <= 20 << 30 < (kv.num_blocks + 1) * per_block
    assert block == hash_block == cfg.cache_config.block_size


def test_request_and_runner_output_are_vllms(scenario):
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    r = compat.new_request("x", [1] * 40, 3, None, "salt")
    assert isinstance(r, Request) and r.num_prompt_tokens == 40 and r.max_tokens == 3
    out = compat.runner_output(["x"], [[1]])
    assert isinstance(out, ModelRunnerOutput) and out.req_id_to_index == {"x": 0}


def test_prompt_check_is_vllms(scenario, dense):
    for sc in (scenario, dense):
        m = sc.vllm_config.model_config.max_model_len
        compat.check_prompt_len(sc.vllm_config, m - 1)
        with pytest.raises(DiagError, match=rf"^vLLM would reject this request: The decoder prompt \(length "
                                            rf"{m + 1}\) is longer than the maximum model length of {m}"):
            compat.check_prompt_len(sc.vllm_config, m + 1)


# --- the dense model end to end ----------------------------------------------------------------------

def test_dense_model_dispatch_and_trace(dense):
    from diaglib.predict.dispatch import dispatch
    from diaglib.predict.schedule import trace
    from diaglib.predict.workload import single

    sizes = compat.compilation_summary(dense.vllm_config)["cudagraph_capture_sizes"]
    d = dispatch(dense, 7)
    assert d["padded_tokens"] == min(s for s in sizes if s >= 7) and d["cudagraph_mode"] != "NONE"
    assert dispatch(dense, 8192)["cudagraph_mode"] == "NONE"
    tr = trace(dense, single(8193, output_len=2), kv_memory_bytes=20 << 30)
    assert tr.schedule()[:2] == ["a:8192P", "a:1L"]
