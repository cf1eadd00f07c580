"""Planted faults that test the probe machinery honestly: they run inside a probe's child process.

CPU: ``segfault``, ``hang``, ``raise``, ``killed`` (SIGKILL to itself), ``cuda_abort`` (prints the CUDA
runtime's illegal-address message, then aborts, as a crashing vLLM worker does), ``exit`` (exits quietly).
GPU: ``oob_write``, a Triton kernel over M rows that writes far out of bounds only when M reaches a
threshold: a real illegal memory access in a kernel of known name. ``oob_in_forward`` launches it inside
vLLM's forward pass, without synchronising, only for a step of exactly ``tokens`` tokens and only when the
engine runs with CUDA graphs on (its resolved cudagraph_mode is not NONE): a fault that a graph kill
switch avoids and that surfaces asynchronously, far from its kernel.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

CPU_FAULTS = ("segfault", "hang", "raise", "killed", "cuda_abort", "exit")
GPU_FAULTS = ("oob_write", "oob_in_forward")
KERNEL_NAME = "planted_oob_write_kernel"


def cpu_fault(kind: str) -> None:
    """Make this process fail the way ``kind`` says (never returns, except for unknown kinds)."""
    if kind == "segfault":
        ctypes.string_at(0)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "raise":
        raise ValueError("planted Python error")
    elif kind == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "cuda_abort":
        sys.stderr.write("RuntimeError: CUDA error: an illegal memory access was encountered\n"
                         "CUDA kernel errors might be asynchronously reported at some other API call.\n")
        sys.stderr.flush()
        os.abort()
    elif kind == "exit":
        os._exit(0)
    raise ValueError(f"unknown planted CPU fault {kind!r}; known: {', '.join(CPU_FAULTS)}")


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def planted_oob_write_kernel(out_ptr, m, threshold, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < m
        # 2**36 elements past the buffer: far outside any allocation, so the write faults for sure.
        jump = (m >= threshold).to(tl.int64) * 68719476736
        tl.store(out_ptr + offs.to(tl.int64) + jump, offs.to(tl.float32), mask=mask)

    return planted_oob_write_kernel


def oob_write(m: int, threshold: int, sync: bool = True) -> int:
    """Launch the planted kernel over ``m`` rows (and synchronise); faults iff ``m >= threshold``."""
    import torch

    out = torch.empty(max(m, 1), device="cuda", dtype=torch.float32)
    block = 1024
    _kernel()[(max(1, -(-m // block)),)](out, m, threshold, BLOCK=block)
    if sync:
        torch.cuda.synchronize()
    return m
