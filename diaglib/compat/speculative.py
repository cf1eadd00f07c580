"""Speculative decoding: the multi-token-prediction draft vLLM would make of a checkpoint's own layers."""
from __future__ import annotations

import copy

from .detect import first


def mtp_draft(hf_config) -> tuple[str, int] | None:
    """(draft architecture, predicted tokens) of the MTP draft vLLM's SpeculativeConfig.hf_config_override
    makes of this model's HF config (applied to a copy), or None where the checkpoint has no MTP layers."""
    override = first("vLLM's speculative config", "vllm.config:SpeculativeConfig").hf_config_override
    draft = override(copy.deepcopy(hf_config))
    n = getattr(draft, "n_predict", None) or 0
    return (draft.architectures[0], n) if draft.architectures != hf_config.architectures and n > 0 else None
