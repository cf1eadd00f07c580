"""MoE layers and kernels: the layer class that holds the experts, what vLLM's MoE quant method selects, the
experts object it runs for M tokens, its workspaces, activation chunking and the Triton config inputs.

Read off /work/vllm-src/X/vllm/model_executor/layers/fused_moe/ and quantization/; each difference is detected
by what the installed vLLM has, never by its version string.

- MoE layer class: ``FusedMoE`` (a class, up to 0.21; 0.22-0.23 alias it ``RoutedExperts``); from 0.24
  ``RoutedExperts`` holds the weights inside the ``MoERunner`` that ``FusedMoE()`` / ``FusedMoEFactory()``
  (0.27+) return.
- Experts selection: 0.10.0-0.13.0 the method's ``apply()`` calls a function chosen by flags (``use_cutlass``,
  ``use_marlin``, ``allow_deep_gemm``, ``flashinfer_moe_backend``, ...); 0.14.1 a ``*_backend`` enum at init,
  the modular kernel built by the oracle's ``make_<q>_moe_kernel`` after loading; 0.15.1+ ``*_backend`` and
  ``experts_cls`` at init, ``make_<q>_moe_kernel`` builds ``experts_cls(moe_config=, quant_config=)``;
  fallback experts (TritonOrCutlassExperts, TritonOrDeepGemmExperts) pick per M (``_select_experts_impl``);
  monolithic experts (FlashInfer TRT-LLM, OAI Triton MXFP4) have no ``workspace_shapes``.
- ``workspace_shapes``: 0.10 ``(a, aq, M, N, K, topk, E, E_local, meta)`` returning the dtype too; 0.11-0.13
  ``(M, N, K, topk, E, E_local, meta)`` with ``workspace_dtype(act_dtype)``; 0.14+ adds ``activation``.
- Constructors change almost every release (TritonExperts: quant flags 0.10, ``quant_config`` 0.11-0.14,
  ``(moe_config, quant_config)`` 0.15+; CutlassExpertsFp8 differs in each of 0.10.0 .. 0.15.1): experts are
  built by calling vLLM's constructor with the parameters it names (:func:`_construct`).
- Activation chunking: VLLM_FUSED_MOE_CHUNK_SIZE (32768 to 0.11, 16384 from 0.12) 0.10.0-0.17.1, the rule in
  the modular kernel's ``_chunk_info`` from 0.11; no chunking from 0.18.1.
- Triton config lookup (get_config_file_name, get_moe_configs, try_get_optimal_moe_config): fused_moe/fused_moe.py
  in every release; its dtype part: ``get_config_dtype_str(flags)`` 0.10, ``quant_config.config_name`` 0.11+.
- CUTLASS FP8 permutation: a_map / c_map and int32 expert offsets 0.10.0-0.10.1.1; ``moe_permute`` (int64
  first-token offsets, inverse permutation) from 0.10.2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import sys
import types

from .detect import VllmApiMissing, first, has
from .releases import installed

_FM = "vllm.model_executor.layers.fused_moe"
_MK = f"{_FM}.modular_kernel"
_configured: dict[int, tuple[object, dict]] = {}  # id(layer) -> (layer, selection), newest last
_MAX_CONFIGURED = 64


# --- the MoE layer ------------------------------------------------------------------------------------

@functools.cache
def moe_layer_class() -> type:
    """vLLM's class of the module that holds the routed experts' weights and quant method."""
    for path in (f"{_FM}:RoutedExperts", f"{_FM}.layer:FusedMoE"):
        if has(path):
            cls = first("MoE layer class", path)
            if isinstance(cls, type):
                return cls
    raise VllmApiMissing(f"vLLM {installed()} has no MoE layer class (looked for {_FM}:RoutedExperts, "
                         f"{_FM}.layer:FusedMoE as a class)")


def moe_config(layer):
    """vLLM's FusedMoEConfig of the layer: its quant method's (``moe``), or the layer's own (0.10.0 methods
    without one)."""
    return getattr(layer.quant_method, "moe", None) or layer.moe_config


def activation(layer):
    """The activation the layer hands its experts (a string up to 0.16, MoEActivation from 0.17)."""
    return getattr(layer, "activation", None) or getattr(moe_config(layer), "activation", "silu")


def in_dtype(layer):
    """The activation dtype the MoE layer receives (vLLM's FusedMoEConfig.in_dtype)."""
    return moe_config(layer).in_dtype


# --- building vLLM's objects with the arguments they name ---------------------------------------------

def call_named(fn, pool: dict):
    """Call vLLM's ``fn`` (a class or function) with the arguments it names, taken from ``pool``; one line
    naming what is missing where it asks for a required argument ``pool`` lacks."""
    target = fn.__init__ if isinstance(fn, type) else fn
    params = inspect.signature(target).parameters
    kwargs = {n: pool[n] for n in params if n in pool}
    missing = [n for n, p in params.items() if n != "self" and n not in kwargs and p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise VllmApiMissing(f"vLLM {installed()} {fn.__name__}() needs {', '.join(missing)}, which diaglib "
                             "cannot supply")
    return fn(**kwargs)


@contextlib.contextmanager
def _untouched(layer):
    """Parameters vLLM registers on ``layer`` inside (e.g. FlashInfer alphas) are removed again afterwards."""
    before = set(layer._parameters)
    try:
        yield
    finally:
        for name in set(layer._parameters) - before:
            del layer._parameters[name]


def _meta_moe_config(layer):
    """The layer's FusedMoEConfig with its device on meta (experts allocate small tensors on it)."""
    moe = moe_config(layer)
    if dataclasses.is_dataclass(moe) and "device" in {f.name for f in dataclasses.fields(moe)}:
        import torch

        return dataclasses.replace(moe, device=torch.device("meta"))
    return moe


def _quant_config(layer):
    """The FusedMoEQuantConfig the method hands its experts (0.11+), None before or where it cannot be built."""
    qm = layer.quant_method
    get = getattr(qm, "get_fused_moe_quant_config", None)
    if get is None:
        return None
    with _untouched(layer):
        try:
            return get(layer)
        except (AttributeError, AssertionError, RuntimeError, TypeError, ValueError, NotImplementedError):
            return getattr(qm, "moe_quant_config", None)


def _strategy(qm, which: str) -> str | None:
    """A compressed-tensors method's input/weight quantization strategy (None for other methods)."""
    s = getattr(getattr(qm, which, None), "strategy", None)
    return getattr(s, "value", s)


def block_shape(layer) -> list[int] | None:
    """The weight quantization block [block_n, block_k] of the layer's method, None when not block-quantized."""
    qm = layer.quant_method
    for obj in (qm, getattr(qm, "quant_config", None), layer):
        b = getattr(obj, "weight_block_size", None)
        if b:
            return list(b)
    return None


def _pool(layer, qc) -> dict:
    """Everything vLLM's MoE experts constructors ask for, by parameter name, for this layer."""
    import torch

    qm = layer.quant_method
    E, N, K = layer.local_num_experts, layer.intermediate_size_per_partition, layer.hidden_size
    fp8 = layer.w13_weight.dtype == torch.float8_e4m3fn
    per_token = _strategy(qm, "input_quant") == "token" or bool(getattr(qc, "per_act_token_quant", False))

    def strides(name, value):  # what process_weights_after_loading stores, or the same full((E,), v) on meta
        t = getattr(qm, name, None)
        return t if t is not None else torch.full((E,), value, dtype=torch.int64, device="meta")

    moe = _meta_moe_config(layer)
    pool = {"moe_config": moe, "moe": moe, "quant_config": qc, "moe_quant_config": qc, "layer": layer,
            "out_dtype": in_dtype(layer), "e": E, "n": N, "k": K, "device": torch.device("meta"),
            "max_experts_per_worker": E, "use_fp8_w8a8": fp8, "use_int8_w8a8": False, "use_int8_w8a16": False,
            "use_int4_w4a16": False, "use_mxfp4_w4a4": False, "per_act_token_quant": per_token,
            "per_out_ch_quant": _strategy(qm, "weight_quant") == "channel", "block_shape": block_shape(layer),
            "ab_strides1": strides("ab_strides1_c_strides2", K), "c_strides2": strides("ab_strides1_c_strides2", K),
            "ab_strides2": strides("ab_strides2", N), "c_strides1": strides("c_strides1", 2 * N),
            "routing_tables": None, "experts_cls": getattr(qm, "experts_cls", None)}
    for name in ("g1_alphas", "g2_alphas", "a1_gscale", "a2_gscale"):  # legacy CUTLASS FP4 (set after loading)
        pool[name] = getattr(layer, name, None)
        if pool[name] is None:
            pool[name] = torch.empty(E, dtype=torch.float32, device="meta")
    pool.update({k: v for k, v in vars(qm).items() if k.endswith("_backend")})
    return pool


# --- what vLLM selects ---------------------------------------------------------------------------------

def _backend_enum(qm):
    """The method's ``*_backend`` enum member (0.14+), None before."""
    return next((v for k, v in vars(qm).items() if k.endswith("_backend") and hasattr(v, "value")
                 and hasattr(v, "name")), None)


def _is_monolithic(cls) -> bool:
    check = getattr(cls, "is_monolithic", None)
    return bool(check()) if callable(check) else False


def _kernel_builder(qm):
    """The oracle's ``make_<q>_moe_kernel`` the method's module uses, matched by the method's backend attribute."""
    names = {k for k in vars(qm) if k.endswith("_backend")}
    for klass in type(qm).__mro__:
        mod = sys.modules.get(klass.__module__)
        for name, fn in vars(mod or types.SimpleNamespace()).items():
            if (name.startswith("make_") and name.endswith("moe_kernel") and callable(fn)
                    and names & set(inspect.signature(fn).parameters)):
                return fn
    return None


# Function era (up to 0.13): the first flag set on the method names what its apply() calls: (flag, backend,
# experts class built / function called, whether it is a modular experts class, vLLM's shape check at M).
# Order and calls read off apply() in quantization/{fp8,modelopt,mxfp4}.py, compressed_tensors_moe.py and
# fused_moe/layer.py (UnquantizedFusedMoEMethod) of 0.10.1.1 and 0.13.0; 0.10.0 has a CUTLASS-only method
# (CompressedTensorsW8A8Fp8MoECutlassMethod: is_fp8_w8a8_sm100, no use_cutlass flag).
_LEGACY_RULES = (
    ("rocm_aiter_moe_enabled", "ROCm AITER (rocm_aiter_fused_experts)", "rocm_aiter_fused_experts", False, None),
    ("use_cutlass", "CUTLASS FP8 (cutlass_moe_fp8)", "CutlassExpertsFp8", True, None),
    ("flashinfer_moe_enabled", "FlashInfer FP8 (flashinfer_fused_moe_blockscale_fp8)",
     "flashinfer_fused_moe_blockscale_fp8", False, None),
    ("flashinfer_moe_backend", "FlashInfer {} fused MoE", "flashinfer fused MoE", False, None),
    ("use_marlin", "Marlin (fused_marlin_moe)", "fused_marlin_moe", False, None),
    ("cutlass_nvfp4_supported", "CUTLASS FP4 (cutlass_moe_fp4)", "CutlassExpertsFp4", True, None),
    ("allow_deep_gemm", "DeepGEMM (deep_gemm_moe_fp8) where vLLM's shape check passes, else Triton (fused_experts)",
     "TritonExperts", True, ("deep_gemm_moe_fp8", f"{_FM}.deep_gemm_moe:_valid_deep_gemm")),
    ("allow_cutlass_block_scaled_grouped_gemm",
     "CUTLASS block-scaled grouped GEMM where vLLM's shape check passes, else Triton (fused_experts)", "TritonExperts",
     True,
     ("run_cutlass_block_scaled_fused_experts", f"{_FM}.cutlass_moe:_valid_cutlass_block_scaled_grouped_gemm")),
)


def _legacy_selection(layer) -> dict:
    qm = layer.quant_method
    for flag, backend, experts, modular, check in _LEGACY_RULES:
        value = getattr(qm, flag, None)
        if flag == "use_cutlass" and not hasattr(qm, flag):  # 0.10.0: a CUTLASS-only method, no flag
            value = hasattr(qm, "is_fp8_w8a8_sm100")
        if value:
            out = {"backend": backend.format(getattr(value, "name", value)), "experts": experts,
                   "modular": modular, "check": check}
            if flag == "use_cutlass" and getattr(qm, "is_fp8_w8a8_sm100", False):
                out.update(backend=out["backend"] + " (Triton fused_experts for M <= 8 on sm100)", small_m=8)
            return out
    mod = sys.modules.get(type(qm).__module__)
    fi = getattr(mod, "should_use_flashinfer_mxfp4", None)  # the MXFP4 method decides in its module
    if fi is not None:
        name = "trtllm_fp4_block_scale_moe" if fi() else "triton_kernel_moe_forward"
        label = "FlashInfer TRT-LLM MXFP4" if fi() else "OAI triton_kernels MXFP4"
        return {"backend": f"{label} ({name})", "experts": name, "modular": False}
    return {"backend": "Triton (fused_experts)", "experts": "TritonExperts", "modular": True}


def moe_selection(layer) -> dict:
    """What vLLM's MoE quant method on ``layer`` selects (call under layers.rank0), computed once per layer.

    Keys: backend (vLLM's backend name), experts (the experts class vLLM builds, or the function it calls),
    kind (modular / monolithic / function), object (vLLM's experts object on the meta device, or None),
    note (one line: why there is no object), and for the function era small_m / check (per-M choices).
    """
    hit = _configured.get(id(layer))
    if hit is not None and hit[0] is layer:
        return hit[1]
    qm = layer.quant_method
    enum = _backend_enum(qm)
    cls = getattr(qm, "experts_cls", None)
    out = {"backend": enum.name if enum is not None else None, "experts": None, "kind": "modular",
           "object": None, "note": ""}
    if cls is not None:  # 0.15.1+: the class vLLM's make_<q>_moe_kernel instantiates
        out["experts"] = cls.__name__
        if _is_monolithic(cls):
            out.update(kind="monolithic", note=f"{cls.__name__} is a monolithic kernel: no workspace_shapes "
                                               "or launch geometry visible from Python")
        else:
            out.update(_built(lambda: call_named(cls, _pool(layer, _quant_config(layer))), layer, cls.__name__))
    elif enum is not None and (builder := _kernel_builder(qm)) is not None:  # 0.14.1: built after loading
        def build():
            kernel = call_named(builder, _pool(layer, _quant_config(layer)))
            return (kernel[0] if isinstance(kernel, tuple) else kernel).fused_experts
        out.update(_built(build, layer, builder.__name__))
        out["experts"] = type(out["object"]).__name__ if out["object"] is not None else "unknown"
    else:  # function era
        legacy = _legacy_selection(layer)
        out.update(backend=legacy["backend"], experts=legacy["experts"], small_m=legacy.get("small_m"),
                   check=legacy.get("check"))
        if not legacy["modular"]:
            out.update(kind="function", note=f"vLLM calls {legacy['experts']} as a function: no workspace_shapes "
                                             "visible from Python")
        else:
            out.update(_built(lambda: call_named(_experts_class(legacy["experts"]),
                                                 _pool(layer, _quant_config(layer))), layer, legacy["experts"]))
    if out["backend"] is None:
        out["backend"] = type(qm).__name__
    if len(_configured) >= _MAX_CONFIGURED:
        _configured.pop(next(iter(_configured)))
    _configured[id(layer)] = (layer, out)
    return out


_BUILD_ERRORS = (VllmApiMissing, AssertionError, AttributeError, KeyError, NotImplementedError, RuntimeError,
                 TypeError, ValueError)


def _built(build, layer, what: str) -> dict:
    """{"object": vLLM's object} or {"note": vLLM's one-line reason it cannot be built on the meta device}."""
    try:
        with _untouched(layer):
            return {"object": build()}
    except _BUILD_ERRORS as e:
        return {"note": f"vLLM's {what} cannot be built before weights are loaded (on the meta model): "
                        f"{_one_line(e)}"}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _experts_class(name: str):
    """An experts class exported by vLLM's fused_moe package or the module that defines it."""
    return first(f"fused-MoE experts class {name}", f"{_FM}:{name}", f"{_FM}.cutlass_moe:{name}",
                 f"{_FM}.fused_moe:{name}", f"{_FM}.experts.cutlass_moe:{name}",
                 f"{_FM}.experts.triton_moe:{name}")


def triton_experts(layer):
    """vLLM's TritonExperts with this layer's quantization (what forcing the Triton path runs), built once."""
    sel = moe_selection(layer)
    if "triton" not in sel:
        with _untouched(layer):
            sel["triton"] = call_named(_experts_class("TritonExperts"), _pool(layer, _quant_config(layer)))
    return sel["triton"]


def moe_experts(layer, num_tokens: int):
    """The modular experts object vLLM runs for ``num_tokens`` tokens on this layer, or None (see moe_selection)."""
    return moe_experts_at(layer, num_tokens)[1]


def moe_experts_at(layer, num_tokens: int) -> tuple[str, object]:
    """(name, experts object or None) that vLLM runs for a step of ``num_tokens`` tokens on this layer.

    Fallback experts pick per M with vLLM's own ``_select_experts_impl``; in the function era the sm100
    small-batch Triton fallback and vLLM's shape checks (DeepGEMM, CUTLASS block-scaled) decide.
    """
    import torch

    sel = moe_selection(layer)
    experts = sel["object"]
    h = torch.empty(num_tokens, layer.hidden_size, dtype=in_dtype(layer), device="meta")
    if experts is not None and hasattr(experts, "_select_experts_impl"):
        experts = experts._select_experts_impl(h, layer.w13_weight, layer.w2_weight)
        return type(experts).__name__, experts
    if sel.get("small_m") and num_tokens <= sel["small_m"]:
        experts = triton_experts(layer)
        return type(experts).__name__, experts
    if sel.get("check") and has(sel["check"][1]):
        pool = {"hidden_states": h, "w1": layer.w13_weight, "w2": layer.w2_weight, "inplace": True,
                "activation": activation(layer), "expert_map": None,
                "apply_router_weight_on_input": getattr(layer, "apply_router_weight_on_input", False)}
        if call_named(first("shape check", sel["check"][1]), pool):
            return sel["check"][0], None
    return (type(experts).__name__ if experts is not None else sel["experts"]), experts


# --- workspaces, chunking, Triton config -----------------------------------------------------------------

def moe_chunk_size() -> int | None:
    """Tokens per fused-MoE activation chunk (VLLM_FUSED_MOE_CHUNK_SIZE), None where the version has none."""
    if not has("vllm.envs:VLLM_FUSED_MOE_CHUNK_SIZE"):
        return None
    from vllm import envs

    if not getattr(envs, "VLLM_ENABLE_FUSED_MOE_ACTIVATION_CHUNKING", True):
        return None
    return envs.VLLM_FUSED_MOE_CHUNK_SIZE


def chunk_tokens(experts, num_tokens: int) -> int:
    """Tokens per chunk vLLM's modular kernel hands these experts for a step of ``num_tokens``."""
    for path in (f"{_MK}:FusedMoEKernelModularImpl._chunk_info", f"{_MK}:FusedMoEModularKernel._chunk_info"):
        if has(path):  # 0.11-0.17: vLLM's own rule
            return first("fused-MoE chunk rule", path)(types.SimpleNamespace(fused_experts=experts), num_tokens)[1]
    chunk = moe_chunk_size()  # 0.10: FusedMoEModularKernel.forward chunks when the experts support it
    if chunk and experts.supports_chunking():
        return min(num_tokens, chunk)
    return num_tokens


def has_workspaces(experts) -> bool:
    return callable(getattr(experts, "workspace_shapes", None))


def experts_workspaces(experts, layer, num_tokens: int) -> dict:
    """vLLM's own workspace_shapes for ``num_tokens`` (per activation chunk where the version chunks).

    Keys: M_chunk (tokens per chunk: M itself without chunking), chunked, workspace13, workspace2, output, dtype.
    """
    import torch

    N, K = layer.w13_weight.shape[1], layer.hidden_size
    m = chunk_tokens(experts, num_tokens)
    args = (N, K, layer.top_k, layer.global_num_experts, layer.local_num_experts, None)
    params = inspect.signature(experts.workspace_shapes).parameters
    act_dtype = in_dtype(layer)
    if "aq" in params:  # 0.10: (a, aq, M, ...) -> (ws13, ws2, out, dtype)
        a = torch.empty(num_tokens, K, dtype=act_dtype, device="meta")  # dtype carrier
        ws13, ws2, _, dtype = experts.workspace_shapes(a, a, m, *args)
        out = experts.workspace_shapes(a, a, num_tokens, *args)[2]
    else:
        tail = (activation(layer),) if "activation" in params else ()
        ws13, ws2, _ = experts.workspace_shapes(m, *args, *tail)[:3]
        out = experts.workspace_shapes(num_tokens, *args, *tail)[2]
        dtype = experts.workspace_dtype(act_dtype)
    return {"M_chunk": m, "chunked": m < num_tokens, "workspace13": tuple(ws13), "workspace2": tuple(ws2),
            "output": tuple(out), "dtype": dtype}


def triton_config_dtype(experts, act_dtype) -> str | None:
    """The dtype part of the fused-MoE config file name for these Triton experts."""
    qc = getattr(experts, "quant_config", None)
    if qc is not None and hasattr(qc, "config_name"):  # 0.11+
        return qc.config_name(act_dtype)
    get = first("fused-MoE config dtype", f"{_FM}.fused_moe:get_config_dtype_str")
    return call_named(get, {"dtype": act_dtype, **{k: getattr(experts, k, False) for k in
                                                   ("use_fp8_w8a8", "use_int8_w8a16", "use_int4_w4a16",
                                                    "use_mxfp4_w4a4")}})


def triton_runs_layer(layer) -> bool:
    """Whether vLLM's Triton fused-MoE kernel takes this layer's weights: selected, unquantized, or quantized in
    a form it has tuned configs for."""
    if layer.w13_weight.dtype == in_dtype(layer) or moe_selection(layer)["experts"] == "TritonExperts":
        return True
    try:
        return triton_config_dtype(triton_experts(layer), in_dtype(layer)) is not None
    except (VllmApiMissing, AssertionError, AttributeError, RuntimeError, TypeError, ValueError):
        return False


_lookup_gpu: list[str | None] = [None]  # the GPU whose names and config files vLLM's lookup caches hold


def triton_config_lookup(gpu_name: str):
    """vllm...fused_moe.fused_moe, its cached lookups (get_moe_configs, and from 0.2x the device file name)
    emptied when the what-if GPU changed since the last lookup: vLLM caches them once per process."""
    fm = fused_moe_module()
    if _lookup_gpu[0] != gpu_name:
        for name in ("get_moe_configs", "get_device_name_as_file_name"):
            clear = getattr(getattr(fm, name, None), "cache_clear", None)
            if clear is not None:
                clear()
        _lookup_gpu[0] = gpu_name
    return fm


def fused_moe_launcher():
    """vLLM's Python wrapper that computes the fused-MoE Triton grid and launches the kernel."""
    return first("fused-MoE kernel launch wrapper", f"{_FM}.fused_moe:dispatch_fused_moe_kernel",
                 f"{_FM}.fused_moe:invoke_fused_moe_kernel")


def fused_moe_module():
    """vllm...fused_moe.fused_moe (the package re-exports a function of the same name)."""
    return importlib.import_module(f"{_FM}.fused_moe")


def cutlass_index_buffers(rows: int) -> tuple[str, list[tuple[str, tuple, str, str]]]:
    """The CUTLASS FP8 path's expert-offset dtype and its permutation index buffers for ``rows`` = M x top-k:
    a_map / c_map and int32 offsets before vLLM permutes with moe_permute (int64 first-token offsets)."""
    mod = next((m for m in (f"{_FM}.experts.cutlass_moe", f"{_FM}.cutlass_moe") if has(m)), None)
    if mod is not None and has(f"{mod}:moe_permute"):
        return "int64", [("inv_perm", (rows,), "int32", "moe_permute inverse permutation")]
    return "int32", [("a_map", (rows,), "int32", ""), ("c_map", (rows,), "int32", "")]
