"""The "what-if GPU" layer: make vLLM believe, on a machine without a GPU, that it runs on a named one.

Everything that fakes hardware lives here, is switched on by :func:`activate` before vLLM is imported,
and never where a real GPU exists (:func:`activate` refuses then). It fakes the CUDA device, at the lowest
level that works, never a vLLM backend or layer; what it overrides, and why:

1. ``libcuda.so.1``: vLLM's extensions (and those of the kernel packages it requires) link the driver. A
   stub library exporting exactly the driver
   entry points they import, each returning CUDA_ERROR_STUB_LIBRARY, is built once with the C compiler
   and loaded globally, so the real extensions load and their host-side checks give real answers.
2. vLLM's current platform: a subclass of vLLM's own ``NonNvmlCudaPlatform`` reporting the named GPU's
   capability, name, memory and count, full NVLink connectivity, and pinned host memory as unavailable
   (``is_pin_memory_available``: pinning needs the driver; vLLM already falls back to pageable memory).
3. torch's device queries (count, capability, name, properties, current device, free/total memory),
   which vLLM and its kernels' support checks ask directly, answer for the named GPU; setting the device,
   synchronising and emptying the cache do nothing. Triton's active driver is replaced by one that answers
   the same queries (target backend and architecture, current device and stream, SM count): vLLM's Triton
   kernel modules ask it when imported (flash-linear-attention for gated DeltaNet, triton_kernels for
   MXFP4); Triton's own driver would compile a helper against libcuda and query the device.
4. torch's streams, events and CUDA graphs (``torch.cuda.Stream``, ``Event``, ``CUDAGraph``, ``graph``,
   ``stream``, ``current_stream``): inert objects. Layers create auxiliary streams and events when they
   are built (shared-expert overlap, hybrid attention), no work is ever enqueued on them here.
5. Allocations on "cuda" become meta tensors: a torch function mode (the mechanism of torch's own
   ``with torch.device(...)``) rewrites a CUDA ``device=`` of every tensor factory, ``Tensor.to`` and
   ``Tensor.cuda`` to "meta" and drops ``pin_memory``. Attention backends allocate workspaces when
   imported (FlashInfer, FlashInfer MLA, CUTLASS MLA) and layers allocate buffers on the current device
   while the model is built; on the meta device they get their real shapes and dtypes and no memory.
6. Host memory as psutil reports it (0.10.x compares swap space x TP with host RAM).
7. vLLM's model registry inspects a model class in a child process (``_run_in_subprocess``) so that
   importing it cannot initialise CUDA in the server; the child would see the machine as it is (no
   driver, no what-if GPU) and costs a fresh vLLM import per architecture. Here nothing can initialise
   CUDA, so the same inspection runs in this process.

On a real GPU host one answer only, and only while a config resolves: the GPU count, where the host has fewer
GPUs than the scenario names (:func:`scenario_gpu_count`; a rank stand-in runs one rank of TP 8 on one GPU).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import types
from importlib.util import find_spec
from pathlib import Path

from .cache import root as cache_root
from .errors import DiagError
from .gpus import GpuSpec

CUDA_ERROR_STUB_LIBRARY = 34
_active: GpuSpec | None = None


def real_gpu_present() -> bool:
    """True when NVML sees at least one GPU (then nothing here is used)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False


def active_gpu() -> GpuSpec | None:
    """The impersonated GPU, or None when vLLM sees real hardware (or was not set up yet)."""
    return _active


def activate(gpu: GpuSpec) -> None:
    """Impersonate ``gpu`` for vLLM in this process; switching to another GPU later is allowed (vLLM's
    memoised answers for the previous one are forgotten)."""
    global _active
    if _active is None:
        if real_gpu_present():
            raise RuntimeError("diaglib.whatif.activate: a real GPU is present; nothing may be faked")
        if "vllm" in sys.modules and not _platform_is_ours():
            raise RuntimeError("diaglib.whatif.activate must run before vLLM is imported")
        _load_stub_libcuda()
        _patch_torch()
        _patch_triton()
        _patch_streams()
        _allocate_on_meta()
        _patch_host_memory()
        _active = gpu
        _install_platform()
        _inspect_models_here()
    elif gpu != _active:
        _forget_device_answers()
    _active = gpu


def _forget_device_answers() -> None:
    """Clear vLLM's memoised functions (the attention selector, kernel support checks, the platform's
    capability): they answered for the previous what-if GPU. Module-level values that vLLM computes once
    at import (e.g. flash-linear-attention's architecture flags) keep the first GPU's answer."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("vllm") or module is None:
            continue
        for value in list(vars(module).values()):
            owners = [value] + (list(vars(value).values()) if isinstance(value, type) else [])
            for obj in owners:
                if isinstance(obj, (classmethod, staticmethod)):
                    obj = obj.__func__
                if isinstance(obj, functools._lru_cache_wrapper):
                    obj.cache_clear()


@contextlib.contextmanager
def scenario_gpu_count(gpu: GpuSpec):
    """On a real GPU host with fewer GPUs than ``gpu.count`` (the host of a rank stand-in), a config resolves for
    the scenario's GPUs: torch's device count, which vLLM checks the world size against, answers ``gpu.count``
    meanwhile (vLLM's memoised counts forgotten before and after). Nothing else is changed, and nothing outside:
    the engines diaglib starts are other processes and see the real GPUs."""
    import torch.cuda as cuda

    if _active is not None or not real_gpu_present() or cuda.device_count() >= gpu.count:
        yield
        return
    saved = cuda._device_count_nvml, cuda.device_count
    cuda._device_count_nvml = cuda.device_count = lambda: gpu.count
    _forget_device_answers()
    try:
        yield
    finally:
        cuda._device_count_nvml, cuda.device_count = saved
        _forget_device_answers()


def _platform_is_ours() -> bool:
    plat = sys.modules.get("vllm.platforms")
    return plat is not None and type(getattr(plat, "_current_platform", None)).__name__ == "WhatIfCudaPlatform"


# --- 1. the stub driver library -------------------------------------------------------------------

def _extensions(package_dir: Path) -> list[Path]:
    """The compiled extensions of vLLM and of the distributions it requires (kernel libraries such as a JIT
    GEMM package link the driver too); torch, Triton and NVIDIA's CUDA libraries load it at run time."""
    import importlib.metadata as md
    import re

    found = sorted(package_dir.rglob("*.so"))
    for req in md.requires("vllm") or []:
        name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        if "extra ==" in req or re.match(r"(torch|triton|nvidia)", name.lower()):
            continue
        found += [Path(dist.locate_file(f)) for f in dist.files or [] if f.name.endswith(".so")]
    return found


def _driver_symbols(package_dir: Path) -> list[str]:
    """The cu* driver functions that those extensions import (kept per set of files: nm is slow)."""
    files = _extensions(package_dir)
    stamp = hashlib.sha256("".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}\n" for f in files
                                   if f.exists()).encode()).hexdigest()[:16]
    kept = _stub_dir() / f"driver-symbols-{stamp}.txt"
    if kept.exists():
        return kept.read_text().split()
    names: set[str] = set()
    for so in files:
        out = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True)
        names.update(w for line in out.stdout.splitlines() for w in line.split()[-1:]
                     if w.startswith("cu") and w[2:3].isupper())
    names = sorted(names | {"cuInit", "cuDriverGetVersion", "cuGetProcAddress", "cuGetProcAddress_v2"})
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text("\n".join(names) + "\n")
    return names


def _stub_dir() -> Path:
    return cache_root()


def _load_stub_libcuda() -> None:
    spec = find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise DiagError("vLLM is not installed in this Python environment")
    symbols = _driver_symbols(Path(next(iter(spec.submodule_search_locations))))
    source = "".join(f"int {s}(void) {{ return {CUDA_ERROR_STUB_LIBRARY}; }}\n" for s in symbols)
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    cache = _stub_dir() / f"stub-libcuda-{key}"
    lib = cache / "libcuda.so.1"
    if not lib.exists():
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if cc is None:
            raise DiagError("no C compiler found: the what-if GPU layer needs one to build a stub libcuda")
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "stub.c").write_text(source)
        tmp = cache / f"libcuda.so.1.{os.getpid()}"
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(cache / "stub.c")],
                       check=True, capture_output=True)
        tmp.replace(lib)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


# --- 2. vLLM's platform ---------------------------------------------------------------------------

def _install_platform() -> None:
    from vllm import platforms
    from vllm.platforms.cuda import NonNvmlCudaPlatform
    from vllm.platforms.interface import DeviceCapability

    class WhatIfCudaPlatform(NonNvmlCudaPlatform):
        """vLLM's CUDA platform without NVML, answering for the impersonated GPU."""

        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            major, minor = _active.capability
            return DeviceCapability(major=major, minor=minor)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return _active.name

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return _active.memory_bytes

        @classmethod
        def device_count(cls) -> int:
            return _active.count

        @classmethod
        def is_fully_connected(cls, physical_device_ids) -> bool:
            return True

        @classmethod
        def get_device_uuid(cls, device_id: int = 0) -> str:
            return f"GPU-whatif-{device_id}"

        @classmethod
        def is_pin_memory_available(cls) -> bool:
            return False

    platforms.current_platform = WhatIfCudaPlatform()


def _inspect_models_here() -> None:
    from vllm.model_executor.models import registry

    registry._run_in_subprocess = lambda fn: fn()


# --- 3. torch's own device queries ----------------------------------------------------------------

def _patch_torch() -> None:
    import torch

    class _Props:
        def __init__(self, gpu: GpuSpec):
            self.name, self.total_memory = gpu.name, gpu.memory_bytes
            self.major, self.minor = gpu.capability
            self.multi_processor_count = gpu.sms
            self.shared_memory_per_block_optin = gpu.shared_memory_per_block_optin
            self.warp_size = 32

    cuda = torch.cuda
    cuda._device_count_nvml = lambda: _active.count
    cuda.device_count = lambda: _active.count
    cuda.is_available = lambda: True
    cuda.get_device_capability = lambda device=None: tuple(_active.capability)
    cuda.get_device_name = lambda device=None: _active.name
    cuda.get_device_properties = lambda device=None: _Props(_active)
    cuda.current_device = lambda: 0
    if hasattr(torch, "accelerator"):  # torch >= 2.6 asks the accelerator API too
        torch.accelerator.current_device_index = lambda: 0
    cuda.mem_get_info = lambda device=None: (_active.memory_bytes, _active.memory_bytes)
    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats", "manual_seed",
                 "manual_seed_all"):
        setattr(cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda device=None: 0)
    for name in ("_exchange_device", "_maybe_exchange_device"):  # `with torch.cuda.device(i)`: stays on 0
        setattr(cuda, name, lambda device: 0)


def _patch_triton() -> None:
    try:
        import torch
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        return

    class WhatIfTritonDriver:
        """Triton's active-driver queries, answered for the named GPU (nothing compiles or launches here)."""

        utils = types.SimpleNamespace(get_device_properties=lambda device=0: {"multiprocessor_count": _active.sms})

        def get_current_target(self):
            major, minor = _active.capability
            return GPUTarget("cuda", 10 * major + minor, 32)

        def get_current_device(self) -> int:
            return 0

        def set_current_device(self, device) -> None:
            pass

        def get_current_stream(self, device=None) -> int:
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):  # autotuned kernels take it when decorated; nothing is ever timed here
            return lambda *args, **kwargs: [0.0]

        def get_empty_cache_for_benchmark(self):
            return torch.empty(0, device="meta")

        def clear_cache(self, cache) -> None:
            pass

    triton.runtime.driver.set_active(WhatIfTritonDriver())


# --- 4. streams, events, CUDA graphs ----------------------------------------------------------------

class _Inert:
    """A stream, event or CUDA graph that accepts every call and does nothing."""

    device = "cuda:0"
    cuda_stream = cuda_event = 0

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def query(self) -> bool:
        return True


def _patch_streams() -> None:
    import torch

    cuda = torch.cuda
    # Classes, so that annotations (`torch.cuda.Stream | None`) and isinstance checks keep working.
    cuda.Stream = type("Stream", (_Inert,), {})
    cuda.Event = type("Event", (_Inert,), {})
    cuda.CUDAGraph = type("CUDAGraph", (_Inert,), {})
    cuda.graph = type("graph", (_Inert,), {})
    cuda.stream = cuda.StreamContext = type("StreamContext", (_Inert,), {})
    cuda.current_stream = cuda.default_stream = lambda device=None: cuda.Stream()
    cuda.set_stream = lambda stream: None
    cuda.graph_pool_handle = lambda: (0, 0)


# --- 5. allocations on "cuda" become meta tensors ---------------------------------------------------

def _allocate_on_meta() -> None:
    import torch
    from torch.overrides import TorchFunctionMode

    def is_cuda(device) -> bool:
        if isinstance(device, int) and not isinstance(device, bool):
            return True  # a bare index means a CUDA device to torch
        if isinstance(device, (str, torch.device)):
            return torch.device(device).type == "cuda"
        return False

    class CudaToMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if is_cuda(kwargs.get("device")):
                kwargs["device"] = "meta"
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is torch.Tensor.cuda:
                return args[0].to("meta")
            if func is torch.Tensor.pin_memory:
                return args[0]
            if func is torch.Tensor.to and len(args) > 1 and is_cuda(args[1]):
                args = (args[0], "meta", *args[2:])
            return func(*args, **kwargs)

    CudaToMeta().__enter__()  # stays on torch's function-mode stack for the life of the process


# --- 6. host memory -------------------------------------------------------------------------------

def _patch_host_memory() -> None:
    import psutil

    real = psutil.virtual_memory

    def virtual_memory():
        vm = real()
        return vm._replace(total=max(vm.total, 2 << 40))

    psutil.virtual_memory = virtual_memory
