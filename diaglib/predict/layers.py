"""vLLM's own model and MoE layers for one tensor-parallel rank, built on the meta device.

The model class vLLM's loader picks is constructed by vLLM's ``initialize_model`` under
``set_current_vllm_config`` on the meta device: every parameter has the shape, dtype and quantization
method that rank 0 of the scenario's TP group would hold, and no memory is allocated (small integer index
maps vLLM reads back while building keep values on the CPU: :func:`_meta_device`).
vLLM's parallel groups are stood in for by vLLM's own ``GroupCoordinator`` class, left uninitialised
(no process group, no communicator), reporting rank 0 of the scenario's TP / PP / DP sizes. Where vLLM
refuses to build a layer, the refusal is one line (:class:`BuildRefused`), naming the layer; a size that
does not divide by a quantization block says which TP (or EP) sizes vLLM builds instead.
"""
from __future__ import annotations

import contextlib
import re
import types

from .. import compat, whatif
from ..errors import DiagError
from ..scenario import Scenario

_models: dict[int, tuple[Scenario, object, dict]] = {}
_drafts: dict[int, tuple[Scenario, tuple]] = {}  # the speculative draft built beside each model
_MAX_MODELS = 8  # meta-device models kept (one per scenario object), oldest dropped first
_REFUSALS = (ValueError, NotImplementedError, AssertionError)  # how vLLM's layers refuse a shape
_depth = 0  # rank0 contexts entered


class BuildRefused(DiagError):
    """vLLM refused to construct the scenario's model (its own reason, the layer, what would work)."""


def _stand_in_group(name: str, size: int):
    """vLLM's GroupCoordinator for rank 0 of ``size`` ranks, with no process group behind it."""
    from vllm.distributed.parallel_state import GroupCoordinator

    g = object.__new__(GroupCoordinator)
    g.unique_name = g.group_name = name
    g.ranks = list(range(size))
    g.world_size, g.rank, g.rank_in_group, g.local_rank = size, 0, 0, 0
    g.cpu_group = g.device_group = types.SimpleNamespace(size=lambda: size, rank=lambda: 0)
    g.use_device_communicator, g.device_communicator, g.mq_broadcaster = False, None, None
    return g


def _group_sizes(vllm_config) -> dict[str, int]:
    """Group sizes as vLLM's initialize_model_parallel lays them out, for this scenario."""
    pc = vllm_config.parallel_config
    tp, pp, dp = pc.tensor_parallel_size, pc.pipeline_parallel_size, pc.data_parallel_size
    pcp = getattr(pc, "prefill_context_parallel_size", 1) or 1
    dcp = getattr(pc, "decode_context_parallel_size", 1) or 1
    return {"_WORLD": tp * pp * dp * pcp, "_TP": tp, "_PP": pp, "_DP": dp, "_EP": tp * dp * pcp,
            "_PCP": pcp, "_DCP": dcp, "_EPLB": tp * dp * pcp}


@contextlib.contextmanager
def rank0(sc: Scenario):
    """Inside: vLLM sees rank 0 of the scenario's parallel layout, its VllmConfig, its GPU and the meta device."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    if sc.simulated:
        whatif.activate(sc.gpu)  # the what-if GPU is process-wide: answer for this scenario's GPU
    saved = {n: getattr(ps, n) for n in _group_sizes(sc.vllm_config) if hasattr(ps, n)}
    for n, size in _group_sizes(sc.vllm_config).items():
        if n in saved:
            setattr(ps, n, _stand_in_group(n.strip("_").lower(), size))
    global _depth
    # torch keeps one device context at a time (older releases assert it): a nested rank0 keeps the outer one.
    device = _meta_device() if not _depth else contextlib.nullcontext()
    _depth += 1
    try:
        # vLLM's loader builds the model under the model dtype as torch's default dtype (unquantized
        # parameters and the attention backend choice depend on it), so do we.
        with set_current_vllm_config(sc.vllm_config), \
                compat.set_default_torch_dtype(sc.vllm_config.model_config.dtype), device:
            yield
    finally:
        _depth -= 1
        for n, g in saved.items():
            setattr(ps, n, g)


SMALL_INDEX = 4096  # integer tensors up to this many elements, created without a device, stay on the CPU
_building = False  # inside new_model: vLLM is constructing layers


def _meta_device():
    """``with torch.device("meta")``; while a model is being built (:func:`new_model`), small integer tensors
    created without a device hold values on the CPU: vLLM reads back index maps it computes while building
    layers (the expert-parallel expert map, logged and turned into routing tables), which a meta tensor
    cannot answer; where such a tensor meets a meta tensor in an operation it joins it on the meta device.
    Every float tensor, and every integer tensor of more than SMALL_INDEX elements, is a meta tensor."""
    import torch
    from torch.utils._device import DeviceContext, _device_constructors
    from torch.utils._pytree import tree_flatten, tree_map

    def small_index(t) -> bool:
        return (isinstance(t, torch.Tensor) and not t.dtype.is_floating_point and not t.dtype.is_complex
                and t.numel() <= SMALL_INDEX)

    def held(a) -> bool:
        return isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0

    class MetaDevice(DeviceContext):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in _device_constructors() and kwargs.get("device") is None:
                out = func(*args, **{**kwargs, "device": "meta"})
                return func(*args, **{**kwargs, "device": "cpu"}) if _building and small_index(out) else out
            if _building:
                tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
                if any(t.is_meta for t in tensors) and any(held(t) for t in tensors):
                    args, kwargs = tree_map(lambda a: a.to("meta") if held(a) else a, (args, kwargs))
            return func(*args, **kwargs)

    return MetaDevice("meta")


def build_model(sc: Scenario):
    """The scenario's whole model as vLLM constructs it for TP rank 0, on the meta device (cached).

    vLLM's refusal to build it (an architecture this release or GPU does not support, a per-rank size a
    quantization block does not divide) is a :class:`BuildRefused` in one line."""
    hit = _models.get(id(sc))
    if hit is not None and hit[0] is sc:
        return hit[1]
    model, registries = new_model(sc)
    if len(_models) >= _MAX_MODELS:
        _models.pop(next(iter(_models)))
    _models[id(sc)] = (sc, model, registries.get("static_forward_context", {}))
    return model


def new_model(sc: Scenario, vllm_config=None, *, model_config=None, into: dict | None = None):
    """A fresh, uncached build of the scenario's model (or of ``vllm_config``, a private variant of the
    scenario's config; of ``model_config`` under it, as vLLM builds a draft model), with the layer registries
    its layers registered in.

    Layers register themselves in the config's static forward context (a name may register once); the meta
    model gets registries of its own (copies of ``into``'s, where given) so the config stays as vLLM resolved
    it. Returns (model, {registry name: registry}); vLLM's refusal is a :class:`BuildRefused`."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model

    cfg = vllm_config or sc.vllm_config
    cc = cfg.compilation_config
    registries = [n for n in ("static_forward_context", "static_all_moe_layers") if hasattr(cc, n)]
    saved = {n: getattr(cc, n) for n in registries}
    for n in registries:
        setattr(cc, n, type(saved[n])((into or {}).get(n, ())))
    global _building
    outer, _building = _building, True
    try:
        with rank0(sc), set_current_vllm_config(cfg):
            model = initialize_model(vllm_config=cfg, **({"model_config": model_config} if model_config else {}))
        own = {n: getattr(cc, n) for n in registries}
    except _REFUSALS as e:
        raise BuildRefused(" ".join(_explain_refusal(sc, e).split())) from None  # one line
    finally:
        _building = outer
        for n in registries:
            setattr(cc, n, saved[n])
    return model, own


def build_draft(sc: Scenario):
    """The draft model vLLM's proposer builds for the scenario's speculative config (an MTP or EAGLE head, a
    draft model), on the meta device beside the target, with the target's modules vLLM shares into it (cached);
    None where the config drafts without a model. Returns (draft, forward context of target and draft layers):
    vLLM's KV-cache sizing and capture see both."""
    cls = compat.drafter_class(sc.vllm_config.speculative_config)
    if cls is None:
        return None
    hit = _drafts.get(id(sc))
    if hit is not None and hit[0] is sc:
        return hit[1]
    target = build_model(sc)
    spec = sc.vllm_config.speculative_config
    with rank0(sc):
        cfg = compat.draft_vllm_config(cls, sc.vllm_config)
    draft, registries = new_model(sc, cfg, model_config=spec.draft_model_config, into={
        "static_forward_context": forward_context(sc)})
    context = registries.get("static_forward_context", {})
    with registered(sc, context), rank0(sc):
        compat.share_with_target(cls, sc.vllm_config, draft, target)
    if len(_drafts) >= _MAX_MODELS:
        _drafts.pop(next(iter(_drafts)))
    _drafts[id(sc)] = (sc, (draft, context))
    return draft, context


def forward_context(sc: Scenario) -> dict:
    """The layers the meta model registered in vLLM's static forward context (name -> layer), as vLLM's
    model runner finds its attention, mamba and MoE layers."""
    build_model(sc)
    return _models[id(sc)][2]


@contextlib.contextmanager
def registered(sc: Scenario, registry: dict | None = None):
    """Inside: the scenario's config holds ``registry`` (default: the meta model's layers) as its static
    forward context, for vLLM code that finds layers through the config; the resolved config is restored.

    Layers register themselves in the config's static forward context (a name may register once), so
    each meta model gets a registry of its own and the scenario's config stays as vLLM resolved it."""
    cc = sc.vllm_config.compilation_config
    registry = forward_context(sc) if registry is None else registry
    names = [n for n in ("static_forward_context", "static_all_moe_layers") if hasattr(cc, n)]
    saved = {n: getattr(cc, n) for n in names}
    cc.static_forward_context = registry
    if "static_all_moe_layers" in names:
        cc.static_all_moe_layers = type(saved["static_all_moe_layers"])()
    try:
        yield registry
    finally:
        for n in names:
            setattr(cc, n, saved[n])


# --- vLLM's refusals, in one line ------------------------------------------------------------------

_NOT_DIVISIBLE = re.compile(r"=\s*(\d+)\s+is not divisible\s+by\s+[\w ]+?\s*=\s*(\d+)")  # vLLM's wording


def _frames(e: BaseException):
    """The local variables of every frame ``e`` passed through, outermost first."""
    tb = e.__traceback__
    while tb is not None:
        yield tb.tb_frame.f_locals
        tb = tb.tb_next


def _refusing_layer(e: BaseException) -> tuple[str | None, str | None]:
    """(module prefix, class) of the innermost layer under construction when vLLM raised ``e``."""
    found = (None, None)
    for f in _frames(e):
        prefix = f.get("prefix")
        if isinstance(prefix, str) and prefix:
            found = (prefix, type(f["self"]).__name__ if "self" in f else None)
    return found


def _input_rule(e: BaseException) -> tuple[int, int] | None:
    """(per-rank input size, the group it must be a multiple of) from the innermost ``create_weights`` frame that
    raised: AWQ's and GPTQ's "The input size is not aligned with the quantized weight shape" names no numbers."""
    frame = next((f for f in reversed(list(_frames(e))) if "input_size_per_partition" in f), None)
    qc = getattr(frame.get("self"), "quant_config", None) if frame else None
    group = frame.get("group_size", getattr(qc, "group_size", None)) if qc is not None else None
    if not isinstance(group, int) or group <= 0:
        return None
    return int(frame["input_size_per_partition"]), group


def _explain_refusal(sc: Scenario, e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    prefix, cls = _refusing_layer(e)
    where = f" while building {prefix}" + (f" ({cls})" if cls else "") if prefix else ""
    m = _NOT_DIVISIBLE.search(text)
    if not m and "aligned" not in text:
        return f"vLLM {sc.vllm_version} refuses to build the model{where}: {text}"
    rule = (int(m.group(1)), int(m.group(2))) if m else _input_rule(e) if text.startswith("The input") else None
    numbers = f" (per rank {rule[0]}, not a multiple of {rule[1]})" if rule and not m else ""
    pc = sc.vllm_config.parallel_config
    tp, ep = pc.tensor_parallel_size, bool(pc.enable_expert_parallel)
    return (f"vLLM {sc.vllm_version}{where} at TP {tp}" + (" with EP" if ep else "") + f": {text.rstrip('. ')}"
            + f"{numbers}; " + _what_builds(sc, rule, tp, ep, cls))


def _what_builds(sc: Scenario, rule: tuple[int, int] | None, tp: int, ep: bool, cls: str | None) -> str:
    """The TP sizes (and EP) at which vLLM builds the model instead, confirmed by asking vLLM to build it.

    Where the rule is known (a per-rank size that a block must divide), the TP sizes it accepts for the whole
    size (per-rank size x TP) are listed, and the largest one below the requested TP is built."""
    candidates = [t for t in (2 ** k for k in range(8)) if t <= sc.gpu.count and t != tp]
    if rule and ep and cls and "MoE" in cls:
        rule = None  # with EP the experts are not split over TP: vLLM's per-rank size is the whole size
    if rule:
        size, block = rule[0] * tp, rule[1]
        candidates = [t for t in candidates if size % t == 0 and (size // t) % block == 0]
    smaller = next((t for t in sorted(candidates, reverse=True) if t < tp and _builds(sc, "-tp", str(t))), None)
    parts = [f"vLLM builds it at TP {smaller}" if smaller else "no smaller TP size builds"]
    if rule:
        parts[0] += (f" (the rule holds at TP {', '.join(map(str, candidates)) or 'none'} of the powers of two up "
                     f"to {sc.gpu.count})")
    if not ep and cls and "MoE" in cls:
        parts.append("with --enable-expert-parallel (whole experts per rank) it "
                     + ("builds" if _builds(sc, "--enable-expert-parallel") else "does not build either"))
    return "; ".join(parts)


def _builds(sc: Scenario, *flags: str) -> bool:
    try:
        build_model(sc.derive(*flags))
        return True
    except DiagError:
        return False


def moe_layers(sc: Scenario) -> list[tuple[str, object]]:
    """(module name, vLLM MoE layer) for every MoE layer of this rank's model, in order (the layer class is the
    one the installed vLLM keeps its experts' weights in: compat.moe_layer_class)."""
    cls = compat.moe_layer_class()
    return [(n, m) for n, m in build_model(sc).named_modules() if isinstance(m, cls)]


def build_moe_layer(sc: Scenario):
    """vLLM's MoE layer of the model's first MoE layer (real quant method, rank-0 shapes), or None."""
    layers = moe_layers(sc)
    return layers[0][1] if layers else None


def moe_backend(sc: Scenario) -> dict | None:
    """The MoE quant method and the expert kernels vLLM selects for this scenario; None without MoE."""
    layers = moe_layers(sc)
    if not layers:
        return None
    name, layer = layers[0]
    qm = layer.quant_method
    with rank0(sc):
        sel = compat.moe_selection(layer)
        at = compat.moe_experts_at(layer, sc.vllm_config.scheduler_config.max_num_batched_tokens)[0]
    experts = sel["experts"] + (f" -> {at}" if at != sel["experts"] else "")
    return {
        "method": type(qm).__name__,
        "backend": sel["backend"] if "(" in sel["backend"] else f"{sel['backend']} ({experts})",
        "experts": experts,
        "kind": sel["kind"],
        "note": sel["note"],
        "first_layer": name,
        "num_moe_layers": len(layers),
        "global_num_experts": layer.global_num_experts,
        "local_num_experts": layer.local_num_experts,
        "top_k": layer.top_k,
        "hidden_size": layer.hidden_size,
        "intermediate_size_per_partition": layer.intermediate_size_per_partition,
        "w13_weight": [*layer.w13_weight.shape],
        "w2_weight": [*layer.w2_weight.shape],
        "weight_dtype": str(layer.w13_weight.dtype).removeprefix("torch."),
    }
