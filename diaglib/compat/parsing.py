"""Argument parsing: vLLM's own `vllm serve` parser and its front-end checks."""
from __future__ import annotations

import copy

from ..errors import DiagError
from .detect import _legacy


def flexible_argument_parser():
    """vLLM's own argument parser class (moved to vllm.utils.argparse_utils after 0.10)."""
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    return FlexibleArgumentParser


def check_prompt_len(vllm_config, prompt_len: int) -> None:
    """vLLM's own front-end check of a decoder prompt's length (DiagError with vLLM's message)."""
    from types import SimpleNamespace

    mc = copy.copy(vllm_config.model_config)
    mc.skip_tokenizer_init = True  # the check is on the length only
    try:
        if _legacy():
            from vllm.v1.engine.processor import Processor

            Processor._validate_model_input(SimpleNamespace(model_config=mc), {"prompt_token_ids": [0] * prompt_len},
                                            None, prompt_type="decoder")
        else:
            from vllm.v1.engine.input_processor import InputProcessor

            InputProcessor._validate_prompt_len(
                SimpleNamespace(model_config=mc, skip_prompt_length_check=False, supports_mm_inputs=False,
                                mm_encoder_cache_size=0), prompt_len, "decoder")
    except ValueError as e:
        raise DiagError(f"vLLM would reject this request: {str(e).split('. Make sure')[0]}") from None
