"""Argument parsing: vLLM's own `vllm serve` parser and its front-end prompt check.

Eras (what the installed vLLM has decides, never its version string):
- parser: ``vllm.utils.argparse_utils.FlexibleArgumentParser`` (0.11.2+), ``vllm.utils`` before.
- prompt-length check: ``InputProcessor._validate_prompt_len`` (0.17.1+), else ``_validate_model_input`` of
  ``InputProcessor`` (0.12.0-0.16.0) or ``Processor`` (0.10.0-0.11.2; 0.10.x with a ``lora_request`` argument).
  From 0.11.2 a prompt of exactly max_model_len is refused too (no room for one output token).
  From 0.27.1 vLLM raises VLLMValidationError, which is no ValueError.
"""
from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

from ..errors import DiagError
from .detect import call, first, has


def flexible_argument_parser():
    """vLLM's own argument parser class."""
    return first("FlexibleArgumentParser", "vllm.utils.argparse_utils:FlexibleArgumentParser",
                 "vllm.utils:FlexibleArgumentParser")


def serve_parser():
    """vLLM's `vllm` parser with its `serve` subcommand, as vLLM's CLI builds it: (parser, serve parser)."""
    serve_cmd = first("the `vllm serve` subcommand", "vllm.entrypoints.cli.serve:ServeSubcommand")
    parser = flexible_argument_parser()(prog="vllm")
    serve = serve_cmd().subparser_init(parser.add_subparsers(dest="subparser"))
    return parser, serve


@functools.cache
def serve_options() -> frozenset[str]:
    """Every option string `vllm serve` accepts here (e.g. "--cudagraph-capture-sizes", "-cc")."""
    return frozenset(o for a in serve_parser()[1]._actions for o in a.option_strings)


def option_alias(long: str) -> str:
    """The shortest spelling `vllm serve` has for the option ``long`` (e.g. "-cc" for --compilation-config)."""
    action = next((a for a in serve_parser()[1]._actions if long in a.option_strings), None)
    return min(action.option_strings, key=len) if action else long


@functools.cache
def _refusals() -> tuple[type, ...]:
    """What vLLM's front end raises for a request it refuses: ValueError, and VLLMValidationError where
    vLLM has one (no longer a ValueError from 0.27.1)."""
    if has("vllm.exceptions:VLLMValidationError"):
        from vllm.exceptions import VLLMValidationError

        return ValueError, VLLMValidationError
    return (ValueError,)


def check_prompt_len(vllm_config, prompt_len: int) -> None:
    """vLLM's own front-end check of a decoder prompt's length (DiagError with vLLM's message)."""
    mc = copy.copy(vllm_config.model_config)
    mc.skip_tokenizer_init = True  # the check is on the length only
    ids = [0] * prompt_len
    try:
        if has("vllm.v1.engine.input_processor:InputProcessor._validate_prompt_len"):
            from vllm.v1.engine.input_processor import InputProcessor

            me = SimpleNamespace(model_config=mc, skip_prompt_length_check=False, supports_mm_inputs=False,
                                 mm_encoder_cache_size=0)
            InputProcessor._validate_prompt_len(me, prompt_len, "decoder")
        else:
            cls = first("the front end's prompt check", "vllm.v1.engine.input_processor:InputProcessor",
                        "vllm.v1.engine.processor:Processor")
            me = SimpleNamespace(model_config=mc, tokenizer=None, input_preprocessor=None)
            call("prompt check", cls._validate_model_input, me, {"type": "token", "prompt_token_ids": ids},
                 lora_request=None, prompt_type="decoder")
    except _refusals() as e:
        raise DiagError(f"vLLM would reject this request: {str(e).split('. Make sure')[0]}") from None
