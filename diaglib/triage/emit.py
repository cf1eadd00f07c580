"""vLLM's own log lines, made on the CPU: what its server prints for a scenario, for examples and tests.

Each line comes from vLLM's code or formatter, never a template of diaglib's: ``non-default args`` from
vLLM's ``log_non_default_args`` on the serve command as vLLM's parser reads it; the engine config line is
``VllmConfig.__str__`` of the resolved config, logged with vLLM's formatter at the place in vLLM's source
that logs it; the crash input dump is vLLM's ``dump_engine_exception`` on the ``SchedulerOutput`` of vLLM's
scheduler (the one diaglib.predict.schedule drives) for a given workload. Process prefixes are vLLM's too
(``decorate_logs``' per-line prefix up to 0.30, the formatter's own field from 0.31).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os

from .. import compat

_SALT = itertools.count()


def source_line(module: str, snippet: str) -> tuple[str, int]:
    """(file, line) of the first line of ``module``'s source containing ``snippet`` (where vLLM logs it)."""
    path = _source_file(module)
    with open(path) as f:
        lines = f.readlines()
    for i, text in enumerate(lines, 1):
        if snippet in text:
            return path, i
    return path, 1


def _source_file(module: str) -> str:
    """The source file of ``module``, found without importing it (some of vLLM's modules need a GPU to import)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(module)
    return spec.origin


class Log:
    """Lines as vLLM's logger and decorated streams print them, collected in order."""

    def __init__(self):
        self.parts: list[str] = []
        self.formatter = compat.log_formatter()

    def _prefixed(self, text: str, process: str | None, pid: int | None) -> str:
        writer = compat.prefix_writer()
        if process is None or writer is None:  # the format names the process (0.31+), or nothing does (0.10.0)
            return text
        buf = io.StringIO()
        writer(buf, process, pid or os.getpid())
        buf.write(text)
        return buf.getvalue()

    def record(self, logger: str, level: int, msg: str, *args, where: tuple[str, int] | None = None,
               exc_text: str | None = None, process: str | None = None, pid: int | None = None) -> None:
        """One record through vLLM's formatter, as if logged at ``where`` (file, line) by ``process``."""
        lg = logging.getLogger(logger)
        path, lineno = where or ("unknown.py", 0)
        rec = lg.makeRecord(lg.name, level, path, lineno, msg, args, None)
        if exc_text:
            rec.exc_text = exc_text
        if process is not None:
            rec.vllm_process_name, rec.processName, rec.process = process, process, pid or os.getpid()
        self.parts.append(self._prefixed(self.formatter.format(rec) + "\n", process, pid))

    def raw(self, text: str, process: str | None = None, pid: int | None = None) -> None:
        """Text a process printed (stdout / stderr), with its prefix where vLLM decorates the streams."""
        self.parts.append(self._prefixed(text if text.endswith("\n") else text + "\n", process, pid))

    def captured(self, fn, *args, process: str | None = None, pid: int | None = None, replace=(),
                 level: int = logging.INFO):
        """Run one of vLLM's logging functions and keep what it logged at ``level`` and above."""
        lg = logging.getLogger("vllm")
        buf = io.StringIO()
        h = logging.StreamHandler(buf)
        h.setFormatter(self.formatter)
        saved = lg.handlers[:], lg.level
        lg.handlers, lg.level = [h], level
        try:
            with _process(process, pid):
                result = fn(*args)
        finally:
            lg.handlers, lg.level = saved
        text = buf.getvalue()
        for old, new in replace:
            text = text.replace(old, new)
        self.parts.append(self._prefixed(text, process, pid))
        return result

    def text(self) -> str:
        return "".join(self.parts)


@contextlib.contextmanager
def _process(process: str | None, pid: int | None):
    """Records made meanwhile carry ``process`` / ``pid`` (for formats that print them, 0.31+)."""
    if process is None:
        yield
        return
    old = logging.getLogRecordFactory()

    def factory(*a, **k):
        rec = old(*a, **k)
        rec.vllm_process_name, rec.processName, rec.process = process, process, pid or os.getpid()
        return rec

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(old)


def _model_tag(sc) -> str:
    """The model as the command names it (diaglib resolves it to a local folder)."""
    served = getattr(sc.args, "served_model_name", None)
    return getattr(sc.args, "model_tag", None) or (served[0] if served else str(sc.model_dir))


def non_default_args(log: Log, sc, process: str = "APIServer", pid: int = 1) -> None:
    """vLLM's ``non-default args: {...}`` line for the scenario's serve command (as the server parses it)."""
    from ..scenario import parse_serve_args

    log.captured(compat.log_non_default_args(), parse_serve_args(sc.argv), process=process, pid=pid)


def engine_line(log: Log, sc, process: str = "EngineCore_0", pid: int = 2) -> None:
    """``Initializing a V1 LLM engine (vX) with config: ...`` as the engine core logs it."""
    import vllm

    where = source_line("vllm.v1.engine.core", "Initializing a V1 LLM engine")
    text = str(sc.vllm_config).replace(str(sc.model_dir), _model_tag(sc))
    log.record("vllm.v1.engine.core", logging.INFO, "Initializing a V1 LLM engine (v%s) with config: %s",
               vllm.__version__, text, where=where, process=process, pid=pid)


def crash_dump(log: Log, sc, prompt_lens: list[int], steps: int = 1, process: str = "EngineCore_0",
               pid: int = 2, kv_memory_bytes: int | None = 64 << 30):
    """vLLM's crash input dump of step ``steps`` (1-based) of prompts arriving together, through vLLM's
    scheduler (diaglib.predict.schedule.Engine) and vLLM's ``dump_engine_exception``. Returns the
    SchedulerOutput that was dumped."""
    from ..predict.schedule import Engine

    eng = Engine(sc, kv_memory_bytes)
    s = eng.scheduler
    for i, n in enumerate(prompt_lens):
        s.add_request(compat.new_request(f"cmpl-{i}", [1] * n, 4, eng.hasher, f"diaglib-emit-{next(_SALT)}"))
    out = None
    for _ in range(steps):
        if out is not None:
            ids = list(out.num_scheduled_tokens)
            sampled = [[1] if s.requests[r].num_computed_tokens >= s.requests[r].num_tokens else [] for r in ids]
            s.update_from_output(out, compat.runner_output(ids, sampled))
        out = s.schedule()
    log.captured(compat.dump_engine_exception(), eng.cfg, out, s.make_stats(), process=process, pid=pid,
                 replace=[(str(sc.model_dir), _model_tag(sc))])
    return out


# --- a planted fault: a real traceback, logged by vLLM's logger in a worker process --------------------

PLANTED_ERROR = ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously "
                 "reported at some other API call, so the stacktrace below might be incorrect.\nFor debugging "
                 "consider passing CUDA_LAUNCH_BLOCKING=1")


class _PlantedKernel:
    """Stands for a Triton JIT kernel: ``kernel[grid](...)`` raises the CUDA error a faulting launch reports."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError(PLANTED_ERROR)
        return launch


fused_moe_kernel = _PlantedKernel()


def _invoke_fused_moe_kernel(a, b, grid):
    fused_moe_kernel[grid](a, b, BLOCK_SIZE_M=64)


def _fused_experts(tokens: int):
    _invoke_fused_moe_kernel(tokens, 8, (tokens // 64, 1, 1))


def planted_worker(process: str = "VllmWorker TP0", tokens: int = 8192) -> None:
    """What a worker prints when a kernel launch fails: vLLM's decorate_logs, then vLLM's logger.exception
    with the real traceback of the planted fault (run in a child: ``python -m diaglib.triage.emit``)."""
    compat.configure_logging()
    decorate = compat.decorate_logs()
    if decorate is not None:
        decorate(process)
    logger = logging.getLogger("vllm.v1.executor.multiproc_executor")
    try:
        _fused_experts(tokens)
    except RuntimeError:
        logger.exception("WorkerProc hit an exception.")


def example(sc, prompt_len: int | None = None) -> str:
    """A crash log as vLLM prints it for scenario ``sc`` (for the notebook when no log is given):
    ``non-default args``, the engine line, a worker reporting the planted fault's real traceback, and the input
    dump of the step of one prompt of ``prompt_len`` tokens (default: max_num_batched_tokens)."""
    import traceback

    n = prompt_len or sc.vllm_config.scheduler_config.max_num_batched_tokens
    log = Log()
    non_default_args(log, sc)
    engine_line(log, sc)
    try:
        _fused_experts(n)
    except RuntimeError:
        tb = traceback.format_exc().rstrip("\n")
    log.record("vllm.v1.executor.multiproc_executor", logging.ERROR, "WorkerProc hit an exception.",
               where=source_line("vllm.v1.executor.multiproc_executor", "WorkerProc hit an exception"),
               exc_text=tb, process="VllmWorker TP0", pid=3)
    crash_dump(log, sc, [n])
    return log.text()


if __name__ == "__main__":
    import sys

    planted_worker(*(sys.argv[1:2] or ["VllmWorker TP0"]), *(int(a) for a in sys.argv[2:3]))
