"""The what-if layer (diaglib/whatif.py): the CUDA device as vLLM sees it on a machine without one.

Each override is checked where vLLM or torch would touch the device: allocations, streams and graphs,
device and memory queries (torch's, vLLM's platform's, Triton's driver), pinned memory through vLLM's own
platform method, the model registry's inspection, and the memoised answers forgotten on a GPU switch.
"""
from __future__ import annotations

import os

import pytest
import torch

from diaglib import whatif
from diaglib.gpus import gpu_spec

H100, B200 = gpu_spec("NVIDIA H100 80GB HBM3", 8), gpu_spec("NVIDIA B200", 8)


@pytest.fixture(scope="module", autouse=True)
def what_if_h100():
    """vLLM imported behind the what-if layer, answering for an H100; the GPU active before is put back."""
    from diaglib.scenario import prepare_vllm

    if not prepare_vllm(H100):
        pytest.skip("a real GPU is present: nothing is faked")
    before = whatif.active_gpu()
    whatif.activate(H100)
    yield
    whatif.activate(before)


def test_allocations_on_cuda_are_meta_tensors():
    assert torch.zeros(4, device="cuda").device.type == "meta"
    assert torch.empty(2, 3, device=torch.device("cuda", 1)).device.type == "meta"
    assert torch.ones(3).cuda().device.type == "meta"
    assert torch.ones(3).to("cuda").device.type == "meta"
    assert torch.ones(3).to(device="cuda:0", dtype=torch.float16).dtype == torch.float16
    cpu = torch.ones(3)
    assert cpu.to(torch.float16).device.type == "cpu"  # nothing else moves
    pinned = torch.empty(8, pin_memory=True)
    assert pinned.device.type == "cpu" and not pinned.is_pinned()


def test_streams_events_and_graphs_are_inert():
    s = torch.cuda.Stream(priority=-1)
    e = torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(s):
        s.wait_stream(torch.cuda.current_stream())
        e.record()
        s.wait_event(e)
    assert e.query() and isinstance(s, torch.cuda.Stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=torch.cuda.graph_pool_handle()):
        torch.zeros(2, device="cuda")
    g.replay()
    torch.cuda.synchronize()


def test_device_queries_answer_for_the_named_gpu():
    from vllm.platforms import current_platform

    whatif.activate(H100)  # as the module's fixture left it (a test of another module may have run between)
    assert torch.cuda.get_device_capability() == H100.capability
    assert torch.cuda.get_device_name() == H100.name == current_platform.get_device_name()
    assert torch.cuda.get_device_properties(0).multi_processor_count == H100.sms
    assert torch.cuda.mem_get_info() == (H100.memory_bytes, H100.memory_bytes)
    assert current_platform.get_device_total_memory() == H100.memory_bytes
    assert current_platform.get_device_capability().to_int() == 90
    assert torch.cuda.device_count() == H100.count == current_platform.device_count()


def test_pinned_memory_is_unavailable_through_vllms_platform():
    from vllm.platforms import current_platform

    assert current_platform.is_pin_memory_available() is False


def test_tritons_driver_answers_for_the_named_gpu():
    import triton

    target = triton.runtime.driver.active.get_current_target()
    assert (target.backend, target.arch) == ("cuda", 90)
    whatif.activate(B200)
    try:
        assert triton.runtime.driver.active.get_current_target().arch == 100
        props = triton.runtime.driver.active.utils.get_device_properties(0)
        assert props["multiprocessor_count"] == B200.sms
    finally:
        whatif.activate(H100)


def test_model_classes_are_inspected_in_this_process():
    from vllm.model_executor.models import registry

    assert registry._run_in_subprocess(os.getpid) == os.getpid()


def test_switching_gpus_forgets_vllms_memoised_answers():
    """vLLM's attention selector memoises its answer without keying on the GPU."""
    from vllm.platforms import current_platform

    from diaglib import compat
    from diaglib.compat.attention import _selector_module
    from diaglib.scenario import load

    cached = _selector_module()._cached_get_attn_backend
    sc = load(cmd="vllm serve data/models/tiny-glm-fp8", gpu=H100.name, gpu_count=1)
    compat.attention_backend_class(sc.vllm_config)
    assert cached.cache_info().currsize >= 1
    whatif.activate(B200)
    try:
        assert cached.cache_info().currsize == 0
        assert current_platform.get_device_capability().to_int() == 100
    finally:
        whatif.activate(H100)


def test_never_switched_on_where_a_real_gpu_exists(monkeypatch):
    monkeypatch.setattr(whatif, "_active", None)
    monkeypatch.setattr(whatif, "real_gpu_present", lambda: True)
    with pytest.raises(RuntimeError, match="real GPU"):
        whatif.activate(H100)
