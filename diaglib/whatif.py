"""The "what-if GPU" layer: make vLLM believe, on a machine without a GPU, that it runs on a named one.

Everything that fakes hardware lives here, is switched on by :func:`activate` before vLLM is imported,
and is never switched on where a real GPU exists. What it overrides (see shared notes on vLLM on CPU):

1. ``libcuda.so.1``: vLLM's extensions link the driver. A stub library exporting exactly the driver
   entry points they import, each returning CUDA_ERROR_STUB_LIBRARY, is built once with the C compiler
   and loaded globally, so the real extensions load and their host-side checks give real answers.
2. vLLM's current platform: a subclass of vLLM's own ``NonNvmlCudaPlatform`` that reports the named
   GPU's capability, name, memory and count, and full NVLink connectivity.
3. torch's device-count, capability and name queries, which some vLLM versions ask directly.
4. Host memory as psutil reports it (0.10.x compares swap space x TP with host RAM).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

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
    """Impersonate ``gpu`` for vLLM in this process; switching to another GPU later is allowed."""
    global _active
    if _active is None:
        if "vllm" in sys.modules and not _platform_is_ours():
            raise RuntimeError("diaglib.whatif.activate must run before vLLM is imported")
        _load_stub_libcuda()
        _patch_torch()
        _patch_host_memory()
        _active = gpu
        _install_platform()
    _active = gpu


def _platform_is_ours() -> bool:
    plat = sys.modules.get("vllm.platforms")
    return plat is not None and type(getattr(plat, "_current_platform", None)).__name__ == "WhatIfCudaPlatform"


# --- 1. the stub driver library -------------------------------------------------------------------

def _driver_symbols(package_dir: Path) -> list[str]:
    """The cu* driver functions that the extensions under package_dir import."""
    names: set[str] = set()
    for so in package_dir.rglob("*.so"):
        out = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True)
        names.update(w for line in out.stdout.splitlines() for w in line.split()[-1:]
                     if w.startswith("cu") and w[2:3].isupper())
    return sorted(names | {"cuInit", "cuDriverGetVersion", "cuGetProcAddress", "cuGetProcAddress_v2"})


def _load_stub_libcuda() -> None:
    spec = find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise DiagError("vLLM is not installed in this Python environment")
    symbols = _driver_symbols(Path(next(iter(spec.submodule_search_locations))))
    source = "".join(f"int {s}(void) {{ return {CUDA_ERROR_STUB_LIBRARY}; }}\n" for s in symbols)
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diaglib" / f"stub-libcuda-{key}"
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
    import vllm.platforms as platforms
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

    platforms.current_platform = WhatIfCudaPlatform()


# --- 3. torch's own device queries ----------------------------------------------------------------

def _patch_torch() -> None:
    import torch

    class _Props:
        def __init__(self, gpu: GpuSpec):
            self.name, self.total_memory = gpu.name, gpu.memory_bytes
            self.major, self.minor = gpu.capability
            self.multi_processor_count = gpu.sms

    torch.cuda._device_count_nvml = lambda: _active.count
    torch.cuda.device_count = lambda: _active.count
    torch.cuda.get_device_capability = lambda device=None: tuple(_active.capability)
    torch.cuda.get_device_name = lambda device=None: _active.name
    torch.cuda.get_device_properties = lambda device=None: _Props(_active)
    torch.cuda.current_device = lambda: 0
    if hasattr(torch, "accelerator"):  # torch >= 2.6 asks the accelerator API (vLLM's sampler does)
        torch.accelerator.current_device_index = lambda: 0


# --- 4. host memory -------------------------------------------------------------------------------

def _patch_host_memory() -> None:
    import psutil

    real = psutil.virtual_memory

    def virtual_memory():
        vm = real()
        return vm._replace(total=max(vm.total, 2 << 40))

    psutil.virtual_memory = virtual_memory
