"""Write tests/logs/seed-glm46-fp8-0.10.1.1.log: the seed case as vLLM 0.10.1.1's server prints it.

    cd REPO && .venvs/vllm-0.10.1.1/bin/python tests/logs/make_seed_log.py

The seed write-up's facts (GLM-4.6-FP8, TP 8 on 8x H20 96 GB, --enable-chunked-prefill
--max-num-batched-tokens 8192, one 8192-token prompt, `RuntimeError: CUDA driver error: an illegal memory access
was encountered` in an Inductor Triton kernel launched from torch/_inductor/runtime/triton_heuristics.py via
torch/_inductor/output_code.py) in vLLM's own formats. From vLLM itself (diaglib.triage.emit): the lines vLLM logs
while it resolves the command, `non-default args`, the engine config line, the crash input dump of its
scheduler's step, the process prefixes (decorate_logs, ANSI colours and the formatter's CRLF included). Written
after vLLM 0.10.1.1 and torch 2.7.1's call chains, with file names and line numbers read from those sources here:
the worker traceback (two TP ranks, interleaved), the engine core's and the API server's. The environment
excerpt at the top is how bug reports carry the GPU (vLLM's server does not print it).
"""
from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diaglib.scenario import from_command, load
from diaglib.triage import emit

OUT = Path(__file__).with_name("seed-glm46-fp8-0.10.1.1.log")
API, CORE = ("APIServer", 2817), ("EngineCore_0", 2990)
WORKERS = {0: 3101, 3: 3104}
KERNEL = "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_2"
ERROR = "RuntimeError: CUDA driver error: an illegal memory access was encountered"


def where(module: str, func: str, snippet: str, last: bool = False) -> tuple[str, int]:
    """(file, line) of ``snippet`` inside ``func`` of ``module`` (this environment's source)."""
    path = emit._source_file(module)
    lines = Path(path).read_text().splitlines()
    start = next(i for i, t in enumerate(lines) if f"def {func}(" in t)
    hits = [i for i in range(start, len(lines)) if snippet in lines[i]]
    if not hits:
        raise SystemExit(f"{module}.{func}: {snippet!r} not found")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("def ")
                and len(lines[i]) - len(lines[i].lstrip()) <= len(lines[start]) - len(lines[start].lstrip())),
               len(lines))
    inside = [i for i in hits if i < end] or hits[:1]
    i = inside[-1] if last else inside[0]
    return path, i + 1


def frame(module, func, snippet, *, last=False, code=None, carets=False) -> str:
    path, line = where(module, func, snippet, last)
    code = code or Path(path).read_text().splitlines()[line - 1].strip()
    text = f'  File "{path}", line {line}, in {func}\n    {code}\n'
    if carets:  # under the call, as Python 3.11+ marks it
        start = code.index("= ") + 2 if "= " in code.split("(")[0] else 0
        text += "    " + " " * start + "^" * (len(code) - start) + "\n"
    return text


def worker_traceback(rank: int) -> str:
    cache = f"/root/.cache/vllm/torch_compile_cache/1f5c0a3e7b/rank_{rank}_0/inductor_cache/2x/" \
            "c2xqvtm4ncl5nyc5kxhtj3swspqmdf4ohuxoc2mg3ic5tc6cbmyt.py"
    return "".join([
        "Traceback (most recent call last):\n",
        frame("vllm.v1.executor.multiproc_executor", "worker_busy_loop", "output = func(*args, **kwargs)", carets=True),
        frame("torch.utils._contextlib", "decorate_context", "return func(*args, **kwargs)", carets=True),
        frame("vllm.v1.worker.gpu_worker", "execute_model", "output = self.model_runner.execute_model(", carets=True),
        frame("torch.utils._contextlib", "decorate_context", "return func(*args, **kwargs)", carets=True),
        frame("vllm.v1.worker.gpu_model_runner", "execute_model", "model_output = self.model(", carets=True),
        frame("torch.nn.modules.module", "_wrapped_call_impl", "return self._call_impl(*args, **kwargs)", carets=True),
        frame("torch.nn.modules.module", "_call_impl", "return forward_call(*args, **kwargs)", carets=True),
        frame("vllm.model_executor.models.glm4_moe", "forward", "hidden_states = self.model(input_ids", carets=True),
        frame("vllm.compilation.decorators", "__call__", "output = self.compiled_callable(*args, **kwargs)", carets=True),
        frame("torch._dynamo.eval_frame", "_fn", "return fn(*args, **kwargs)", carets=True),
        frame("torch.fx.graph_module", "call_wrapped", "return self._wrapped_call(self, *args, **kwargs)", carets=True),
        frame("torch.fx.graph_module", "__call__", "raise e"),
        frame("torch.fx.graph_module", "__call__", "return super(self.cls, obj).__call__(*args, **kwargs)"),
        frame("torch.nn.modules.module", "_wrapped_call_impl", "return self._call_impl(*args, **kwargs)", carets=True),
        frame("torch.nn.modules.module", "_call_impl", "return forward_call(*args, **kwargs)", carets=True),
        '  File "<eval_with_key>.194", line 1181, in forward\n'
        "    submod_4 = self.submod_4(getitem_7, s0, getitem_8, "
        "l_self_modules_layers_modules_3_modules_post_attention_layernorm_parameters_weight_, getitem_9);  "
        "getitem_7 = getitem_8 = getitem_9 = None\n",
        frame("vllm.compilation.cuda_graph", "__call__", "return self.runnable(*args, **kwargs)", carets=True),
        frame("vllm.compilation.cuda_piecewise_backend", "__call__",
              "return self.compiled_graph_for_general_shape(*args)", carets=True),
        frame("vllm.compilation.compiler_interface", "compiled_graph",
              "graph_output = inductor_compiled_graph(list_args)", carets=True),
        frame("torch._inductor.output_code", "__call__", "return self.current_callable(inputs)", carets=True),
        frame("torch._inductor.utils", "run", "return model(new_inputs)", carets=True),
        f'  File "{cache}", line 1318, in call\n'
        f"    {KERNEL}.run(buf11, arg12_1, buf9, buf13, s0, 5120, stream=stream{rank})\n",
        frame("torch._inductor.runtime.triton_heuristics", "run", "return launcher(", last=True),
        '  File "<string>", line 5, in launcher\n',
        ERROR,
    ])


def main() -> None:
    sc = load("seed-vllm-0.10.1.1")
    tag = "zai-org/GLM-4.6-FP8"
    log = emit.Log()
    log.raw("Your current environment (python collect_env.py, excerpt):\n"
            "PyTorch version: 2.7.1+cu126\nvLLM Version: 0.10.1.1\nGPU models and configuration:\n"
            + "".join(f"GPU {i}: NVIDIA H20\n" for i in range(8))
            + "Nvidia driver version: 550.127.05\n\n$ vllm serve zai-org/GLM-4.6-FP8 --enable-chunked-prefill "
              "--max-num-batched-tokens 8192 -tp 8\n")
    log.record("vllm.entrypoints.openai.api_server", logging.INFO, "vLLM API server version %s", "0.10.1.1",
               where=emit.source_line("vllm.entrypoints.openai.api_server", "vLLM API server version"),
               process=API[0], pid=API[1])
    emit.non_default_args(log, sc, *API)
    log.captured(lambda: from_command(sc.command, gpu=sc.gpu, models=sc.models), process=API[0], pid=API[1],
                 replace=[(str(sc.model_dir), tag)])  # what vLLM logs while it resolves the command
    emit.engine_line(log, sc, *CORE)
    for rank, pid in WORKERS.items():
        proc = f"VllmWorker TP{rank}"
        log.record("vllm.v1.worker.gpu_model_runner", logging.INFO, "Model loading took %.4f GiB and %.6f seconds",
                   41.2187, 96.137, where=emit.source_line("vllm.v1.worker.gpu_model_runner", "Model loading took"),
                   process=proc, pid=pid)
        log.record("vllm.v1.worker.gpu_worker", logging.INFO, "Available KV cache memory: %.2f GiB", 34.51,
                   where=emit.source_line("vllm.v1.worker.gpu_worker", "Available KV cache memory"),
                   process=proc, pid=pid)
    log.record("vllm.v1.core.kv_cache_utils", logging.INFO, "GPU KV cache size: %s tokens", "1,507,648",
               where=emit.source_line("vllm.v1.core.kv_cache_utils", "GPU KV cache size"), process=CORE[0], pid=CORE[1])
    for rank, pid in WORKERS.items():
        log.record("vllm.v1.worker.gpu_model_runner", logging.INFO, "Graph capturing finished in %.0f secs, took %.2f GiB",
                   23.0, 0.84, where=emit.source_line("vllm.v1.worker.gpu_model_runner", "Graph capturing finished"),
                   process=f"VllmWorker TP{rank}", pid=pid)
    log.record("vllm.entrypoints.logger", logging.INFO, "Received request %s: prompt: %r, params: %s, "
               "prompt_token_ids: %s, prompt_embeds shape: %s, lora_request: %s.", "cmpl-5f0c2a", "",
               "SamplingParams(n=1, temperature=0.6, top_p=0.95, max_tokens=1024)", "None", None, None,
               where=emit.source_line("vllm.entrypoints.logger", "Received request"), process=API[0], pid=API[1])
    # Two TP ranks report the fault; their lines interleave.
    where_exc = emit.source_line("vllm.v1.executor.multiproc_executor", 'logger.exception("WorkerProc hit an exception.")')
    parts = []
    for rank, pid in WORKERS.items():
        sub = emit.Log()
        sub.record("vllm.v1.executor.multiproc_executor", logging.ERROR, "WorkerProc hit an exception.",
                   where=where_exc, exc_text=worker_traceback(rank), process=f"VllmWorker TP{rank}", pid=pid)
        parts.append(sub.text().splitlines(keepends=True))
    a, b = parts  # TP3 starts 7 lines after TP0, then their lines alternate
    merged = sorted([(i, x) for i, x in enumerate(a)] + [(i + 7.5, x) for i, x in enumerate(b)])
    log.parts.append("".join(x for _, x in merged))
    emit.crash_dump(log, sc, [8192], 1, *CORE)
    core = "".join([
        "Traceback (most recent call last):\n",
        frame("vllm.v1.engine.core", "run_engine_core", "engine_core.run_busy_loop()", carets=True),
        frame("vllm.v1.engine.core", "run_busy_loop", "self._process_engine_step()", carets=True),
        frame("vllm.v1.engine.core", "_process_engine_step", "outputs, model_executed = self.step_fn()", carets=True),
        frame("vllm.v1.engine.core", "step", "model_output = self.execute_model_with_error_logging(", carets=True),
        frame("vllm.v1.engine.core", "execute_model_with_error_logging", "raise err"),
        frame("vllm.v1.engine.core", "execute_model_with_error_logging", "return model_fn(scheduler_output)", carets=True),
        frame("vllm.v1.executor.multiproc_executor", "execute_model", "(output, ) = self.collective_rpc(", carets=True),
        frame("vllm.v1.executor.multiproc_executor", "collective_rpc", "result = get_response(w, dequeue_timeout)",
              carets=True),
        frame("vllm.v1.executor.multiproc_executor", "get_response", "raise RuntimeError("),
        "RuntimeError: Worker failed with error 'CUDA driver error: an illegal memory access was encountered', "
        "please check the stack trace above for the root cause",
    ])
    log.record("vllm.v1.engine.core", logging.ERROR, "EngineCore encountered a fatal error.",
               where=emit.source_line("vllm.v1.engine.core", 'logger.exception("EngineCore encountered a fatal error.")'),
               exc_text=core, process=CORE[0], pid=CORE[1])
    api = "".join([
        "Traceback (most recent call last):\n",
        frame("vllm.v1.engine.async_llm", "output_handler", "outputs = await engine_core.get_output_async()",
              carets=True),
        frame("vllm.v1.engine.core_client", "get_output_async", "raise self._format_exception(outputs) from None",
              last=True),
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for "
        "the root cause.",
    ])
    log.record("vllm.v1.engine.async_llm", logging.ERROR, "AsyncLLM output_handler failed.",
               where=emit.source_line("vllm.v1.engine.async_llm", "AsyncLLM output_handler failed."),
               exc_text=api, process=API[0], pid=API[1])
    text = log.text()
    site = os.path.dirname(os.path.dirname(inspect.getsourcefile(logging)))  # .../lib/python3.X
    text = text.replace(str(Path(sys.prefix) / "lib" / Path(site).name / "site-packages"),
                        "/usr/local/lib/python3.12/dist-packages")
    OUT.write_bytes(text.encode())
    print(f"{OUT}: {len(text.splitlines())} lines, {len(text):,} bytes")


if __name__ == "__main__":
    main()
