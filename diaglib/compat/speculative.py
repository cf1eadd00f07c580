"""Speculative decoding: the multi-token-prediction draft vLLM would make of a checkpoint's own layers, and the
draft model vLLM's proposer builds (under which config, sharing which of the target's modules)."""
from __future__ import annotations

import copy

from .detect import first, missing


def mtp_draft(hf_config) -> tuple[str, int] | None:
    """(draft architecture, predicted tokens) of the MTP draft vLLM's SpeculativeConfig.hf_config_override
    makes of this model's HF config (applied to a copy), or None where the checkpoint has no MTP layers."""
    override = first("vLLM's speculative config", "vllm.config:SpeculativeConfig").hf_config_override
    draft = override(copy.deepcopy(hf_config))
    n = getattr(draft, "n_predict", None) or 0
    return (draft.architectures[0], n) if draft.architectures != hf_config.architectures and n > 0 else None


def drafter_class(spec):
    """The proposer class vLLM's model runner makes for a speculative config with a draft model of its own
    (EAGLE and MTP heads: EagleProposer; a separate draft model: DraftModelProposer), or None where the method
    drafts without a model diaglib can build (n-gram, suffix, ...)."""
    if spec is None or getattr(spec, "draft_model_config", None) is None:
        return None
    if spec.method == "draft_model":
        return first("vLLM's draft-model proposer", "vllm.v1.spec_decode.draft_model:DraftModelProposer")
    if getattr(spec, "use_eagle", lambda: False)():
        return first("vLLM's EAGLE / MTP proposer", "vllm.v1.spec_decode.eagle:EagleProposer")
    return None


class _Proposer:
    """What vLLM's draft-config and sharing methods read of a proposer: its configs and model, and the settings
    its ``__init__`` copies from the speculative config (read from there)."""

    def __init__(self, vllm_config, draft):
        self.vllm_config, self.speculative_config, self.model = vllm_config, vllm_config.speculative_config, draft

    def __getattr__(self, name):
        return getattr(self.__dict__["speculative_config"], name)


def _as_proposer(call, cls, *args):
    """``call(*args)``; a proposer attribute diaglib cannot stand in for is a one-line VllmApiMissing."""
    try:
        return call(*args)
    except AttributeError as e:
        raise missing(f"{cls.__name__} setting diaglib can stand in for", f"{e.name or e} in SpeculativeConfig") from None


def draft_vllm_config(cls, vllm_config):
    """The VllmConfig the proposer builds its draft under (its kernel overrides: ``_create_draft_vllm_config``
    where this vLLM has it; the target's config before that)."""
    make = getattr(cls, "_create_draft_vllm_config", None)
    return _as_proposer(make, cls, _Proposer(vllm_config, None)) if make else vllm_config


def share_with_target(cls, vllm_config, draft, target) -> None:
    """Give ``draft`` the target model's modules the proposer shares with it (embedding, LM head), as vLLM's
    own proposer code does: its ``_maybe_share_embeddings`` / ``_maybe_share_lm_head`` where this vLLM has them,
    else its ``load_model`` (which loads the draft and shares in one), handed ``draft`` as the model it loads.
    Older ``load_model`` finds the target's layers through the config: call it inside ``layers.registered``."""
    import sys
    from unittest import mock

    lm = target.get_language_model() if hasattr(target, "get_language_model") else target
    me = _Proposer(vllm_config, draft)
    if hasattr(cls, "_maybe_share_embeddings") and hasattr(cls, "_maybe_share_lm_head"):
        _as_proposer(cls._maybe_share_embeddings, cls, me, lm)
        _as_proposer(cls._maybe_share_lm_head, cls, me, lm)
        return
    module = sys.modules[cls.__module__]
    if not hasattr(cls, "load_model") or not hasattr(module, "get_model"):
        raise missing("way to share a draft's embedding and LM head with the target",
                      f"{cls.__name__}._maybe_share_embeddings, {cls.__name__}.load_model")
    with mock.patch.object(module, "get_model", lambda **kw: draft):
        _as_proposer(cls.load_model, cls, me, target)


def draft_key(spec) -> list | None:
    """What decides the draft vLLM builds (for cache keys): its method and model config."""
    if spec is None or getattr(spec, "draft_model_config", None) is None:
        return None
    dm = spec.draft_model_config
    return [str(spec.method), str(dm.model), dm.hf_config.to_json_string(use_diff=False)]
