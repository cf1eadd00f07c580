"""One forward pass of vLLM's model outside the engine: the forward context, attention metadata and KV caches,
CustomOp enablement, the dummy (profile) run's batch, the sampler warm-up and the model runner's buffers.

KV caches, two eras: where the model runner lays them out from a KVCacheConfig by layout (one int8 allocation
viewed per layer as [blocks, heads, tokens, content]: ``allocate_kv_cache(..., layout, ...)``), vLLM's own
planning, allocation, kernel-block mapping and binding run (:func:`runner_kv_caches`); before, each layer's cache
is the backend's ``get_kv_cache_shape`` in its stride order (:func:`kv_cache_tensor`).

Every function decides by what the installed vLLM has (an import, an attribute, a signature), never by its
version string. Callers (diaglib.predict.census) run these under the census's own modes, which put every
tensor vLLM creates on the GPU onto the meta device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect

from .attention import backend_name
from .detect import VllmApiMissing, first, has, takes
from .releases import installed


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- the model, run eagerly --------------------------------------------------------------------------

@contextlib.contextmanager
def eager(model):
    """Inside: every ``@support_torch_compile`` module of ``model`` calls its forward directly (no Dynamo frame).

    The decorator's own switch (``do_not_compile``) is set on the modules that have it and restored after."""
    mods = [m for m in model.modules() if hasattr(m, "do_not_compile")]
    saved = [m.do_not_compile for m in mods]
    for m in mods:
        m.do_not_compile = True
    try:
        yield
    finally:
        for m, s in zip(mods, saved):
            m.do_not_compile = s


def forward_context(cfg, attn_metadata, num_tokens: int, cudagraph_mode=None, batch_descriptor=None,
                    slot_mapping=None):
    """vLLM's set_forward_context for one step, with the arguments this vLLM takes."""
    from vllm.forward_context import set_forward_context

    path = "vllm.forward_context:set_forward_context"
    kw = {"num_tokens": num_tokens}
    if cudagraph_mode is not None and takes(path, "cudagraph_runtime_mode"):
        kw["cudagraph_runtime_mode"] = cudagraph_mode
    if batch_descriptor is not None and takes(path, "batch_descriptor"):
        kw["batch_descriptor"] = batch_descriptor
    if slot_mapping is not None and takes(path, "slot_mapping"):
        kw["slot_mapping"] = slot_mapping
    return set_forward_context(attn_metadata, cfg, **kw)


# --- CustomOp enablement ------------------------------------------------------------------------------

def custom_ops(model) -> list[dict]:
    """Every CustomOp module of ``model``: its registered name, class, and whether vLLM dispatches it to the
    custom kernel (``forward_cuda``) or to ``forward_native`` (plain torch, traced and compiled by Inductor).

    Read off the method vLLM's CustomOp bound at construction under the scenario's compilation config."""
    from vllm.model_executor.custom_op import CustomOp

    seen, out = set(), []
    for name, m in model.named_modules():
        if not isinstance(m, CustomOp):
            continue
        fwd = getattr(m, "_forward_method", None)
        fn = getattr(fwd, "__func__", fwd)
        native_fn = getattr(type(m), "forward_native", None)
        native = fn is native_fn or getattr(fn, "__wrapped__", None) is native_fn or \
            getattr(fn, "__name__", "") == "forward_native"  # torch.compile-wrapped native forward
        key = (type(m).__name__, native)
        if key in seen:
            continue
        seen.add(key)
        out.append({"custom_op": getattr(type(m), "name", type(m).__name__), "class": type(m).__name__,
                    "first_module": name, "enabled": not native,
                    "runs": "forward_native (torch ops)" if native else getattr(fn, "__name__", "custom kernel")})
    return out


# --- attention: layers, KV caches, metadata ------------------------------------------------------------

def attention_layers(registry: dict) -> dict:
    """The registry's attention layers (vLLM's AttentionLayerBase where it exists), by layer name."""
    base = first("the attention layer base class",
                 "vllm.model_executor.layers.attention_layer_base:AttentionLayerBase",
                 "vllm.attention.layer:Attention")
    return {n: m for n, m in registry.items() if isinstance(m, base)}


def layer_kv_spec(layer, cfg):
    """The layer's own KVCacheSpec (None where it needs no KV cache). Where layers do not build it themselves
    (the 0.10 line), the model runner's get_kv_cache_spec is mirrored (derived: decoder layers only, full or
    sliding-window attention, from the layer's heads, head size and window)."""
    fn = getattr(layer, "get_kv_cache_spec", None)
    if fn is not None:
        return fn(cfg) if _takes_obj(fn, "vllm_config") else fn()
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from .scheduling import kv_cache_spec

    if str(getattr(layer, "attn_type", "decoder")).lower().split(".")[-1] != "decoder":
        return None
    base = kv_cache_spec(cfg)
    kw = {"block_size": base.block_size, "num_kv_heads": layer.num_kv_heads, "head_size": layer.head_size,
          "dtype": base.dtype}
    if "use_mla" in {f.name for f in dataclasses.fields(FullAttentionSpec)}:
        kw["use_mla"] = cfg.model_config.use_mla
    if getattr(layer, "sliding_window", None) is not None:
        return SlidingWindowSpec(sliding_window=layer.sliding_window, **kw)
    return FullAttentionSpec(**kw)


def layer_backend(layer):
    """The attention backend class the layer runs."""
    fn = getattr(layer, "get_attn_backend", None)
    if fn is not None:
        return fn()
    if isinstance(getattr(layer, "attn_backend", None), type):
        return layer.attn_backend
    raise VllmApiMissing(f"vLLM {installed()}'s {type(layer).__name__} layer keeps no backend class "
                         "(no get_attn_backend, no attn_backend): the census needs it")


def runner_lays_out_kv_caches() -> bool:
    """Whether this vLLM's model runner lays KV caches out from a KVCacheConfig by layout: one int8 allocation
    viewed per layer as [blocks, heads, tokens, content] (``vllm.v1.worker.utils.allocate_kv_cache`` with a
    ``layout`` argument); older runners reshape per backend (``get_kv_cache_shape``, :func:`kv_cache_tensor`)."""
    return has("vllm.v1.kv_cache_interface:create_kv_cache_views") \
        and takes("vllm.v1.worker.utils:allocate_kv_cache", "layout") \
        and has("vllm.v1.core.kv_cache_planning:get_global_kv_cache_groups")


@dataclasses.dataclass
class KVLayout:
    """The KV caches as vLLM's model runner lays them out: its KVCacheConfig, resolved layout, attention groups
    (vLLM's AttentionGroup, one per backend and spec in a KV-cache group), kernel block sizes per group, and the
    tensor bound to each layer (after the kernel-block mapping)."""

    config: object
    layout: object
    attn_groups: list
    kernel_block_sizes: list
    caches: dict  # layer name -> the tensor bound to it
    vllm_config: object  # the private config the layout was resolved in


def runner_kv_caches(cfg, specs: dict, backends: dict, num_blocks: int) -> KVLayout:
    """Lay out every layer's KV cache as this vLLM's GPUModelRunner.initialize_kv_cache does, with vLLM's own
    functions: KV-cache groups (get_global_kv_cache_groups) and the KVCacheConfig for ``num_blocks`` blocks from
    the platform's KVCacheConfig builder, the KV-cache layout the engine core resolves from the backends, the
    runner's attention groups, prepare_kernel_block_sizes, allocate_kv_cache (on the device: meta under the
    census) and map_kv_caches_to_kernel_blocks. ``specs``: layer name -> KVCacheSpec as the layer gives it
    (every layer of the whole model); ``backends``: layer name -> its backend class.
    Binding: :func:`bind_runner_kv_caches`."""
    import copy

    import torch
    from vllm.v1.attention.backends import utils as au
    from vllm.v1.core import kv_cache_planning as kp
    from vllm.v1.core.kv_cache_config_builder import get_kv_cache_config_builder
    from vllm.v1.kv_cache_interface import AttentionSpec, UniformTypeKVCacheSpecs
    from vllm.v1.worker import utils as wu

    cfg = copy.copy(cfg)
    cfg.cache_config = copy.copy(cfg.cache_config)  # the engine core records the resolved layout there
    specs = dict(specs)
    custom = getattr(wu, "customize_attention_spec", None)  # GPUModelRunner.get_kv_cache_spec
    for name, spec in specs.items():
        if custom is not None and isinstance(spec, AttentionSpec):
            specs[name] = custom(backends[name], spec)
    if cfg.cache_config.kv_cache_layout is None:  # EngineCore: resolved once from every worker's backends
        distinct = {f"{b.__module__}.{b.__qualname__}": b for n, b in backends.items() if n in specs}
        supported = [layout.name for layout in au.get_supported_kv_cache_layouts(list(distinct.values()))]
        au.record_kv_cache_layout(cfg.cache_config,
                                  au.resolve_kv_cache_layout(cfg, [supported], list(specs.values())).name)
    layout = cfg.cache_config.get_resolved_kv_cache_layout()
    groups = kp.get_global_kv_cache_groups(cfg, [specs])
    kv_cfg = get_kv_cache_config_builder(cfg).get_kv_cache_config_from_groups(cfg, groups, num_blocks)
    kv_cfg.kv_cache_layout = layout.name
    attn_groups = []
    for gid, group in enumerate(kv_cfg.kv_cache_groups):  # GPUModelRunner.initialize_attn_backend
        by_key: dict = {}
        for name in group.layer_names:
            spec = group.kv_cache_spec
            if isinstance(spec, UniformTypeKVCacheSpecs):
                spec = spec.kv_cache_specs[name]
            backend = backends[name]
            by_key.setdefault((backend.full_cls_name() if hasattr(backend, "full_cls_name")
                               else f"{backend.__module__}.{backend.__qualname__}", spec), (backend, spec, []))[2] \
                .append(name)
        attn_groups.append([wu.AttentionGroup(b, names, s, gid) for b, s, names in by_key.values()])
    kernel_block_sizes = wu.prepare_kernel_block_sizes(kv_cfg, attn_groups)
    for gid, ags in enumerate(attn_groups):  # AttentionGroup.create_metadata_builders: its kernel block size
        kbs = kernel_block_sizes[gid] if gid < len(kernel_block_sizes) else None
        for g in ags:
            if kbs is not None and isinstance(g.kv_cache_spec, AttentionSpec):
                kbs_g = wu.select_common_block_size(kbs, [g.backend], [g.kv_cache_spec])
                if kbs_g != g.kv_cache_spec.block_size:
                    g.kernel_block_size = kbs_g
    caches = wu.allocate_kv_cache(kv_cfg, torch.device("cuda"), layout, kernel_block_sizes)
    mapped = wu.map_kv_caches_to_kernel_blocks(caches, [g for ags in attn_groups for g in ags])
    return KVLayout(kv_cfg, layout, attn_groups, kernel_block_sizes, mapped, cfg)


def bind_runner_kv_caches(kv: KVLayout, registry: dict) -> None:
    """Bind the laid-out caches to the layers of ``registry`` (the built model's layers; the others of the whole
    model's layout are left out) with vLLM's bind_kv_cache_to_layers, each layer unpacking its own views."""
    from vllm.v1.worker import utils as wu

    present = {n: t for n, t in kv.caches.items() if n in registry}
    if hasattr(wu, "bind_kv_cache_to_layers"):
        wu.bind_kv_cache_to_layers(present, registry, 1, kv.config.kv_cache_groups)
    else:
        for n, t in present.items():
            registry[n].bind_kv_cache(t)


def kv_cache_tensor(backend, spec, num_blocks: int, cache_dtype: str):
    """A layer's KV cache as the model runner lays it out: the backend's shape in its stride order (meta)."""
    import torch

    if hasattr(spec, "shapes") and hasattr(spec, "dtypes"):
        return _state_tensors(spec, num_blocks)
    if not hasattr(backend, "get_kv_cache_shape"):
        from .detect import VllmApiMissing

        raise VllmApiMissing(f"{backend_name(backend)} has no get_kv_cache_shape (this vLLM allocates KV caches "
                             "as byte views per layout)")
    kw = {"cache_dtype_str": cache_dtype} if _takes_obj(backend.get_kv_cache_shape, "cache_dtype_str") else {}
    shape = backend.get_kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size, **kw)
    try:
        order = tuple(backend.get_kv_cache_stride_order())
        assert len(order) == len(shape)
    except (AttributeError, NotImplementedError, AssertionError):
        order = tuple(range(len(shape)))
    phys = torch.empty(tuple(shape[i] for i in order), dtype=spec.dtype, device="meta")
    return phys.permute(*[order.index(i) for i in range(len(order))])


def _state_tensors(spec, num_blocks: int) -> list:
    """A state-space (mamba / linear-attention) layer's cache as the model runner lays it out: one page of
    page_size_bytes per block, each state a strided view into it (derived: GPUModelRunner's
    _reshape_kv_cache_tensors, MambaSpec branch)."""
    import torch

    raw = torch.empty(num_blocks * spec.page_size_bytes, dtype=torch.int8, device="meta")
    out, offset = [], 0
    for shape, dtype in zip(spec.shapes, spec.dtypes):
        size = torch.empty((), dtype=dtype).element_size()
        target = (num_blocks, *shape)
        stride = torch.empty(target, device="meta").stride()
        out.append(torch.as_strided(raw.view(dtype), size=target, stride=(spec.page_size_bytes // size, *stride[1:]),
                                    storage_offset=offset // size))
        offset += stride[0] * size
    return out


def _takes_obj(fn, param: str) -> bool:
    try:
        return param in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def bind_kv_cache(layer, kv_cache):
    """Give an attention layer its KV cache as bind_kv_cache does (the layer's own bind_kv_cache where it has
    one; else a tensor, or one per virtual engine)."""
    if hasattr(layer, "bind_kv_cache"):
        if isinstance(kv_cache, list):  # state views: the layer unpacks its raw [blocks, 1, 1, page bytes] itself
            import torch

            page = sum(t[0].numel() * t.element_size() for t in kv_cache)
            kv_cache = torch.empty((kv_cache[0].shape[0], 1, 1, page), dtype=torch.int8, device="meta")
        layer.bind_kv_cache(kv_cache)
    elif isinstance(getattr(layer, "kv_cache", None), list):
        layer.kv_cache = [kv_cache] * max(len(layer.kv_cache), 1)
    else:
        layer.kv_cache = kv_cache


def common_metadata(**fields):
    """vLLM's CommonAttentionMetadata from the fields this vLLM declares (the others are dropped)."""
    cls = first("CommonAttentionMetadata", "vllm.v1.attention.backend:CommonAttentionMetadata",
                "vllm.v1.attention.backends.utils:CommonAttentionMetadata")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in names})


def build_metadata(builder, common):
    """One step's attention metadata from the backend's builder."""
    if takes(f"{type(builder).__module__}:{type(builder).__qualname__}.build", "common_prefix_len"):
        return builder.build(common_prefix_len=0, common_attn_metadata=common)
    return builder.build(0, common)


def block_table(cfg, block_size: int):
    """vLLM's BlockTable for one KV-cache group, as the model runner's InputBatch builds it (device tensors on
    meta, host copies real). Returns None where this vLLM has none importable without a GPU."""
    import torch

    cls = first("the model runner's BlockTable", "vllm.v1.worker.block_table:BlockTable")
    sch, mc = cfg.scheduler_config, cfg.model_config
    kw = {"block_size": block_size, "max_num_reqs": sch.max_num_seqs,
          "max_num_blocks_per_req": _cdiv(mc.max_model_len, block_size),
          "max_num_batched_tokens": sch.max_num_batched_tokens, "pin_memory": False,
          "device": torch.device("cuda"), "kernel_block_size": block_size, "cp_kv_cache_interleave_size": 1,
          "dcp_kv_cache_interleave_size": 1}
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kw.items() if k in params})


def device_view(buffer):
    """The device tensor of a model-runner buffer (CpuGpuBuffer's ``.gpu``, or the tensor itself)."""
    return getattr(buffer, "gpu", buffer)


# --- the dummy (profile) run and the sampler warm-up ---------------------------------------------------

def dummy_batch(cfg, num_tokens: int) -> list[int]:
    """Tokens per dummy request of the model runner's profile run: min(num_tokens, max_num_seqs) requests,
    tokens split evenly, the remainder to the last (GPUModelRunner._dummy_run, every release)."""
    num_reqs = min(num_tokens, cfg.scheduler_config.max_num_seqs)
    q = [num_tokens // num_reqs] * num_reqs
    q[-1] += num_tokens % num_reqs
    return q


def profile_runs_attention() -> bool:
    """Whether the profile run builds attention metadata (it does not: force_attention is off and the
    graph mode NONE, so every attention layer sees ``attn_metadata=None``)."""
    return False


@functools.cache
def _sampling_metadata_cls():
    return first("SamplingMetadata", "vllm.v1.sample.metadata:SamplingMetadata")


def dummy_sampling_metadata(num_reqs: int, vocab: int, device):
    """The SamplingMetadata of GPUModelRunner._dummy_sampler_run: temperature 0.5, top-p 0.9, top-k vocab - 1,
    penalties 0.1, neither all-greedy nor all-random (the fields this vLLM declares)."""
    import torch

    def full(v):
        return torch.full((num_reqs,), v, device=device)

    cls = _sampling_metadata_cls()
    vals = {"temperature": full(0.5), "all_greedy": False, "all_random": False, "top_p": full(0.9),
            "top_k": full(vocab - 1), "min_p": None, "generators": {}, "max_num_logprobs": None,
            "logprob_token_ids": None, "no_penalties": True, "prompt_token_ids": None,
            "frequency_penalties": full(0.1), "presence_penalties": full(0.1), "repetition_penalties": full(0.1),
            "output_token_ids": [[] for _ in range(num_reqs)], "spec_token_ids": [[] for _ in range(num_reqs)],
            "allowed_token_ids_mask": None, "bad_words_token_ids": {}, "min_tokens": {},
            "logit_bias": [None] * num_reqs}
    names = {f.name for f in dataclasses.fields(cls)}
    if "logitsprocs" in names:
        from vllm.v1.sample.logits_processor import LogitsProcessors

        vals["logitsprocs"] = LogitsProcessors()
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in vals and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        from .detect import VllmApiMissing

        raise VllmApiMissing(f"SamplingMetadata wants fields diaglib does not know: {', '.join(missing)}")
    return cls(**{k: v for k, v in vals.items() if k in names})


def sampler(cfg):
    """The sampler the model runner constructs, and a note where its top-k/top-p step would run FlashInfer's
    sampling kernels (JIT-built, called outside torch's dispatcher): the census then runs vLLM's PyTorch path
    (same logits in, same samples out). Returns (sampler, note or None)."""
    cls = first("the V1 Sampler", "vllm.v1.sample.sampler:Sampler")
    params = inspect.signature(cls.__init__).parameters
    kw = {}
    if "logprobs_mode" in params:
        kw["logprobs_mode"] = cfg.model_config.logprobs_mode
    s = cls(**kw)
    tks = getattr(s, "topk_topp_sampler", None)
    fwd = getattr(tks, "forward", None)
    if getattr(fwd, "__name__", "") == "forward_cuda" and hasattr(tks, "forward_native"):
        tks.forward = tks.forward_native
        return s, ("sampler: top-k/top-p runs FlashInfer's sampling kernels on the GPU (not traceable here); "
                   "the census records vLLM's PyTorch path (same logits in, same samples out)")
    return s, None


def compute_logits(model, hidden):
    """The model's logits for the sampled rows (0.10 took a sampling_metadata argument, unused)."""
    import inspect as _i

    params = _i.signature(model.compute_logits).parameters
    return model.compute_logits(hidden, None) if "sampling_metadata" in params else model.compute_logits(hidden)


@contextlib.contextmanager
def workspace():
    """Inside: a fresh vLLM WorkspaceManager on the GPU (what the worker initialises at start-up; it hands
    out the MoE and attention workspaces), where this vLLM has one; the previous one is restored after."""
    import torch

    if not has("vllm.v1.worker.workspace:init_workspace_manager"):
        yield
        return
    from vllm.v1.worker import workspace as ws

    saved = ws._manager
    ws._manager = None
    ws.init_workspace_manager(torch.device("cuda"))
    try:
        yield
    finally:
        ws._manager = saved


# --- the model runner's persistent buffers -------------------------------------------------------------

def input_batch(cfg, block_sizes: list[int]):
    """vLLM's InputBatch (the model runner's per-request state: token ids, block tables, slot mapping, sampling
    tensors) as the model runner constructs it; call it where tensors land on the meta device."""
    import torch

    cls = first("the model runner's InputBatch", "vllm.v1.worker.gpu_input_batch:InputBatch")
    sch, mc = cfg.scheduler_config, cfg.model_config
    kw = {"max_num_reqs": sch.max_num_seqs, "max_model_len": mc.max_model_len,
          "max_num_batched_tokens": sch.max_num_batched_tokens, "device": torch.device("cuda"),
          "pin_memory": False, "vocab_size": mc.get_vocab_size(), "block_sizes": block_sizes,
          "kernel_block_sizes": block_sizes, "is_spec_decode": cfg.speculative_config is not None,
          "max_num_blocks_per_req": [_cdiv(mc.max_model_len, b) for b in block_sizes]}
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kw.items() if k in params})


def runner_buffers(cfg) -> list[tuple[str, tuple, object, str]]:
    """(name, shape, torch dtype, device) of the model runner's own persistent buffers that GPUModelRunner's
    constructor sizes from max_num_batched_tokens and max_num_seqs (derived: GPUModelRunner.__init__, which
    needs a GPU to construct; input_ids / positions [max_num_tokens], query_start_loc [max_num_reqs + 1],
    seq_lens [max_num_reqs], req_indices and query positions [max_num_tokens])."""
    import torch

    t, r = cfg.scheduler_config.max_num_batched_tokens, cfg.scheduler_config.max_num_seqs
    return [("runner.input_ids", (t,), torch.int32, "gpu"), ("runner.positions", (t,), torch.int64, "gpu"),
            ("runner.query_start_loc", (r + 1,), torch.int32, "gpu"), ("runner.seq_lens", (r,), torch.int32, "gpu"),
            ("runner.req_indices", (t,), torch.int64, "cpu"), ("runner.query_pos", (t,), torch.int64, "cpu")]


def splitting_ops(vllm_config) -> set[str]:
    """The resolved splitting ops as dispatcher names (``vllm::unified_attention_with_output``; the 0.10 line
    spells them ``vllm.unified_attention_with_output``)."""
    ops = vllm_config.compilation_config.splitting_ops or []
    return {s if "::" in s else s.replace(".", "::", 1) for s in ops}


@contextlib.contextmanager
def deep_gemm_scale_layout(state_notes: list):
    """Where vLLM found DeepGEMM (its vendored copy) but DeepGEMM cannot load on this host, vLLM's weight
    post-processing still asks it for the scale-factor layout (``transform_sf_into_required_layout``): the scales
    pass through unchanged meanwhile (weight side only, no token dimension), and a note says so."""
    try:
        mod = importlib.import_module("vllm.utils.deep_gemm")
    except ImportError:
        mod = None
    name = "_transform_sf_into_required_layout_impl"
    loadable = getattr(mod, "_import_deep_gemm", None)
    if mod is None or not hasattr(mod, name) or getattr(mod, name) is not None or loadable is None \
            or loadable() is not None:
        yield
        return

    def passthrough(sf, *args, **kwargs):
        if not state_notes or "DeepGEMM" not in state_notes[-1]:
            state_notes.append("DeepGEMM cannot load here: its weight-scale layout transform passed the scales "
                               "through unchanged")
        return sf

    setattr(mod, name, passthrough)
    try:
        yield
    finally:
        setattr(mod, name, None)

