"""vLLM's own logging: its formatter, how it names the writing process, and the calls behind the lines that
diaglib triage reads (so tests and examples get those lines from vLLM itself)."""
from __future__ import annotations

import logging

from .detect import VllmApiMissing, first, has
from .releases import installed


def configure_logging() -> None:
    """Set up vLLM's logging as its processes do: from a LoggingConfig where vLLM configures it explicitly
    (``vllm.logger.configure_logging_if_needed``, 0.33), else it was done when vLLM was imported."""
    import vllm  # noqa: F401  (up to 0.32: configures vLLM's logging)

    if has("vllm.logger:configure_logging_if_needed") and has("vllm.config.logging:LoggingConfig"):
        config = first("LoggingConfig", "vllm.config.logging:LoggingConfig")()
        first("configure_logging_if_needed", "vllm.logger:configure_logging_if_needed")(config)


def log_formatter() -> logging.Formatter:
    """The formatter vLLM put on its ``vllm`` logger's handler (NewLineFormatter, or its colour variant)."""
    if not any(h.formatter for h in logging.getLogger("vllm").handlers):
        configure_logging()
    for h in logging.getLogger("vllm").handlers:
        if h.formatter is not None:
            return h.formatter
    raise VllmApiMissing(f"vLLM {installed()} configured no formatter on its `vllm` logger "
                         "(VLLM_CONFIGURE_LOGGING=0?)")


def prefix_writer():
    """vLLM's ``_add_prefix(file, process_name, pid)`` (decorate_logs' per-line prefix), or None where the
    process is part of the format instead (0.31+) or not printed at all (0.10.0)."""
    for path in ("vllm.utils.system_utils:_add_prefix", "vllm.utils:_add_prefix"):
        if has(path):
            return first("decorate_logs' prefix", path)
    return None


def log_non_default_args():
    """vLLM's ``log_non_default_args(args)``: the ``non-default args: {...}`` line of ``vllm serve``."""
    return first("log_non_default_args", "vllm.entrypoints.common.startup:log_non_default_args",
                 "vllm.entrypoints.serve.utils.api_utils:log_non_default_args",
                 "vllm.entrypoints.utils:log_non_default_args", "vllm.entrypoints.openai.cli_args:log_non_default_args")


def dump_engine_exception():
    """vLLM's ``dump_engine_exception(config, scheduler_output, scheduler_stats)``: the crash input dump."""
    return first("dump_engine_exception", "vllm.logging_utils.dump_input:dump_engine_exception")


def decorate_logs():
    """vLLM's ``decorate_logs(process_name)``: what each engine, worker and API process calls at start-up; None
    where vLLM names no process in its output (0.10.0)."""
    for path in ("vllm.utils.system_utils:decorate_logs", "vllm.utils:decorate_logs"):
        if has(path):
            return first("decorate_logs", path)
    return None
