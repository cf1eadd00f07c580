"""The kernel census: one forward pass of vLLM's own model for a step of N tokens, every op it runs recorded.

The model is the one vLLM builds for TP rank 0 (diaglib.predict.layers), built privately on the meta device (up
to the last layer that is the first of its kind; later layers repeat one) and put through vLLM's own
``process_weights_after_loading``. Its forward runs eagerly (no Dynamo frame) under vLLM's forward context, with
the attention metadata the backend's own builder makes for the step, the KV caches the runner would bind, vLLM's
workspace manager, then the logits and vLLM's sampler. What runs each op (Inductor, a custom kernel, eager torch,
inside which splitting op) follows from the scenario's resolved compilation config.

The only fakes are the census's own, switched on for a pass and off after it:

- ``_ToMeta`` (a TorchFunctionMode): tensors vLLM creates on the GPU (``device="cuda"``, ``.cuda()``,
  ``.to("cuda")``, pinned host memory) are created on the meta device; ``.tolist()`` of a meta tensor is 1s.
- ``_Recorder`` (a TorchDispatchMode) records every op with its tensors (shape, dtype, strides, storage offset,
  element count, largest index). vLLM's Python custom ops (``vllm::*``) run their real implementation so the
  kernels inside are recorded too (where that fails, their registered fake stands in and the op says so); ops
  with a meta or fake implementation run it; C++ kernels without one write their out-arguments (passed through)
  or are shaped by :data:`_NO_META` (each entry cites the kernel source it follows); ``.item()``, ``.tolist()``
  and ``.numpy()`` of a meta tensor are 1s (``.item()`` noted); a host-to-meta copy keeps the meta tensor; a
  meta tensor copied to the host stays on meta.
- Triton launches record their grid (the launcher's own) and are not launched (an autotuned kernel takes the
  first of its pruned configs instead of a benchmark, and says so); device housekeeping
  (``empty_cache``, ``synchronize``) does nothing; FlashInfer's JIT builds are switched off (its own
  FLASHINFER_DISABLE_JIT: what it would compile is reported as not traced); where vLLM's DeepGEMM cannot load on
  this host, its weight-scale layout transform passes the scales through (compat.deep_gemm_scale_layout, noted);
  the stand-in groups' collectives are recorded (``collective::*``) with the tensor they yield on rank 0
  (:class:`_Collectives`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import math
import re
import time
import traceback
import weakref

import pandas as pd

from .. import compat, whatif
from ..errors import DiagError, vllm_refusal
from ..scenario import Scenario
from . import layers

INT32_MAX = 2**31 - 1
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA grid x, y, z


# --- steps -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Step:
    """One scheduled step: per request, the tokens it brings (query) and the tokens already in its KV cache."""

    kind: str  # prefill, decode, mixed, profile
    query: tuple[int, ...]
    context: tuple[int, ...]
    sampler: bool = True  # run the logits and the sampler on the last token of each request

    @property
    def tokens(self) -> int:
        return sum(self.query)

    @property
    def reqs(self) -> int:
        return len(self.query)

    def label(self) -> str:
        return f"{self.kind} {self.tokens} tokens / {self.reqs} req"


def _positive(name: str, n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DiagError(f"{name} must be a positive whole number, not {n!r}")
    return n


def prefill(tokens: int, reqs: int = 1, context: int = 0) -> Step:
    """A prefill step: ``reqs`` requests share ``tokens`` new tokens (evenly, the rest to the last)."""
    _positive("--tokens", tokens), _positive("--reqs", reqs)
    if reqs > tokens:
        raise DiagError(f"{reqs} requests cannot share {tokens} tokens (one token each at least)")
    q = [tokens // reqs] * reqs
    q[-1] += tokens % reqs
    return Step("prefill", tuple(q), (context,) * reqs)


def decode(reqs: int, context: int = 1024) -> Step:
    """A decode batch: ``reqs`` requests, one new token each, ``context`` tokens already cached each."""
    _positive("--reqs", reqs)
    return Step("decode", (1,) * reqs, (context,) * reqs)


def mixed(tokens: int, reqs: int, context: int = 1024) -> Step:
    """``reqs - 1`` decodes and one prefill chunk taking the rest of ``tokens``."""
    _positive("--tokens", tokens), _positive("--reqs", reqs)
    if reqs < 2 or tokens < reqs:
        raise DiagError(f"a mixed step needs at least 2 requests and as many tokens (got {tokens} / {reqs})")
    return Step("mixed", (1,) * (reqs - 1) + (tokens - reqs + 1,), (context,) * (reqs - 1) + (0,))


def profile(sc: Scenario, tokens: int | None = None) -> Step:
    """vLLM's profile (dummy) run: max_num_batched_tokens over its dummy requests, then the sampler warm-up."""
    n = tokens or sc.vllm_config.scheduler_config.max_num_batched_tokens
    q = compat.dummy_batch(sc.vllm_config, n)
    return Step("profile", tuple(q), (0,) * len(q))


def _check_step(sc: Scenario, step: Step) -> None:
    mml = sc.vllm_config.model_config.max_model_len
    if any(q + c > mml for q, c in zip(step.query, step.context)):
        raise DiagError(f"a request of this step holds more than max_model_len = {mml} tokens")
    if step.reqs > sc.vllm_config.scheduler_config.max_num_seqs and step.kind != "profile":
        raise DiagError(f"{step.reqs} requests exceed max_num_seqs = {sc.vllm_config.scheduler_config.max_num_seqs}")


# --- the census's own modes --------------------------------------------------------------------------------

def _is_gpu(d) -> bool:
    import torch

    if isinstance(d, torch.device):
        return d.type == "cuda"
    return isinstance(d, str) and d.startswith("cuda")


def _ones_for(t):
    """The values of a meta tensor vLLM reads on the host (``.tolist()``, ``.numpy()``: Marlin repacks AWQ zero
    points with numpy): 1 stands in for each, as for ``.item()``, in the tensor's numpy dtype where it has one."""
    import numpy as np
    import torch

    try:
        dtype = torch.empty(0, dtype=t.dtype).numpy().dtype
    except TypeError:  # bfloat16 and the float8 types have no numpy dtype
        dtype = np.float32
    return np.ones(tuple(t.shape), dtype=dtype)


def _to_meta_mode():
    import torch
    from torch.overrides import TorchFunctionMode

    meta = torch.device("meta")

    class _ToMeta(TorchFunctionMode):
        """Tensors vLLM creates on the GPU are created on the meta device; pinned host memory is plain."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "device" in kwargs and (_is_gpu(kwargs["device"]) or isinstance(kwargs["device"], int)):
                kwargs = {**kwargs, "device": meta}
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
            name = getattr(func, "__name__", "")
            if name == "cuda":
                return args[0].to(meta)
            if name in ("tolist", "numpy") and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
                return _ones_for(args[0]) if name == "numpy" else _ones_for(args[0]).tolist()
            if name == "pin_memory":
                return args[0]
            if name == "to" and any(_is_gpu(a) for a in args[1:]):
                args = tuple(meta if _is_gpu(a) else a for a in args)
            return func(*args, **kwargs)

    return _ToMeta()


# C++ kernels vLLM registers without a meta or fake implementation that return new tensors: their outputs'
# shapes, read from the kernel sources named (vllm-project/vllm unless said otherwise).
def _grouped_topk(scores, n_group, topk_group, topk, renormalize, routed_scaling_factor, bias, *rest):
    import torch  # csrc/moe/grouped_topk_kernels.cu: topk_values float32 and topk_indices int32, [tokens, topk]

    n = scores.shape[0]
    return (torch.empty(n, topk, dtype=torch.float32, device=scores.device),
            torch.empty(n, topk, dtype=torch.int32, device=scores.device))


def _fa3_scheduler_metadata(*args, **kwargs):
    import torch  # vllm-project/flash-attention hopper/flash_api.cpp mha_fwd_get_scheduler_metadata: int32,
    # round_up(batch, 4) x (at most 4 prepare vectors) + 1 semaphore (vLLM's flash_attn.py sizes it so too)

    batch = args[0] if args else kwargs["batch_size"]
    dev = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), torch.device("meta"))
    return torch.empty(1 + -(-batch // 4) * 4 * 4, dtype=torch.int32, device=dev)


def _fa3_fwd(q, k, v, *args, **kwargs):
    import torch  # vllm-project/flash-attention hopper/flash_api.cpp mha_fwd: returns {out, softmax_lse,
    # out_accum, softmax_lse_accum}; varlen q: lse float32 [heads, total_q]; accumulators only with num_splits > 1

    names = [a.name for a in torch.ops._vllm_fa3_C.fwd.default._schema.arguments][3:]
    kw = {**dict(zip(names, args)), **kwargs}
    out = kw.get("out")
    total, heads = q.shape[0], q.shape[-2]
    head_v = v.shape[-1]
    if out is None:
        out = torch.empty(total, heads, head_v, dtype=q.dtype, device=q.device)
    splits = kw.get("num_splits") or 1
    f32 = {"dtype": torch.float32, "device": q.device}
    acc = (torch.empty(splits, heads, total, head_v, **f32), torch.empty(splits, heads, total, **f32)) \
        if splits > 1 else (torch.empty(0, **f32), torch.empty(0, **f32))
    return [out, torch.empty(heads, total, **f32), *acc]


def _fa2_varlen_fwd(q, k, v, out=None, *args, **kwargs):
    import torch  # vllm-project/flash-attention csrc/flash_attn/flash_api.cpp mha_varlen_fwd: returns {out,
    # softmax_lse}; out [total_q, heads, head_size] (the caller's, else new), lse float32 [heads, total_q]

    total, heads = q.shape[0], q.shape[-2]
    if out is None:
        out = torch.empty(total, heads, v.shape[-1], dtype=q.dtype, device=q.device)
    return [out, torch.empty(heads, total, dtype=torch.float32, device=q.device)]


def _unique2(t, sorted=True, return_inverse=False, return_counts=False):  # noqa: A002 - aten's argument name
    import torch  # pytorch aten/src/ATen/native/Unique.cpp _unique2: (values, inverse [t.shape] or [0], counts)
    # data-dependent: a meta tensor's values are unknown, and the census stands one value in for all of them
    # (as for .item()), so one unique value (vLLM asks it of weight scales, e.g. ModelOpt NVFP4's global scale)

    n = min(t.numel(), 1)
    i64 = {"dtype": torch.int64, "device": t.device}
    return (torch.empty(n, dtype=t.dtype, device=t.device),
            torch.empty(t.shape if return_inverse else (0,), **i64), torch.empty(n if return_counts else 0, **i64))


def _index_by_mask(t, indices):
    import torch  # pytorch aten/src/ATen/native/TensorAdvancedIndexing.cpp index: a boolean mask of k dims
    # stands for its k nonzero() index vectors; data-dependent, so every element is taken as selected (the
    # largest result, as a mask of meta values that are all the stand-in 1 would select)

    out = []
    for i in indices:
        if i is not None and i.dtype in (torch.bool, torch.uint8):
            out += [torch.empty(i.numel(), dtype=torch.int64, device=i.device)] * i.dim()
        else:
            out.append(i)
    return torch.ops.aten.index.Tensor(t, out)


_NO_META = {"_moe_C::grouped_topk": _grouped_topk, "aten::index.Tensor": _index_by_mask, "_vllm_fa3_C::fwd": _fa3_fwd,
            "_vllm_fa2_C::varlen_fwd": _fa2_varlen_fwd, "_vllm_fa3_C::get_scheduler_metadata": _fa3_scheduler_metadata,
            "aten::_unique2": _unique2}

# The values of meta tensors are unknown; the census stands 1 in for each (finite). So a test for non-finite
# values is all False, and so are reductions and views of such tests (vLLM checks loaded scales so, e.g.
# `if torch.isnan(scale).any(): raise`).
_NON_FINITE = {"aten::isnan", "aten::isinf", "aten::isneginf", "aten::isposinf"}
_ALL_FALSE = {"aten::any", "aten::logical_or", "aten::bitwise_or", "aten::view", "aten::reshape", "aten::flatten",
              "aten::_to_copy", "aten::clone", "aten::alias", "aten::squeeze", "aten::unsqueeze", "aten::amax"}

_VIEW_OR_ALLOC = re.compile(r"^aten::(empty|empty_strided|new_empty|new_empty_strided|_local_scalar_dense|"
                            r"lift_fresh|resize_|set_|sym_|_unsafe_view|detach_|item)")


class _Op:
    """One recorded op: where it ran, its name, its tensors (role, info) in and out, what ran it."""

    __slots__ = ("seq", "phase", "module", "parent", "root", "depth", "op", "tensors", "scalars", "kind", "note",
                 "grid")

    def __init__(self, state, op, kind):
        self.seq, self.phase, self.module, self.op, self.kind = len(state.ops), state.phase, state.module(), op, kind
        self.parent, self.depth = (state.parents[-1] if state.parents else None), len(state.parents)
        self.root = state.parents[0] if state.parents else None
        self.tensors, self.scalars, self.note, self.grid = [], {}, "", None


def _info(t) -> tuple:
    """(shape, stride, storage_offset, dtype, device, numel, span) of one tensor: span is the largest element
    offset from its data pointer (sum((size - 1) x stride)); its largest offset into the allocation is
    storage_offset + span."""
    import torch

    shape, stride = tuple(t.shape), tuple(t.stride()) if t.layout == torch.strided else ()
    off = t.storage_offset() if stride else 0
    numel = math.prod(shape)
    span = sum((s - 1) * st for s, st in zip(shape, stride)) if numel else -1
    return shape, stride, off, str(t.dtype).removeprefix("torch."), t.device.type, numel, span


def _index_max(info) -> int:
    """The largest index a kernel forms into the tensor from its data pointer: max(numel - 1, span)."""
    return max(info[5] - 1, info[6])


def _walk(value, role, out):
    import torch

    if isinstance(value, torch.Tensor):
        out.append((role, value))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if isinstance(v, torch.Tensor):
                out.append((f"{role}[{i}]", v))


def _recorder_mode(state):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)

    class _Recorder(TorchDispatchMode):
        """Records every op; runs vLLM's Python custom ops for real so their inner kernels are recorded."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.name()
            ns = name.split("::", 1)[0]
            container = ns == "vllm" and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
            kind = "vllm op" if container else ("aten" if ns == "aten" else "custom")
            if kind == "aten" and (_VIEW_OR_ALLOC.match(name) or _is_view(func)):
                kind = "view" if not name.startswith("aten::empty") and "new_empty" not in name else "alloc"
            rec = _Op(state, name, kind)
            state.ops.append(rec)
            schema = func._schema
            for i, a in enumerate(schema.arguments):
                v = args[i] if i < len(args) else kwargs.get(a.name)
                _walk(v, a.name, rec.tensors)
                if isinstance(v, (int, float, bool)) and not isinstance(v, torch.Tensor):
                    rec.scalars[a.name] = v
            if container:
                state.parents.append(name)
                mark = len(state.ops)
                try:  # torch-function modes are off inside a dispatch handler: the device redirect goes back on
                    with _to_meta_mode(), self:
                        out = func._handle.redispatch_boxed(cuda, *args, **kwargs)
                except Exception as e:  # the real implementation cannot run here: its fake stands in
                    rec.note = f"inner kernels not traced ({_why(e)})"
                    state.tracebacks.append(traceback.format_exc())
                    del state.ops[mark:]
                    try:
                        out = func(*args, **kwargs)
                    except NotImplementedError:  # no fake either: an op that only writes its out-arguments
                        out = _mutated(func, args, kwargs)
                finally:
                    state.parents.pop()
            else:
                try:
                    out = func(*args, **kwargs)
                except NotImplementedError:
                    if name in _NO_META:
                        out = _NO_META[name](*args, **kwargs)
                        rec.note = "outputs shaped by the census (_NO_META)"
                    elif name == "aten::_to_copy" and args[0].device.type == "meta":  # meta -> host: stays meta
                        out = torch.empty_like(args[0], dtype=kwargs.get("dtype") or args[0].dtype, device="meta")
                        rec.note = "a meta tensor copied to the host stays on meta"
                    else:
                        out = _mutated(func, args, kwargs)
                except RuntimeError as e:
                    if name == "aten::copy_" and "cross-device" in str(e):  # host values into a device tensor
                        rec.note = "host-to-device copy: the device tensor keeps its shape"
                        return args[0]
                    if name in ("aten::_local_scalar_dense", "aten::item") and state.all_false(args[0]):
                        out = False
                        rec.note = "a test for non-finite values of meta tensors: the stand-in 1s are finite"
                    elif name in ("aten::_local_scalar_dense", "aten::item"):
                        out = 1.0 if args[0].dtype.is_floating_point else 1
                        rec.note = "value of a meta tensor: 1 stands in"
                    elif [str(r.type) for r in schema.returns] == ["bool"] and "meta tensors" in str(e):
                        out = True  # a comparison of values (allclose, equal): the stand-in 1s are all equal
                        rec.note = "comparison of meta tensors' values: the stand-in 1s compare equal"
                    else:
                        raise
                    state.stand_ins.append(rec)
            n_in = len(rec.tensors)
            base, tests = name.split(".", 1)[0], [t for _, t in rec.tensors if t.dtype == torch.bool]
            if isinstance(out, torch.Tensor) and out.device.type == "meta" and (
                    base in _NON_FINITE or base in _ALL_FALSE and tests and all(map(state.all_false, tests))):
                state.mark_all_false(out)
            _walk(out, "out", rec.tensors)
            rec.scalars["_n_in"] = n_in
            return out

    return _Recorder()


@functools.cache
def _is_view_schema(schema_str: str) -> bool:
    return "Tensor(a)" in schema_str.split("->", 1)[-1] and "Tensor(a!)" not in schema_str


def _is_view(func) -> bool:
    return _is_view_schema(str(func._schema))


def _mutated(func, args, kwargs):
    """Outputs of a kernel without a meta implementation that writes only into its out-arguments."""
    schema = func._schema
    rets = schema.returns
    if any(r.alias_info is None for r in rets):
        raise DiagError(f"{func.name()} has no meta implementation and returns new tensors: the census cannot "
                        "shape its outputs (add it to census._NO_META with the kernel source it follows)")
    vals = []
    for r in rets:
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.before_set == r.alias_info.before_set:
                vals.append(args[i] if i < len(args) else kwargs[a.name])
    if not rets:
        return None
    return vals[0] if len(vals) == 1 else tuple(vals)


class _State:
    """What the modes and module hooks share during one recorded pass."""

    def __init__(self):
        self.ops: list[_Op] = []
        self.parents: list[str] = []
        self.stack: list[str] = []
        self.stand_ins: list[_Op] = []
        self.tracebacks: list[str] = []  # of what stopped or stood in (for diagnosing the census itself)
        self.launches: list[dict] = []
        self.outputs: list[tuple] = []
        self.phase = "setup"
        self.autotuned: str | None = None
        self._all_false: dict[int, weakref.ref] = {}  # meta tensors known to hold only False (see _ALL_FALSE)

    def module(self) -> str:
        return self.stack[-1] if self.stack else ""

    def all_false(self, t) -> bool:
        ref = self._all_false.get(id(t))
        return ref is not None and ref() is t

    def mark_all_false(self, t) -> None:
        self._all_false[id(t)] = weakref.ref(t)


@contextlib.contextmanager
def _module_hooks(state: _State, model):
    """Global forward hooks that keep the name of the innermost running module and every module's outputs.

    A module shared by several layers (vLLM caches rotary embeddings) is named under the module calling it."""
    import torch
    from torch.nn.modules import module as M

    aliases: dict = {}
    for n, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)

    def pre(mod, args):
        names = aliases.get(id(mod))
        outer = state.module()
        if names is None:
            name = f"{outer}/{type(mod).__name__}"
        else:
            name = next((n for n in names if outer and n.startswith(outer + ".")), names[0])
        state.stack.append(name)

    def post(mod, args, out):
        name = state.stack.pop() if state.stack else ""
        tensors = []
        _walk(out if not isinstance(out, torch.Tensor) else [out], "out", tensors)
        state.outputs.append((name, type(mod).__name__, [tuple(t.shape) for _, t in tensors]))

    h1, h2 = M.register_module_forward_pre_hook(pre), M.register_module_forward_hook(post)
    try:
        yield
    finally:
        h1.remove(), h2.remove()


_DEVICE_CALLS = ("accelerator.empty_cache", "accelerator.synchronize", "cuda.empty_cache", "cuda.synchronize")


@contextlib.contextmanager
def _no_device_calls():
    """Device memory and stream housekeeping (empty_cache, synchronize) does nothing: no device exists."""
    import torch

    saved = []
    for path in _DEVICE_CALLS:
        mod_name, fn = path.split(".")
        mod = getattr(torch, mod_name, None)
        if mod is not None and hasattr(mod, fn):
            saved.append((mod, fn, getattr(mod, fn)))
            setattr(mod, fn, lambda *a, **k: None)
    try:
        yield
    finally:
        for mod, fn, real in saved:
            setattr(mod, fn, real)


@contextlib.contextmanager
def _triton_launches(state: _State):
    """Triton kernels are not launched: each launch records its kernel name and grid (the launcher's own)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    real = JITFunction.run

    def run(self, *args, grid, warmup=False, **kwargs):
        meta = {**dict(zip(self.arg_names, args)), **kwargs}
        g = grid(meta) if callable(grid) else grid
        g = tuple(int(x) for x in (tuple(g) + (1, 1, 1))[:3])
        rec = _Op(state, f"triton::{self.fn.__name__}", "triton")
        import torch

        for k, v in meta.items():
            if isinstance(v, torch.Tensor):
                rec.tensors.append((k, v))
            elif isinstance(v, (int, float, bool)):
                rec.scalars[k] = v
        rec.scalars["_n_in"] = len(rec.tensors)
        rec.grid = g
        rec.note = state.autotuned or ""
        state.ops.append(rec)
        return None

    def tuned(self, *args, **kwargs):  # an autotuned kernel is not benchmarked: the first of its pruned configs
        self.nargs = dict(zip(self.arg_names, args))
        config = (self.prune_configs(kwargs) or self.configs)[0]
        state.autotuned = f"autotuned: grid of its first config {config}"
        try:
            return self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            state.autotuned, self.nargs = None, None

    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        Autotuner = None
    real_tuned = Autotuner.run if Autotuner is not None else None
    JITFunction.run = run
    if Autotuner is not None:
        Autotuner.run = tuned
    try:
        yield
    finally:
        JITFunction.run = real
        if Autotuner is not None:
            Autotuner.run = real_tuned


class _Collectives:
    """The device communicator of a stand-in parallel group: each collective is recorded as an op
    ``collective::NAME`` with the tensor it yields on rank 0, and not run (no other rank exists)."""

    def __init__(self, state: "_State", world: int):
        self.state, self.world = state, world

    def _record(self, name, inp, out):
        rec = _Op(self.state, f"collective::{name}", "collective")
        rec.tensors = [("input", inp), ("out", out)]
        rec.scalars = {"world_size": self.world, "_n_in": 1}
        self.state.ops.append(rec)
        return out

    def all_reduce(self, x, *a, **k):
        return self._record("all_reduce", x, x.new_empty(x.shape))

    def _scaled(self, x, dim, factor):
        shape = list(x.shape)
        shape[dim] = int(shape[dim] * factor)
        return x.new_empty(shape)

    def all_gather(self, x, dim=-1, *a, **k):
        return self._record("all_gather", x, self._scaled(x, dim, self.world))

    def gather(self, x, dst=0, dim=-1, *a, **k):
        return self._record("gather", x, self._scaled(x, dim, self.world))

    def reduce_scatter(self, x, dim=-1, *a, **k):
        return self._record("reduce_scatter", x, self._scaled(x, dim, 1 / self.world))


@contextlib.contextmanager
def _stand_in_collectives(state: "_State"):
    """vLLM's stand-in parallel groups (layers.rank0) get a recording device communicator."""
    from vllm.distributed import parallel_state as ps

    for name in dir(ps):
        g = getattr(ps, name, None)
        if type(g).__name__ == "GroupCoordinator" and getattr(g, "device_group", None) is not None \
                and getattr(g, "world_size", 1) > 1:
            g.use_custom_op_call = False
            g.device_communicator = _Collectives(state, g.world_size)
    yield


@contextlib.contextmanager
def _env(sc: Scenario, cfg, state: _State, model=None):
    """Rank 0 of the scenario, the private config current, GPU tensors on meta, every op recorded."""
    from vllm.config import set_current_vllm_config

    hooks = _module_hooks(state, model) if model is not None else contextlib.nullcontext()
    with layers.rank0(sc), _stand_in_collectives(state), set_current_vllm_config(cfg), _no_device_calls(), \
            _no_jit_builds(), _to_meta_mode(), _triton_launches(state), hooks, _recorder_mode(state):
        yield


@contextlib.contextmanager
def _no_jit_builds():
    """FlashInfer compiles some kernels with nvcc on first use: not here (its own switch, restored after)."""
    import os

    before = os.environ.get("FLASHINFER_DISABLE_JIT")
    os.environ["FLASHINFER_DISABLE_JIT"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FLASHINFER_DISABLE_JIT", None)
        else:
            os.environ["FLASHINFER_DISABLE_JIT"] = before


def _keeping_gpu(fn):
    """The census answers for the scenario's GPU (layers.rank0 impersonates it); the GPU impersonated before
    comes back after."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        gpu = whatif.active_gpu()
        try:
            return fn(*args, **kwargs)
        finally:
            if gpu is not None and whatif.active_gpu() is not gpu:
                whatif.activate(gpu)

    return wrapper


# --- the census's model and one recorded pass ----------------------------------------------------------

@dataclasses.dataclass
class _Prepared:
    """The census's private model for one scenario: weights processed, KV caches bound, metadata builders."""

    sc: Scenario
    model: object
    cfg: object  # a private copy of the VllmConfig whose layer registries are the model's
    registry: dict
    groups: list  # (backend, kv spec, [layer names], builder or None)
    num_blocks: int
    block_tables: dict  # block size -> vLLM BlockTable
    notes: list
    stand_ins: int
    reps: dict  # decoder layer index -> the built layer it repeats (every layer of the scenario's model)
    state_storages: dict  # storage id -> "weight" / "kv cache"
    kv_layout: object = None  # compat.KVLayout where vLLM's model runner lays KV caches out by layout


_prepared: dict[int, _Prepared] = {}
_passes: dict[tuple, tuple] = {}  # (id(sc), step) -> (sc, Pass): the id of a freed scenario is reused
_MAX_PASSES = 64
_NAMING = re.compile(r"(^|_)(layer|layers|idx|id|index|name|prefix)(_|$)")


def _decoder_layers(model, num_layers: int):
    """The ModuleList of the model's decoder layers (the one holding num_hidden_layers modules), or None."""
    import torch

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers and name.endswith("layers"):
            return name, m
    return None, None


def _signature(layer) -> tuple:
    """What makes two decoder layers run the same ops: every submodule's class, parameters (shape, dtype),
    quantization method and plain settings (names and layer indices left out)."""
    import torch

    sig = []
    for name, m in layer.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and not _NAMING.search(k)
                             and isinstance(v, (bool, int, float)) and not isinstance(v, torch.Tensor)))
        params = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in m.named_parameters(recurse=False))
        qm = getattr(m, "quant_method", None)
        sig.append((name, type(m).__name__, type(qm).__name__ if qm is not None else None, params, attrs))
    return tuple(sig)


def _layer_plan(sc: Scenario):
    """(layers to build, {layer index: representative index}) from the scenario's full meta model: the build
    stops after the last layer that is the first of its kind; every later layer repeats an earlier one."""
    text = sc.vllm_config.model_config.hf_text_config
    total = getattr(text, "num_hidden_layers", None)
    if not total or sc.vllm_config.parallel_config.pipeline_parallel_size > 1:
        return None, {}
    _, mlist = _decoder_layers(layers.build_model(sc), total)
    if mlist is None:
        return None, {}
    first: dict = {}
    reps = {}
    for i, layer in enumerate(mlist):
        reps[i] = first.setdefault(_signature(layer), i)
    k = max(first.values()) + 1
    return (k if k < total else None), reps


def _private_config(sc: Scenario, num_layers: int | None):
    """A copy of the scenario's config for the census's model: its own compilation config (layer registries)
    and, where the build stops early, its own model config with num_hidden_layers = num_layers."""
    cfg = copy.copy(sc.vllm_config)
    cfg.compilation_config = copy.copy(sc.vllm_config.compilation_config)
    for name in ("static_forward_context", "static_all_moe_layers"):
        if hasattr(cfg.compilation_config, name):
            setattr(cfg.compilation_config, name, type(getattr(cfg.compilation_config, name))())
    if num_layers:
        mc = copy.copy(sc.vllm_config.model_config)
        hf = copy.deepcopy(mc.hf_config)
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        text.num_hidden_layers = num_layers
        object.__setattr__(mc, "hf_config", hf)
        object.__setattr__(mc, "hf_text_config", text)
        cfg.model_config = mc
    return cfg


def _kv_blocks(sc: Scenario, notes: list) -> int:
    """KV-cache blocks per rank by vLLM's KV sizing of the memory the budget leaves (predict.memory); where that
    cannot be answered here, the fewest vLLM accepts (one max_model_len request), and a note says so."""
    from . import memory

    try:
        b = memory.budget(sc).set_index("item")
        kv = int(b.loc["KV cache", "bytes"])
        if kv > 0:
            from .schedule import kv_specs

            return compat.kv_cache_config(compat.private_config(sc.vllm_config), kv, kv_specs(sc))[0].num_blocks
        why = "the memory budget leaves nothing for the KV cache"
    except Exception as e:  # noqa: BLE001
        why = f"the memory budget is not available here ({_why(e)})"
    n = -(-sc.vllm_config.model_config.max_model_len // sc.vllm_config.cache_config.block_size) + 1
    notes.append(f"KV cache: {why}; {n} blocks (one max_model_len request) stand in")
    return n


@_keeping_gpu
def prepare(sc: Scenario) -> _Prepared:
    """The census's model for this scenario (cached): built on meta up to the last layer that is the first of its
    kind, weights processed as vLLM's loader does, KV caches of vLLM's block count bound to every attention
    layer, one metadata builder per attention group."""
    hit = _prepared.get(id(sc))
    if hit is not None and hit.sc is sc:
        return hit
    import torch
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    try:
        build, reps = _layer_plan(sc)
        cfg = _private_config(sc, build)
        model, registries = layers.new_model(sc, cfg)
    except DiagError:
        raise
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        raise DiagError(f"the census cannot build {sc.hf_config.architectures[0]} on the meta device with vLLM "
                        f"{compat.installed()} here ({_why(e)})") from None
    for name, reg in registries.items():
        setattr(cfg.compilation_config, name, reg)
    state = _State()
    notes = []
    try:
        with _env(sc, cfg, state), compat.deep_gemm_scale_layout(notes):
            process_weights_after_loading(model, cfg.model_config, torch.device("meta"))
    except Exception as e:  # noqa: BLE001 - vLLM's own check of the loaded weights, else one line of ours
        raise DiagError(vllm_refusal(e) or f"the census cannot run vLLM's process_weights_after_loading on meta "
                        f"weights here ({_why(e)})") from None
    if state.stand_ins:
        notes.append(f"process_weights_after_loading read {len(state.stand_ins)} values of meta tensors "
                     "(weight scales); 1 stood in for each")
    registry = registries.get("static_forward_context", {})
    num_blocks = _kv_blocks(sc, notes)
    storages = {t.untyped_storage()._cdata: "weight" for t in (*model.parameters(), *model.buffers())}
    groups: dict = {}
    unbound = set()
    specs, backends = {}, {}
    for name, layer in compat.attention_layers(registry).items():
        with _env(sc, cfg, _State()):
            spec = compat.layer_kv_spec(layer, cfg)
            if spec is None:
                continue
            specs[name], backends[name] = spec, compat.layer_backend(layer)
    kv_layout = None
    if specs and compat.runner_lays_out_kv_caches():
        kv_layout = _runner_layout(sc, cfg, registry, specs, backends, reps, num_blocks, storages, notes)
    if kv_layout is not None:
        for ags in kv_layout.attn_groups:
            for g in ags:
                names = [n for n in g.layer_names if n in registry]
                if names:
                    groups.setdefault((g.backend, g.kv_cache_spec), []).extend(names)
    else:
        for name, spec in specs.items():
            backend, layer = backends[name], registry[name]
            with _env(sc, cfg, _State()):
                try:
                    kv = compat.kv_cache_tensor(backend, spec, num_blocks, cfg.cache_config.cache_dtype)
                except compat.VllmApiMissing as e:
                    unbound.add(str(e))
                    kv = None
                if kv is not None:
                    compat.bind_kv_cache(layer, kv)
                    for t in (kv if isinstance(kv, list) else [kv]):
                        storages[t.untyped_storage()._cdata] = "kv cache"
            groups.setdefault((backend, spec), []).append(name)
    notes += [f"KV cache not laid out here ({why}): attention runs with the shapes its fake implementation sees"
              for why in sorted(unbound)]
    built, tables = [], {}
    for (backend, spec), names in groups.items():
        builder = None
        with _env(sc, cfg, _State()):
            try:
                builder = compat.metadata_builder(backend, spec, names, cfg, torch.device("cuda"))
            except Exception as e:  # noqa: BLE001 - the census says where it stops
                notes.append(f"{compat.backend_name(backend)}: metadata builder not built here ({_why(e)}); attention runs "
                             "with the shapes its fake implementation sees")
            if spec.block_size not in tables:
                tables[spec.block_size] = compat.block_table(cfg, spec.block_size)
        built.append((backend, spec, names, builder))
    if build:
        notes.append(f"layers 0..{build - 1} built and run; the other {len(reps) - build} repeat one of them "
                     "(same modules, parameters and settings)")
    p = _Prepared(sc, model, cfg, registry, built, num_blocks, tables, notes, len(state.stand_ins), reps, storages,
                  kv_layout)
    _prepared[id(sc)] = p
    return p


def _runner_layout(sc: Scenario, cfg, registry: dict, specs: dict, backends: dict, reps: dict, num_blocks: int,
                   storages: dict, notes: list):
    """The KV caches laid out as vLLM's model runner does (compat.runner_kv_caches) for the whole model (the
    layers not built take the spec and backend of the layer they repeat) and bound to the built layers; None,
    with a note in one line, where vLLM's layout code refuses here."""
    full_specs, full_backends = dict(specs), dict(backends)
    for name in specs:
        rep = _layer_of(name)
        for i, r in reps.items():
            if r == rep and i != rep:
                full_specs[_rename(name, rep, i)] = specs[name]
                full_backends[_rename(name, rep, i)] = backends[name]
    with _env(sc, cfg, _State()):
        try:
            kv = compat.runner_kv_caches(cfg, full_specs, full_backends, num_blocks)
            compat.bind_runner_kv_caches(kv, registry)
        except Exception as e:  # noqa: BLE001 - one line: where vLLM's own layout stops
            notes.append(f"KV cache not laid out here (vLLM's model-runner layout refuses: {_why(e)}): attention "
                         "runs with the shapes its fake implementation sees")
            return None
    for t in kv.caches.values():
        storages[t.untyped_storage()._cdata] = "kv cache"
    for name in kv.caches:
        if name in registry:
            for t in _bound(registry[name]):
                storages[t.untyped_storage()._cdata] = "kv cache"
    return kv


def _bound(layer) -> list:
    """The tensors a layer holds as its KV cache after binding (a tensor, or a list / tuple of them)."""
    import torch

    kv = getattr(layer, "kv_cache", None)
    out, todo = [], [kv]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            todo += list(x)
    return out


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


@dataclasses.dataclass
class Pass:
    """One recorded forward pass (and sampler) for a step."""

    step: Step
    padded: int
    cudagraph: str
    ops: list
    outputs: list  # (module, class, [output shapes]) in the order the modules returned
    notes: list
    stopped: str | None  # where the pass stopped, in one line (None: it ran to the end)
    seconds: float
    tracebacks: list
    recorded: int = 0  # ops actually run (the rest repeat a built layer's ops)
    base: list = dataclasses.field(default_factory=list)  # the ops actually run, in order
    table: pd.DataFrame | None = None  # ops(), made once


def _runner_inputs(p: _Prepared):
    """The model runner's persistent device buffers a forward reads slices of (derived: GPUModelRunner.__init__
    sizes input_ids, positions by max_num_batched_tokens; query_start_loc, seq_lens by max_num_seqs)."""
    import torch

    sch = p.cfg.scheduler_config
    t, r = sch.max_num_batched_tokens, sch.max_num_seqs
    return {"input_ids": torch.empty(t, dtype=torch.int32, device="meta"),
            "positions": torch.empty(t, dtype=torch.int64, device="meta"),
            "query_start_loc": torch.empty(r + 1, dtype=torch.int32, device="meta"),
            "seq_lens": torch.empty(r, dtype=torch.int32, device="meta")}


def _rows(buf, n: int):
    """buf[:n], or a fresh tensor of n rows where the step is larger than vLLM sized the buffer for."""
    import torch

    if n <= buf.shape[0]:
        return buf[:n]
    return torch.empty((n, *buf.shape[1:]), dtype=buf.dtype, device="cuda")


def _attention(p: _Prepared, step: Step, padded: int, inputs: dict, notes: list, tracebacks: list):
    """Per-layer attention metadata and slot mappings for the step, from each backend's own builder."""
    import torch

    if step.kind == "profile" and not compat.profile_runs_attention():
        md = None
    else:
        md = {}
    slots = {}
    cpu = torch.device("cpu")
    q = torch.tensor([0, *itertools.accumulate(step.query)], dtype=torch.int32, device=cpu)
    seq = torch.tensor([a + b for a, b in zip(step.query, step.context)], dtype=torch.int32, device=cpu)
    done = torch.tensor(step.context, dtype=torch.int32, device=cpu)
    prefilling = torch.tensor([step.kind == "prefill" or n > 1 for n in step.query], device=cpu)
    for backend, spec, names, builder in p.groups:
        bt = p.block_tables[spec.block_size]
        slot = _rows(compat.device_view(bt.slot_mapping), padded)
        for n in names:
            slots[n] = slot
        if md is None or builder is None:
            continue
        common = compat.common_metadata(
            query_start_loc=_rows(inputs["query_start_loc"], step.reqs + 1), query_start_loc_cpu=q,
            seq_lens=_rows(inputs["seq_lens"], step.reqs), seq_lens_cpu=seq, _seq_lens_cpu=seq,
            num_computed_tokens_cpu=done, _num_computed_tokens_cpu=done, seq_lens_cpu_upper_bound=seq,
            num_reqs=step.reqs, num_actual_tokens=padded, max_query_len=max(step.query),
            max_seq_len=int(seq.max()), block_table_tensor=_rows(compat.device_view(bt.block_table), step.reqs),
            slot_mapping=slot, causal=True, is_prefilling=prefilling,
            positions=_rows(inputs["positions"], padded))
        try:
            built = compat.build_metadata(builder, common)
        except Exception as e:  # noqa: BLE001
            notes.append(f"{compat.backend_name(backend)}: metadata not built for this step ({_why(e)}); attention runs with "
                         "the shapes its fake implementation sees")
            tracebacks.append(traceback.format_exc())
            continue
        for n in names:
            md[n] = built
    return md, slots


def _dispatched(sc: Scenario, step: Step, notes: list):
    """(padded tokens, CUDA-graph mode name, vLLM's mode) the runner uses for this step."""
    from vllm.config import CUDAGraphMode

    mnbt = sc.vllm_config.scheduler_config.max_num_batched_tokens
    if step.kind == "profile" or step.tokens > mnbt:  # the profile run forces eager; beyond the budget: no graph
        return step.tokens, "NONE", CUDAGraphMode.NONE
    from . import dispatch as D

    try:
        d = D.dispatch(sc, step.tokens, num_reqs=step.reqs, max_query_len=max(step.query))
    except Exception as e:  # noqa: BLE001 - the pass still runs, unpadded, and says so
        notes.append(f"CUDA-graph dispatch not answered here ({_why(e)}): the pass runs unpadded")
        return step.tokens, "unknown", CUDAGraphMode.NONE
    return int(d["padded_tokens"]), d["cudagraph_mode"], CUDAGraphMode[d["cudagraph_mode"]]


def _rename(module: str, rep: int, i: int) -> str:
    return re.sub(rf"\blayers\.{rep}(?=\.|$)", f"layers.{i}", module, count=1)


def _renamed(rec: _Op, rep: int, i: int) -> _Op:
    c = copy.copy(rec)
    c.module = _rename(rec.module, rep, i)
    return c


def _expand(items: list, reps: dict, module_of, rename) -> list:
    """The items of a pass over the built layers, with every later layer's items copied from the layer it
    repeats (inserted after the last built layer's items)."""
    built = {i for i, r in reps.items() if i == r}
    later = [i for i in sorted(reps) if i > max(built, default=-1)]
    if not later:
        return items
    by_layer: dict = {}
    for it in items:
        by_layer.setdefault(_layer_of(module_of(it)), []).append(it)
    last = max(built)
    out, inserted, seen_last = [], False, False
    for it in items:
        layer = _layer_of(module_of(it))
        if seen_last and not inserted and layer != last:
            for i in later:
                out += [rename(x, reps[i], i) for x in by_layer.get(reps[i], [])]
            inserted = True
        seen_last |= layer == last
        out.append(it)
    if not inserted:
        for i in later:
            out += [rename(x, reps[i], i) for x in by_layer.get(reps[i], [])]
    return out


@_keeping_gpu
def record(sc: Scenario, step: Step) -> Pass:
    """One forward pass of the scenario's model for ``step``, every op recorded (cached per scenario and step)."""
    key = (id(sc), step)
    hit = _passes.get(key)
    if hit is not None and hit[0] is sc:
        return hit[1]
    import torch

    p = prepare(sc)
    t0 = time.perf_counter()
    state, notes, stopped = _State(), list(p.notes), None
    padded, mode_name, mode = _dispatched(sc, step, notes)
    try:
        # At serving time torch's default device is the host (meta only while the model is built).
        with torch.inference_mode(), _env(sc, p.cfg, state, p.model), torch.device("cpu"), compat.eager(p.model), \
                compat.workspace():
            inputs = _runner_inputs(p)
            md, slots = _attention(p, step, padded, inputs, notes, state.tracebacks)
            state.phase = "model"
            with compat.forward_context(p.cfg, md, padded, mode, None, slots):
                hidden = p.model(input_ids=_rows(inputs["input_ids"], padded),
                                 positions=_rows(inputs["positions"], padded))
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            if step.sampler:
                state.phase = "logits"
                idx = torch.empty(step.reqs, dtype=torch.int64, device="meta")
                logits = compat.compute_logits(p.model, hidden[idx])
                state.phase = "sampler"
                meta = compat.dummy_sampling_metadata(step.reqs, logits.shape[-1], torch.device("cuda"))
                sampler, note = compat.sampler(p.cfg)
                if note:
                    notes.append(note)
                sampler(logits=logits, sampling_metadata=meta)
    except DiagError:
        raise
    except Exception as e:  # noqa: BLE001 - the census says where it stopped, in one line
        where = state.module() or state.phase
        stopped = f"stopped in {where} ({state.phase}) after {len(state.ops)} ops: {_why(e)}"
        state.tracebacks.append(traceback.format_exc())
    if state.stand_ins:
        notes.append(f"{len(state.stand_ins)} values of meta tensors read during the pass; 1 stood in for each")
    untraced = {r.op: r.note for r in state.ops if r.kind == "vllm op" and r.note.startswith("inner kernels not")}
    notes += [f"{op}: {why}; the outputs of its fake implementation stand in for its kernels"
              for op, why in untraced.items()]
    ops_all = _expand(state.ops, p.reps, lambda r: r.module, _renamed)
    outputs = _expand(state.outputs, p.reps, lambda o: o[0], lambda o, a, b: (_rename(o[0], a, b), *o[1:]))
    out = Pass(step, padded, mode_name, ops_all, outputs, notes, stopped, time.perf_counter() - t0,
               state.tracebacks, len(state.ops), state.ops)
    if len(_passes) >= _MAX_PASSES:
        _passes.pop(next(iter(_passes)))
    _passes[key] = (sc, out)
    return out


# --- what runs each op: Inductor, a custom kernel, eager torch -------------------------------------------

def _compile_facts(sc: Scenario) -> dict:
    comp = compat.compilation_summary(sc.vllm_config)
    mode = comp["compile_mode"]
    piecewise = bool(comp["compile_ranges"]) or "PIECEWISE" in mode or mode.startswith("VLLM_COMPILE")
    compiled = piecewise or not (mode.startswith("NONE") or mode.startswith("NO_COMPILATION"))
    return {"compiled": compiled, "piecewise": piecewise, "inductor": comp["compile_backend"] == "inductor",
            "splitting": compat.splitting_ops(sc.vllm_config) if piecewise else set(), "mode": mode,
            "backend": comp["compile_backend"]}


def _runs_as(rec: _Op, facts: dict, host: bool) -> str:
    """Who runs the op at serving time under the scenario's compilation config."""
    if rec.kind in ("view", "alloc"):
        return "no kernel"
    if host:
        return "host"
    if rec.kind == "vllm op" and rec.root is None:
        if not facts["compiled"]:
            return "custom op (eager)"
        return "splitting op (eager)" if rec.op in facts["splitting"] else "custom op (opaque to the compiler)"
    if rec.phase != "model" or not facts["compiled"]:
        return "triton kernel" if rec.kind == "triton" else "custom kernel" if rec.kind == "custom" else "eager torch"
    if rec.root is not None:
        inside = "splitting op" if rec.root in facts["splitting"] else "custom op"
        kernel = "triton kernel" if rec.kind == "triton" else "custom kernel" if rec.kind == "custom" else \
            "eager torch"
        return f"{kernel} (in {inside} {rec.root.split('::')[-1]})"
    if rec.kind in ("custom", "triton"):
        return "custom kernel (in the compiled graph)"
    if not facts["inductor"]:
        return f"compiled graph ({facts['backend']} backend)"
    return "inductor extern (cuBLAS)" if rec.op in _EXTERN else "inductor"


# aten ops Inductor leaves to an external library call (cuBLAS / cuDNN) instead of generating a kernel.
_EXTERN = {"aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
           "aten::_scaled_mm", "aten::convolution"}


def _layer_of(module: str):
    m = re.search(r"\blayers\.(\d+)\.", module + ".")
    return int(m.group(1)) if m else None


def _pattern(module: str) -> str:
    return re.sub(r"\blayers\.\d+\.", "layers.*.", module + ".").rstrip(".")


def _sites(p: Pass) -> list[str]:
    """A key per op that names the same op in passes of other sizes: module, op and occurrence in the module."""
    seen: dict = {}
    out = []
    for rec in p.ops:
        k = (rec.module, rec.op, rec.phase)
        seen[k] = seen.get(k, -1) + 1
        out.append(f"{rec.phase}|{rec.module}|{rec.op}#{seen[k]}")
    return out


# Launch grids of vLLM's C++ kernels whose grid follows from their arguments: grid.x = rows of the named tensor
# (its element count over its last dimension), read from the launch code in the csrc file named.
GRID_TABLE = {
    "_C::rms_norm": ("input", "csrc/layernorm_kernels.cu rms_norm: dim3 grid(num_tokens)"),
    "_C::fused_add_rms_norm": ("input", "csrc/layernorm_kernels.cu fused_add_rms_norm: dim3 grid(num_tokens)"),
    "_C::silu_and_mul": ("input", "csrc/activation_kernels.cu LAUNCH_ACTIVATION_GATE_KERNEL: dim3 grid(num_tokens)"),
    "_C::gelu_and_mul": ("input", "csrc/activation_kernels.cu LAUNCH_ACTIVATION_GATE_KERNEL: dim3 grid(num_tokens)"),
    "_C::rotary_embedding": ("positions", "csrc/pos_encoding_kernels.cu rotary_embedding: dim3 grid(num_tokens)"),
    "_C::dynamic_per_token_scaled_fp8_quant": (
        "input", "csrc/quantization/fp8/common.cu dynamic_per_token_scaled_fp8_quant: dim3 grid(num_tokens)"),
    "_C_cache_ops::reshape_and_cache_flash": (
        "slot_mapping", "csrc/cache_kernels.cu reshape_and_cache_flash: dim3 grid(num_tokens)"),
}


def _table_grid(rec: _Op):
    entry = GRID_TABLE.get(rec.op)
    if entry is None:
        return None, None
    role, source = entry
    t = next((t for r, t in rec.tensors if r == role), None)
    if t is None:
        return None, None
    rows = t.numel() // t.shape[-1] if t.dim() > 1 and t.shape[-1] else t.numel()
    return (int(rows), 1, 1), source


def ops(sc: Scenario, step: Step) -> pd.DataFrame:
    """Every op of one recorded pass, one row each.

    Columns: seq, phase, module, layer, op, kind (aten / custom / triton / vllm op / view / alloc), runs_as,
    parent, inputs / outputs ("shape dtype" per tensor), numel and index_max (the largest over its per-step
    tensors of max(numel - 1, span), the largest index from a data pointer), largest (the tensor holding it),
    frac_int32 (index_max / (2^31 - 1)), state_index_max (the same over the weights and KV caches it reads,
    which do not grow with the step), grid (x, y, z) and grid_source
    (the Triton launcher, or the kernel source of GRID_TABLE), frac_grid, note, site (the key that names this op
    in passes of other sizes)."""
    p = record(sc, step)
    if p.table is not None:
        return p.table
    facts = _compile_facts(sc)
    state = prepare(sc).state_storages
    rows = []
    for rec, site in zip(p.ops, _sites(p)):
        n_in = rec.scalars.get("_n_in", len(rec.tensors))
        infos = [(r, _info(t)) for r, t in rec.tensors]
        kept = [(r, i) for (r, i), (_, t) in zip(infos, rec.tensors) if t.untyped_storage()._cdata not in state]
        host = bool(infos) and all(i[4] == "cpu" for _, i in infos)
        top = max(kept, key=lambda ri: _index_max(ri[1]), default=None)
        held = [_index_max(i) for (_, i), (_, t) in zip(infos, rec.tensors) if t.untyped_storage()._cdata in state]
        grid, source = (rec.grid, "Triton launcher") if rec.grid else _table_grid(rec)
        rows.append({
            "seq": rec.seq, "phase": rec.phase, "module": rec.module, "layer": _layer_of(rec.module), "op": rec.op,
            "kind": rec.kind, "runs_as": _runs_as(rec, facts, host), "parent": rec.parent,
            "inputs": [f"{r}{list(i[0])} {i[3]}" for r, i in infos[:n_in]],
            "outputs": [f"{r}{list(i[0])} {i[3]}" for r, i in infos[n_in:]],
            "numel": max((i[5] for _, i in infos), default=0),
            "index_max": _index_max(top[1]) if top else -1, "largest": top[0] if top else None,
            "frac_int32": (_index_max(top[1]) / INT32_MAX) if top else 0.0,
            "state_index_max": max(held, default=None),
            "grid": grid, "grid_source": source,
            "frac_grid": max(g / lim for g, lim in zip(grid, GRID_LIMITS)) if grid else None,
            "note": rec.note, "site": site})
    p.table = pd.DataFrame(rows)
    return p.table


def tensors(sc: Scenario, step: Step) -> pd.DataFrame:
    """Every tensor every op of one pass reads or writes: seq, site, phase, module, op, kind, role, io, shape,
    stride, storage_offset, dtype, device, numel, span (sum((size - 1) x stride)), index_max (max(numel - 1,
    span)), max_offset (storage_offset + span: the largest offset into its allocation), state ("weight",
    "kv cache" or None for per-step tensors)."""
    p = record(sc, step)
    state = prepare(sc).state_storages
    rows = []
    for rec, site in zip(p.ops, _sites(p)):
        n_in = rec.scalars.get("_n_in", len(rec.tensors))
        for i, (role, t) in enumerate(rec.tensors):
            info = _info(t)
            shape, stride, off, dtype, dev, numel, span = info
            rows.append({"seq": rec.seq, "site": site, "phase": rec.phase, "module": rec.module, "op": rec.op,
                         "kind": rec.kind, "role": role, "io": "in" if i < n_in else "out", "shape": shape,
                         "stride": stride, "storage_offset": off, "dtype": dtype, "device": dev, "numel": numel,
                         "span": span, "index_max": _index_max(info), "max_offset": off + span,
                         "state": state.get(t.untyped_storage()._cdata)})
    return pd.DataFrame(rows)


# --- headroom against N: affine fits over a few passes ------------------------------------------------------

FAMILIES = ("prefill", "decode")


def family_step(sc: Scenario, family: str, n: int) -> Step:
    """The step of size ``n`` in a family: ``prefill`` = one request of n tokens; ``decode`` = n requests of one
    token each with 1024 cached; ``profile`` = vLLM's dummy run at n tokens."""
    if family == "prefill":
        return prefill(n)
    if family == "decode":
        return decode(n)
    if family == "profile":
        return profile(sc, n)
    raise DiagError(f"unknown step family {family!r} (one of {', '.join(FAMILIES + ('profile',))})")


def fit_points(sc: Scenario, family: str) -> tuple[int, int, int]:
    """Two sizes the fits are made from and a third, far above, that verifies them (a shape capped by chunking
    fails it). Prefill: the budget (at least 4096, above CUDA-graph padding), twice it, and 2^20 + 1 tokens (or
    4x the budget + 1). Decode: requests up to max_num_seqs (vLLM's attention metadata buffers hold no more),
    powers of two (CUDA-graph capture sizes: no padding)."""
    sch = sc.vllm_config.scheduler_config
    if family == "decode":
        m = 1 << max(sch.max_num_seqs.bit_length() - 1, 2)
        return m // 4, m // 2, m
    b = max(sch.max_num_batched_tokens, 4096)
    return b, 2 * b, max(4 * b, 1 << 20) + 1


MAX_CHECKS = 8  # crossings of shapes that are not affine all the way, checked by passes on both sides


HORIZON = 1 << 24  # crossings listed up to this many tokens (or requests) per step


def _grid_of(rec: _Op):
    return rec.grid if rec.grid else _table_grid(rec)[0]


def _measure(p: Pass, state_storages: dict) -> dict:
    """{(site, role): (shape, index_max, max_offset, io, dtype)} for every per-step tensor of every kernel, and
    {(site, "grid.x|y|z"): value} for every launch with a known grid."""
    out = {}
    for rec, site in zip(p.base, _sites(_BasePass(p))):
        if rec.kind in ("view", "alloc") or rec.phase == "setup":
            continue
        if rec.kind == "vllm op" and "not traced" not in rec.note:
            continue
        n_in = rec.scalars.get("_n_in", len(rec.tensors))
        for i, (role, t) in enumerate(rec.tensors):
            if t.device.type == "cpu" or state_storages.get(t.untyped_storage()._cdata):
                continue
            info = _info(t)
            out[(site, role)] = (info[0], _index_max(info), info[2] + info[6], "in" if i < n_in else "out",
                                 info[3])
        g = _grid_of(rec)
        if g:
            for axis, v in zip("xyz", g):
                out[(site, f"grid.{axis}")] = ((v,), v, v, "grid", "")
    return out


class _BasePass:
    """A view of a pass restricted to the ops actually run (for their site keys)."""

    def __init__(self, p: Pass):
        self.ops = p.base


def _affine(xs, ys):
    """(a, b) with y = a + b x through the first two points, and whether the third agrees (Fractions)."""
    from fractions import Fraction

    b = Fraction(ys[1] - ys[0], xs[1] - xs[0])
    a = ys[0] - b * xs[0]
    return a, b, a + b * xs[2] == ys[2]


def _crossing(a, b, limit: int):
    """The smallest integer x >= 1 with a + b x > limit (None: never; 1: already over at every x)."""
    if a + b > limit:
        return 1
    if b <= 0:
        return None
    return int(math.floor((limit - a) / b)) + 1


def _dim_text(a, b) -> str:
    a, b = (int(v) if v.denominator == 1 else float(v) for v in (a, b))
    if b == 0:
        return f"{a:g}" if isinstance(a, float) else str(a)
    n = "N" if b == 1 else f"{b:g}N"
    return n if a == 0 else f"({n} {'+' if a > 0 else '-'} {abs(a)})"


@functools.lru_cache(maxsize=16)
def _fits_cached(sc_id: int, family: str):
    sc = _scenarios[sc_id]
    p = prepare(sc)
    xs = fit_points(sc, family)
    passes = [record(sc, family_step(sc, family, x)) for x in xs]
    for x, ps in zip(xs, passes):
        if ps.stopped:
            raise DiagError(f"the census of a {family} step of {x} tokens {ps.stopped}")
    vals = [_measure(ps, p.state_storages) for ps in passes]
    return xs, vals, passes


_scenarios: dict[int, Scenario] = {}


def _fits(sc: Scenario, family: str):
    _scenarios[id(sc)] = sc
    return _fits_cached(id(sc), family)


_checks: dict = {}


def _confirmed(sc: Scenario, family: str, key, n: int, limit: int) -> bool:
    """Whether passes at n - 1 and n put the tensor (or grid) at or under the limit and over it."""
    done = _checks.setdefault((id(sc), family), set())
    if n not in done and len(done) >= MAX_CHECKS:
        return False
    done.add(n)
    st = prepare(sc).state_storages
    below, above = (_measure(record(sc, family_step(sc, family, m)), st).get(key) for m in (n - 1, n))
    return below is not None and above is not None and below[1] <= limit < above[1]


@_keeping_gpu
def thresholds(sc: Scenario, family: str = "prefill") -> pd.DataFrame:
    """Every per-step tensor and launch grid of every kernel against its limit as N grows, one row per op site
    (layers that repeat a built layer share its rows: ``layers`` counts them).

    Shapes are affine in N (tokens for ``prefill``, requests for ``decode``): fitted from two passes and verified
    on a third (``affine``). Columns: family, phase, module, layers, op, runs_as, role, io, dtype, formula (the
    shape, e.g. ``N x 28672``), slope and const of its index_max (or of the grid dimension), limit, tokens (the
    smallest N at which an index into it from its data pointer passes the limit; 1: over at every N; None:
    never, or a shape that is not affine whose crossing no pass confirmed), affine, tokens_alloc (the same for
    its largest offset into its allocation, which differs for views
    into a shared workspace), source."""
    p = prepare(sc)
    xs, vals, passes = _fits(sc, family)
    facts = _compile_facts(sc)
    by_site = {site: rec for rec, site in zip(passes[0].base, _sites(_BasePass(passes[0])))}
    counts: dict = {}
    for i, r in p.reps.items():
        counts[r] = counts.get(r, 0) + 1
    rows, seen = [], {}
    for key, v0 in vals[0].items():
        if key not in vals[1] or key not in vals[2]:
            continue
        site, role = key
        rec = by_site[site]
        v = [vals[k][key] for k in range(3)]
        layer = _layer_of(rec.module)
        group = (_pattern(rec.module), rec.op, site.rsplit("#", 1)[-1], role, rec.phase, tuple(x[1] for x in v))
        if group in seen:  # the same op in another built layer, the same sizes: one row, its layers counted
            if layer is not None and layer not in seen[group][1]:
                seen[group][1].add(layer)
                seen[group][0]["layers"] += counts.get(layer, 0)
            continue
        a, b, ok = _affine(xs, [x[1] for x in v])
        a2, b2, ok2 = _affine(xs, [x[2] for x in v])
        grid = role.startswith("grid.")
        limit = GRID_LIMITS["xyz".index(role[-1])] if grid else INT32_MAX
        dims = [_affine(xs, [x[0][d] for x in v]) if all(len(x[0]) == len(v0[0]) for x in v) else None
                for d in range(len(v0[0]))]
        formula = " x ".join(_dim_text(d[0], d[1]) for d in dims) if all(dims) else str(v0[0])
        tokens = _crossing(a, b, limit) if ok else None
        if not ok:  # not affine up to the far point (e.g. chunked): the first two points' crossing, if a pass
            a1, b1, _ = _affine(xs[:2] + xs[:1], [x[1] for x in v[:2]] + [v[0][1]])  # on each side confirms it
            cand = _crossing(a1, b1, limit)
            tokens = cand if cand and xs[0] <= cand < xs[2] and _confirmed(sc, family, key, cand, limit) else None
        rows.append({"family": family, "site": site, "phase": rec.phase, "module": _pattern(rec.module),
                     "layers": counts.get(layer, 0) if layer is not None and counts else 1, "op": rec.op,
                     "runs_as": _runs_as(rec, facts, False), "role": role, "io": v0[3], "dtype": v0[4],
                     "formula": formula, "slope": float(b), "const": float(a), "limit": limit,
                     "tokens": tokens, "affine": bool(ok),
                     "tokens_alloc": None if grid or not ok2 else _crossing(a2, b2, limit),
                     "source": ("Triton launcher" if rec.grid else _table_grid(rec)[1]) if grid else
                     "vLLM forward (census)"})
        seen[group] = (rows[-1], {layer})
    df = pd.DataFrame(rows)
    if len(df):
        df["tokens"] = df["tokens"].astype("Int64")
        df["tokens_alloc"] = df["tokens_alloc"].astype("Int64")
    return df


# --- into the boundary map -----------------------------------------------------------------------------------

def _crossings(sc: Scenario) -> pd.DataFrame:
    """Every crossing of both families, one row per op site; decode rows only where a prefill of the same
    size stays constant (what grows with requests, not tokens: logits, the sampler, attention metadata)."""
    pre = thresholds(sc, "prefill")
    dec = thresholds(sc, "decode")
    grows = set(zip(pre.loc[pre["slope"] > 0, "module"], pre.loc[pre["slope"] > 0, "op"],
                    pre.loc[pre["slope"] > 0, "role"])) if len(pre) else set()
    if len(dec):
        dec = dec[[k not in grows for k in zip(dec["module"], dec["op"], dec["role"])]]
    df = pd.concat([pre, dec], ignore_index=True)
    return df[df["tokens"].notna() & (df["tokens"] > 1) & (df["tokens"] <= HORIZON)] if len(df) else df


def boundary_rows(sc: Scenario) -> list[dict]:
    """Every census crossing as a boundary-map row (knob axis: steps beyond the budget), one row per token count
    and family, naming the first op that crosses there and how many more do.

    Columns as diaglib.predict.boundaries rows: axis, tokens, below, above, kind, rule, feature, distance,
    source."""
    op = sc.vllm_config.scheduler_config.max_num_batched_tokens
    try:
        df = _crossings(sc)
    except DiagError:  # the census cannot run here: status() says why, the rest of the map stands
        return []
    rows = []
    for (family, tokens), g in df.groupby(["family", "tokens"], sort=True):
        g = g.sort_values(["layers", "op"], ascending=[False, True])
        first = g.iloc[0]
        grid = first["role"].startswith("grid.")
        what = "requests decoding one token each" if family == "decode" else "tokens in one step"
        more = len(g) - 1
        limit = f"CUDA's grid limit {first['limit']:,}" if grid else "2^31 - 1"
        rule = (f"{first['op']} {first['role']} [{first['formula']}] passes {limit} at N = {int(tokens):,} "
                f"{what}" + (f" (+ {more} more op tensors)" if more else "")
                + (f"; needs max_num_seqs >= {int(tokens):,}" if family == "decode" else ""))
        rows.append({"axis": "knob", "tokens": int(tokens),
                     "below": "within grid limit" if grid else "fits int32",
                     "above": "over grid limit" if grid else "over INT32_MAX",
                     "kind": "grid limit" if grid else "int32", "rule": rule,
                     "feature": f"census:{family}:{first['site']}:{first['role']}",
                     "distance": abs(int(tokens) - op), "source": "vLLM forward (census)"})
    return rows


def feature_value(sc: Scenario, feature: str, n: int) -> str:
    """A census boundary feature (``census:FAMILY:SITE:ROLE``) at n: the tensor's largest index (or the grid
    dimension) against its limit, from the affine fit that a third pass verified."""
    _, family, rest = feature.split(":", 2)
    site, role = rest.rsplit(":", 1)
    th = thresholds(sc, family)
    hit = th[(th["site"] == site) & (th["role"] == role)]
    if hit.empty:
        return "absent"
    r = hit.iloc[0]
    grid = role.startswith("grid.")
    over = r["const"] + r["slope"] * n > r["limit"]
    return ("over grid limit" if grid else "over INT32_MAX") if over else \
        ("within grid limit" if grid else "fits int32")


# --- one step, for people ----------------------------------------------------------------------------------

def step_for(sc: Scenario, tokens: int, reqs: int | None = None, decode_step: bool = False,
             kind: str | None = None) -> Step:
    """The step `diaglib kernels` describes: a prefill of ``tokens`` over ``reqs`` requests (default 1), a decode
    batch (``decode_step``: ``tokens`` requests of one token, or ``reqs``), a mix, or the profile run."""
    if kind == "profile":
        return profile(sc, tokens)
    if kind == "mixed":
        return mixed(tokens, reqs or 2)
    if decode_step:
        if reqs is not None and tokens is not None and reqs != tokens:
            raise DiagError(f"a decode step of {reqs} requests holds {reqs} tokens, not {tokens}")
        return decode(reqs or tokens)
    return prefill(tokens, reqs or 1)


def status(sc: Scenario) -> str:
    """One line: whether the census ran the scenario's forward on this machine, or where it stopped."""
    try:
        p = record(sc, prefill(min(4096, sc.vllm_config.scheduler_config.max_num_batched_tokens)))
    except DiagError as e:
        return f"kernel census: {e}"
    if p.stopped:
        return f"kernel census: the forward {p.stopped}"
    return f"kernel census: {p.recorded} ops run, {len(p.ops)} in the whole model ({compat.installed()})"


def summary(sc: Scenario, step: Step) -> dict:
    """`diaglib kernels`: the step, who runs what, every kernel (repeated layers folded), the ops nearest the
    int32 limit at this step, and the first crossings as N grows (prefill steps) or as requests grow (decode)."""
    _check_step(sc, step)
    p = record(sc, step)
    df = ops(sc, step)
    kernels = df[~df["runs_as"].isin(["no kernel", "host"]) & (df["kind"] != "vllm op")].copy()
    kernels["module"] = kernels["module"].map(_pattern)
    folded = (kernels.groupby(["module", "op", "runs_as"], sort=False)
              .agg(calls=("seq", "size"), frac_int32=("frac_int32", "max"), numel=("numel", "max"),
                   grid=("grid", "first"), largest=("largest", "first"), outputs=("outputs", "first"))
              .reset_index())
    family = "decode" if step.kind == "decode" else "prefill"
    info = {"step": {"kind": step.kind, "tokens": step.tokens, "reqs": step.reqs, "padded": p.padded,
                     "cudagraph": p.cudagraph},
            "vllm_version": compat.installed(), "compile": {k: (sorted(v) if isinstance(v, set) else v)
                                                           for k, v in _compile_facts(sc).items()},
            "custom_ops": pd.DataFrame(_custom_ops(sc)), "notes": p.notes, "stopped": p.stopped,
            "ops_run": p.recorded, "ops_total": len(p.ops), "seconds": round(p.seconds, 2),
            "kernels": folded, "nearest": folded.sort_values("frac_int32", ascending=False).head(10)}
    info["runner_buffers"] = runner_buffers(sc).head(8)
    if p.stopped is None:
        th = thresholds(sc, family)
        info["family"] = family
        info["crossings"] = th[th["tokens"].notna()].sort_values("tokens").head(15) if len(th) else th
    return info


def _custom_ops(sc: Scenario) -> list[dict]:
    return compat.custom_ops(prepare(sc).model)


def format_text(info: dict) -> str:
    """`diaglib kernels` as text."""
    s = info["step"]
    c = info["compile"]
    head = [f"Step: {s['kind']}, {s['tokens']:,} tokens from {s['reqs']} request(s), run at {s['padded']:,} "
            f"(CUDA graph {s['cudagraph']}); vLLM {info['vllm_version']}",
            f"Compilation: {c['mode']}, backend {c['backend']}; splitting ops: "
            + (", ".join(c["splitting"]) if c["splitting"] else "none"),
            f"Ops: {info['ops_run']:,} run, {info['ops_total']:,} in the whole model ({info['seconds']} s)"]
    head += [f"note: {n}" for n in info["notes"]]
    if info["stopped"]:
        head.append(f"STOPPED: {info['stopped']}")
    co = info["custom_ops"]
    parts = ["\n".join(head)]
    if len(co):
        parts.append("CustomOps (custom kernel = enabled; forward_native = torch ops Inductor compiles)\n"
                     + co[["custom_op", "class", "enabled", "runs"]].to_string(index=False))
    k = info["kernels"].assign(frac_int32=lambda d: d["frac_int32"].map("{:.2e}".format))
    parts.append("Kernels (repeated layers folded; calls = launches per step)\n"
                 + k[["module", "op", "runs_as", "calls", "largest", "frac_int32", "grid"]].to_string(index=False))
    n = info["nearest"].assign(frac_int32=lambda d: d["frac_int32"].map("{:.3f}".format))
    parts.append("Nearest the int32 limit at this step\n"
                 + n[["module", "op", "largest", "outputs", "frac_int32"]].to_string(index=False))
    rb = info["runner_buffers"].assign(index_frac=lambda d: d["index_frac"].map("{:.2e}".format),
                                       value_frac=lambda d: d["value_frac"].map(lambda v: "-" if v != v or v is None
                                                                                else f"{v:.2e}"))
    parts.append("Model runner buffers, largest first (index_frac: largest index / (2^31 - 1); value_frac: the "
                 "largest value held / its dtype's largest)\n"
                 + rb[["buffer", "shape", "dtype", "device", "index_frac", "holds", "value_frac"]]
                 .to_string(index=False))
    if "crossings" in info and len(info["crossings"]):
        what = "requests (decode)" if info["family"] == "decode" else "tokens per step"
        cr = info["crossings"]
        cr = cr.assign(index_per_N=cr["slope"].map("{:,.0f}".format))
        parts.append(f"First to cross as {what} grow (formula: the tensor's shape in N; index_per_N: how fast its "
                     "largest index grows, a strided view's stride included; tokens = the first N over the limit)\n"
                     + cr[["module", "op", "role", "formula", "index_per_N", "tokens", "layers"]]
                     .to_string(index=False))
    return "\n\n".join(parts)


# --- the model runner's own buffers ------------------------------------------------------------------------

def _everything_meta_mode(created: dict):
    """While vLLM's InputBatch is constructed: every tensor (host ones too) is made on the meta device, and a host
    tensor's ``.numpy()`` is a zero-stride array of its shape (no memory); ``created`` maps each to the device
    vLLM asked for."""
    import numpy as np
    import torch
    from torch.overrides import TorchFunctionMode

    meta = torch.device("meta")

    class _AllMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            name = getattr(func, "__name__", "")
            if name == "numpy" and args and isinstance(args[0], torch.Tensor):
                t = args[0]
                dtype = np.dtype(str(t.dtype).removeprefix("torch.").replace("bool", "bool_"))
                return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(t.shape),
                                                       strides=(0,) * t.dim())
            if name in ("pin_memory", "cuda"):
                return args[0]
            asked = kwargs.get("device")
            if name in ("zeros", "empty", "ones", "full", "arange", "tensor", "empty_like", "zeros_like"):
                kwargs["device"] = meta
                kwargs.pop("pin_memory", None)
                out = func(*args, **kwargs)
                if isinstance(out, torch.Tensor):
                    created[id(out)] = "gpu" if _is_gpu(asked) else "cpu"
                return out
            return func(*args, **kwargs)

    return _AllMeta()


def _walk_buffers(obj, prefix: str, created: dict, out: dict, depth: int = 0):
    import torch

    if depth > 3:
        return
    items = vars(obj).items() if hasattr(obj, "__dict__") else []
    for k, v in items:
        name = f"{prefix}.{k}"
        if isinstance(v, torch.Tensor):
            if id(v) in created and id(v) not in out:
                out[id(v)] = (name, v, created[id(v)])
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if hasattr(x, "__dict__") and not isinstance(x, torch.Tensor):
                    _walk_buffers(x, f"{name}[{i}]", created, out, depth + 1)
        elif hasattr(v, "__dict__") and type(v).__module__.startswith("vllm"):
            _walk_buffers(v, name, created, out, depth + 1)


# What the values held in a buffer reach (derived from what each holds), by the end of its name.
_VALUE_BOUNDS = (
    ("slot_mapping", "KV slots: blocks x block_size - 1", lambda b: b["num_blocks"] * b["block_size"] - 1),
    ("block_table", "KV block ids: blocks - 1", lambda b: b["num_blocks"] - 1),
    ("token_ids", "token ids: vocab - 1", lambda b: b["vocab"] - 1),
    ("input_ids", "token ids: vocab - 1", lambda b: b["vocab"] - 1),
    ("positions", "positions: max_model_len - 1", lambda b: b["max_model_len"] - 1),
    ("seq_lens", "sequence lengths: max_model_len", lambda b: b["max_model_len"]),
    ("num_computed_tokens", "tokens: max_model_len", lambda b: b["max_model_len"]),
    ("num_tokens", "tokens: max_model_len", lambda b: b["max_model_len"]),
    ("num_prompt_tokens", "tokens: max_model_len", lambda b: b["max_model_len"]),
    ("query_start_loc", "token offsets: max_num_batched_tokens", lambda b: b["max_num_batched_tokens"]),
    ("req_indices", "request indices: max_num_seqs - 1", lambda b: b["max_num_seqs"] - 1),
    ("query_pos", "query positions: max_num_batched_tokens - 1", lambda b: b["max_num_batched_tokens"] - 1),
)


@_keeping_gpu
def runner_buffers(sc: Scenario) -> pd.DataFrame:
    """The model runner's persistent tensors sized from max_num_batched_tokens, max_num_seqs, max_model_len and
    the KV block count, with their index headroom and the headroom of the values they hold.

    vLLM's own InputBatch (token ids, block tables, slot mapping, sampling tensors) is constructed with every
    tensor on the meta device; the runner's own buffers are mirrored (compat.runner_buffers, derived).
    Columns: buffer, shape, dtype, device, numel, index_frac (largest index / (2^31 - 1)), holds, value_max,
    value_frac (value_max / the dtype's largest value), source."""
    import torch

    p = prepare(sc)
    cfg = p.cfg
    created: dict = {}
    found: dict = {}
    sizes = sorted({spec.block_size for _, spec, _, _ in p.groups}) or [cfg.cache_config.block_size]
    from vllm.config import set_current_vllm_config

    batch, why = None, None
    with layers.rank0(sc), set_current_vllm_config(cfg), _everything_meta_mode(created):
        try:
            batch = compat.input_batch(cfg, sizes)
        except Exception as e:  # noqa: BLE001 - the runner's own rows still stand; the note says why
            why = _why(e)
    if batch is not None:
        _walk_buffers(batch, "input_batch", created, found)
    rows = []
    for name, t, dev in found.values():
        rows.append((name, tuple(t.shape), t.dtype, dev, f"vLLM {type(batch).__name__}"))
    rows += [(n, s, d, dev, "derived: GPUModelRunner.__init__") for n, s, d, dev in compat.runner_buffers(cfg)]
    bounds = {"num_blocks": p.num_blocks, "block_size": sizes[0], "vocab": cfg.model_config.get_vocab_size(),
              "max_model_len": cfg.model_config.max_model_len, "max_num_seqs": cfg.scheduler_config.max_num_seqs,
              "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens}
    out = []
    for name, shape, dtype, dev, source in rows:
        numel = math.prod(shape)
        holds, vmax = next(((h, f(bounds)) for key, h, f in _VALUE_BOUNDS if name.split(".")[-1].startswith(key)
                            or name.rsplit(".", 2)[-2:][0].endswith(key)), (None, None))
        top = (torch.iinfo(dtype).max if not dtype.is_floating_point and dtype != torch.bool else None)
        out.append({"buffer": name, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "device": dev,
                    "numel": numel, "index_frac": max(numel - 1, 0) / INT32_MAX, "holds": holds,
                    "value_max": vmax, "value_frac": (vmax / top) if vmax is not None and top else None,
                    "source": source})
    df = pd.DataFrame(out).sort_values("index_frac", ascending=False, kind="stable").reset_index(drop=True)
    df.attrs["note"] = f"InputBatch not constructed here ({why})" if why else None
    return df


# --- what a GPU trace of the step should show ----------------------------------------------------------------

_TRACE_HINTS = (  # (who runs it, a regex for the CUDA kernel names a torch-profiler trace shows for it)
    ("inductor extern (cuBLAS)", r"gemm|cublas|xmma|cutlass|sm90|nvjet"),
    ("inductor", r"^triton_"),
)
_OP_HINTS = {"collective": r"nccl|allreduce|all_reduce|all_gather|cross_device_reduce|reduce_scatter",
             "_vllm_fa3_C::fwd": r"flash_fwd|FlashAttn|flash::", "_C::cutlass_scaled_mm": r"cutlass|sm90|gemm",
             "_C::cutlass_moe_mm": r"cutlass|grouped|gemm",
             # ops whose kernels carry other names (as an H200 trace shows them, data/live/h200-vllm-0.20.2-i17)
             "_vllm_fa3_C::get_scheduler_metadata": r"prepare_varlen_num_blocks|get_scheduler_metadata",
             "_moe_C::moe_permute": r"moe_permute|expandInputRows|computeExpertFirstTokenOffset|radix_sort|"
                                    r"preprocessTopkId",
             "_moe_C::moe_unpermute": r"moe_unpermute|finalizeMoeRouting",
             "_C::get_cutlass_moe_mm_problem_sizes_from_expert_offsets": r"problem_sizes_from_expert_offsets",
             "_C::per_token_group_fp8_quant": r"per_token_group_(?:fp8_)?quant",
             "_C::silu_and_mul": r"silu_and_mul|act_and_mul_kernel", "_C::gelu_and_mul": r"gelu_and_mul|act_and_mul_kernel"}


def launches(sc: Scenario, step: Step) -> pd.DataFrame:
    """The kernels one step launches on the GPU, in order, for matching against a torch-profiler trace: seq,
    phase, module, op, runs_as, grid (where the census knows it), match (a regex over CUDA kernel names: the
    Triton kernel's own name, the custom op's name, ``^triton_`` for what Inductor fuses, cuBLAS/CUTLASS names
    for GEMMs, NCCL for collectives). Consecutive ops Inductor fuses share one ``fusion`` number (one or more
    triton_* kernels between two other launches)."""
    df = ops(sc, step)
    k = df[~df["runs_as"].isin(["no kernel", "host"]) & (df["kind"] != "vllm op")].copy()
    match = []
    for op, kind, runs in zip(k["op"], k["kind"], k["runs_as"]):
        hint = _OP_HINTS.get(op) or _OP_HINTS.get(kind)
        if hint is None and kind == "triton":
            hint = "^" + re.escape(op.split("::", 1)[1]) + "$"
        if hint is None:
            hint = next((h for who, h in _TRACE_HINTS if runs == who), None)
        if hint is None:  # a custom kernel or an eager torch op: its name, as the kernel's name often carries it
            hint = re.escape(op.split("::", 1)[-1].split(".")[0].strip("_"))
        match.append(hint)
    k["match"] = match
    fused = (k["runs_as"] == "inductor")
    k["fusion"] = (fused & ~fused.shift(fill_value=False)).cumsum().where(fused)
    return k[["seq", "phase", "module", "op", "runs_as", "grid", "match", "fusion"]].reset_index(drop=True)
