"""Issue 17's real fault under compute-sanitizer, and a stand-alone FA3 reproduction of its mechanism.

    python scripts/gpu/i17_sanitizer.py engine [--sizes 512]      (the failing engine, in this process)
    python scripts/gpu/i17_sanitizer.py fa3 --seq 512 --width 16 --tail poison [--no-sched]

``engine``: Llama-3.1-8B (dummy weights, the rank stand-in of data/live/standins) with ``--max-model-len 256
--max-num-seqs 256 -cc.cudagraph_mode=FULL``, FULL graphs captured only at ``--sizes`` (default 512, the first
capture that faulted), the KV cache given outright (``--kv-cache-memory-bytes``, 4 GiB) so that vLLM runs no
CUDA-graph memory estimate (under compute-sanitizer that estimate came out negative and vLLM refused to start).
Recorded (hunt/sanitizer3.jsonl): that default starts fine; the fault needs vLLM's own capture list (``--sizes=``)
and a large KV cache (``--kv`` 80 or 100 GiB), where memcheck runs out of device memory instead.
Built as diaglib's probe child builds it (vLLM's serve parser, LLMEngine in this process). Prints
``ENGINE READY`` if start-up gets through the capture.

``fa3``: vLLM's FA3 (``vllm.vllm_flash_attn.flash_attn_varlen_func``) called the way FlashAttentionImpl calls it
in the warm-up of that capture: 256 requests of 2 query tokens each (512 tokens), every seqused_k = ``--seq``,
over a block table of ``--width`` blocks of 16 tokens per row, num_splits 32 (vLLM's bound for FULL graphs) and
AOT scheduler metadata from ``get_scheduler_metadata`` (``--no-sched``: none). The block table is the first
256 x width entries of a larger int32 buffer whose tail (what lies after the table) is zero or ``poison``
(block id 2**30), so a row read past its end shows. Prints ``FA3 OK`` when the call returns and synchronizes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from shlex import join as shlex_join

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CMD = ("vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 256 --max-num-seqs 256 -cc.cudagraph_mode=FULL "
       "--gpu-memory-utilization 0.5 --kv-cache-memory-bytes {kv}")


def engine(sizes: str, kv: int) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS", "0")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.llm_engine import LLMEngine

    cmd = CMD.format(kv=kv) + (f" -cc.cudagraph_capture_sizes=[{sizes}]" if sizes else "")
    try:
        from i17 import MODELS

        from diaglib.live.engine import engine_args, plan

        spec = plan(cmd, models=MODELS, gpus=1)
        argv, args = spec.argv, None
    except Exception as e:  # noqa: BLE001 -- diaglib is edited concurrently: fall back to vLLM's own parser, same argv
        print(f"diaglib's plan failed ({type(e).__name__}: {e}); building the argv here", flush=True)
        import shlex

        from vllm.engine.arg_utils import EngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        standin = Path(__file__).resolve().parents[2] / "data" / "live" / "standins" / "Llama-3.1-8B-Instruct-tp1"
        argv = ["serve", str(standin), *shlex.split(cmd)[3:], "--tensor-parallel-size", "1",
                "--data-parallel-size", "1", "--load-format", "dummy", "--skip-tokenizer-init"]
        parser = FlexibleArgumentParser(prog="vllm serve")
        parser.add_argument("model_tag", nargs="?")
        EngineArgs.add_cli_args(parser)
        ns = parser.parse_args(argv[1:])
        ns.model = ns.model_tag
        args = EngineArgs.from_cli_args(ns)
    print("COMMAND", shlex_join(["vllm", *argv]), flush=True)
    t0 = time.monotonic()
    LLMEngine.from_engine_args(args if args is not None else engine_args(argv),
                               usage_context=UsageContext.OPENAI_API_SERVER, enable_multiprocessing=False)
    print(f"ENGINE READY after {time.monotonic() - t0:.1f} s", flush=True)
    return 0


def fa3(seq: int, width: int, tail: str, sched: bool, reqs: int = 256, q_len: int = 2) -> int:
    import torch
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    torch.manual_seed(0)
    dev = torch.device("cuda")
    heads, kv_heads, d, bs, splits = 32, 8, 128, 16, 32  # Llama-3.1-8B's attention, vLLM's block size and bound
    num_blocks = 2048  # 4 GiB over 32 layers: 2048 blocks of 16 tokens
    tokens = reqs * q_len
    q = torch.randn(tokens, heads, d, device=dev, dtype=torch.bfloat16)
    k_cache = torch.randn(num_blocks, bs, kv_heads, d, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    out = torch.empty_like(q)
    buf = torch.zeros(reqs * width + 4096, dtype=torch.int32, device=dev)
    if tail == "poison":
        buf[reqs * width:] = 1 << 30
    block_table = buf[:reqs * width].view(reqs, width)  # every dummy row: block 0 (vLLM's dummy rows are zero)
    seqused_k = torch.full((reqs,), seq, dtype=torch.int32, device=dev)
    cu_q = torch.arange(0, tokens + 1, q_len, dtype=torch.int32, device=dev)
    max_q, max_k = tokens, seq  # _dummy_run: max_query_len = num_tokens, max_seq_len = max(seq_lens)
    meta = None
    if sched:
        meta = get_scheduler_metadata(batch_size=reqs, max_seqlen_q=max_q, max_seqlen_k=max_k, num_heads_q=heads,
                                      num_heads_kv=kv_heads, headdim=d, cache_seqlens=seqused_k,
                                      qkv_dtype=torch.bfloat16, cu_seqlens_q=cu_q, page_size=bs, causal=True,
                                      window_size=(-1, -1), num_splits=splits)
    print(f"FA3 seq={seq} width={width} ({width * bs} tokens per row) tail={tail} sched={sched} "
          f"reqs={reqs} q_len={q_len} num_splits={splits}", flush=True)
    flash_attn_varlen_func(q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu_q, max_seqlen_q=max_q,
                           seqused_k=seqused_k, max_seqlen_k=max_k, softmax_scale=d ** -0.5, causal=True,
                           block_table=block_table, scheduler_metadata=meta, fa_version=3, num_splits=splits)
    torch.cuda.synchronize()
    print(f"FA3 OK finite={bool(torch.isfinite(out).all())}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--sizes", default="512", help="cudagraph capture sizes, comma-separated ('' = vLLM's own)")
    e.add_argument("--kv", type=int, default=4 << 30, help="--kv-cache-memory-bytes")
    f = sub.add_parser("fa3")
    f.add_argument("--seq", type=int, default=512)
    f.add_argument("--width", type=int, default=16)
    f.add_argument("--tail", choices=["zero", "poison"], default="zero")
    f.add_argument("--no-sched", action="store_true")
    a = ap.parse_args()
    if a.what == "engine":
        return engine(a.sizes, a.kv)
    return fa3(a.seq, a.width, a.tail, not a.no_sched)


if __name__ == "__main__":
    sys.exit(main())
