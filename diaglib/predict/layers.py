"""vLLM's own model and MoE layers for one tensor-parallel rank, built on the meta device.

The model class vLLM's loader picks is constructed by vLLM's ``initialize_model`` under
``set_current_vllm_config`` with ``torch.device("meta")``: every parameter has the shape, dtype and
quantization method that rank 0 of the scenario's TP group would hold, and no memory is allocated.
vLLM's parallel groups are stood in for by vLLM's own ``GroupCoordinator`` class, left uninitialised
(no process group, no communicator), reporting rank 0 of the scenario's TP / PP / DP sizes.
"""
from __future__ import annotations

import contextlib
import os
import types

from .. import compat, whatif
from ..scenario import Scenario

_models: dict[int, tuple[Scenario, object]] = {}
_MAX_MODELS = 8  # meta-device models kept (one per scenario object), oldest dropped first


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
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    if sc.simulated:
        whatif.activate(sc.gpu)  # the what-if GPU is process-wide: answer for this scenario's GPU
    saved = {n: getattr(ps, n) for n in _group_sizes(sc.vllm_config) if hasattr(ps, n)}
    for n, size in _group_sizes(sc.vllm_config).items():
        if n in saved:
            setattr(ps, n, _stand_in_group(n.strip("_").lower(), size))
    # Shared experts overlap on an auxiliary CUDA stream, which needs a driver; the overlap changes
    # no shape or dtype, so vLLM's own switch for it is set while the layers are built.
    env_before = os.environ.get("VLLM_DISABLE_SHARED_EXPERTS_STREAM")
    os.environ["VLLM_DISABLE_SHARED_EXPERTS_STREAM"] = "1"
    try:
        # vLLM's loader builds the model under the model dtype as torch's default dtype (unquantized
        # parameters and the attention backend choice depend on it), so do we.
        with set_current_vllm_config(sc.vllm_config), \
                compat.set_default_torch_dtype(sc.vllm_config.model_config.dtype), torch.device("meta"):
            yield
    finally:
        for n, g in saved.items():
            setattr(ps, n, g)
        if env_before is None:
            os.environ.pop("VLLM_DISABLE_SHARED_EXPERTS_STREAM", None)
        else:
            os.environ["VLLM_DISABLE_SHARED_EXPERTS_STREAM"] = env_before


def build_model(sc: Scenario):
    """The scenario's whole model as vLLM constructs it for TP rank 0, on the meta device (cached)."""
    hit = _models.get(id(sc))
    if hit is not None and hit[0] is sc:
        return hit[1]
    model = new_model(sc)[0]
    if len(_models) >= _MAX_MODELS:
        _models.pop(next(iter(_models)))
    _models[id(sc)] = (sc, model)
    return model


def new_model(sc: Scenario, vllm_config=None):
    """A fresh, uncached build of the scenario's model (or of ``vllm_config``, a private variant of the
    scenario's config), with the layer registries its layers registered in.

    Layers register themselves in the config's static forward context (a name may register once); the meta
    model gets registries of its own so the config stays as vLLM resolved it. Returns (model, {registry name:
    registry})."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model

    cfg = vllm_config or sc.vllm_config
    cc = cfg.compilation_config
    registries = [n for n in ("static_forward_context", "static_all_moe_layers") if hasattr(cc, n)]
    saved = {n: getattr(cc, n) for n in registries}
    for n in registries:
        setattr(cc, n, type(saved[n])())
    try:
        with rank0(sc), set_current_vllm_config(cfg):
            model = initialize_model(vllm_config=cfg)
        own = {n: getattr(cc, n) for n in registries}
    finally:
        for n in registries:
            setattr(cc, n, saved[n])
    return model, own


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
