"""Kernel census speed: one step of a scenario, and the thresholds of every op.

    python benchmarks/bench_census.py [SCENARIO] [--cmd "vllm serve ..."] [--gpu NAME] [--tokens N]

Prints, after the one-off vLLM import and scenario resolution: the shared meta model's build (what the other
analyzers build too), the census's own model (built up to the last first-of-its-kind layer, weights processed,
KV caches bound), one recorded pass of a prefill at the budget (or --tokens) with its op table, and the
thresholds of every op (three passes, the fits, the confirmations), each cold, then the same step again warm.
"""
from __future__ import annotations

import argparse
import time

from diaglib import compat
from diaglib.predict import census, layers
from diaglib.scenario import load


def _timed(what: str, fn):
    t = time.perf_counter()
    out = fn()
    print(f"{what:<44} {time.perf_counter() - t:7.2f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", nargs="?", default=None)
    ap.add_argument("--cmd")
    ap.add_argument("--gpu")
    ap.add_argument("--gpu-count", type=int)
    ap.add_argument("--tokens", type=int)
    args = ap.parse_args()

    sc = _timed("vLLM import + scenario resolution", lambda: load(args.scenario, cmd=args.cmd, gpu=args.gpu,
                                                                  gpu_count=args.gpu_count))
    n = args.tokens or sc.vllm_config.scheduler_config.max_num_batched_tokens
    print(f"vLLM {compat.installed()}, {sc.hf_config.architectures[0]}, TP "
          f"{sc.vllm_config.parallel_config.tensor_parallel_size}, step: prefill of {n:,} tokens")
    _timed("shared meta model (layers.build_model)", lambda: layers.build_model(sc))
    t = time.perf_counter()
    prepared = census.prepare(sc)
    t_prep = time.perf_counter() - t
    print(f"{'census model (prepare)':<44} {t_prep:7.2f} s")
    step = census.prefill(n)
    t = time.perf_counter()
    p = census.record(sc, step)
    df = census.ops(sc, step)
    t_one = time.perf_counter() - t
    print(f"{'one pass + its op table':<44} {t_one:7.2f} s   ({p.recorded:,} ops run, {len(df):,} in the model)")
    t = time.perf_counter()
    th = census.thresholds(sc, "prefill")
    dec = census.thresholds(sc, "decode")
    t_th = time.perf_counter() - t
    print(f"{'thresholds of every op (prefill + decode)':<44} {t_th:7.2f} s   ({len(th) + len(dec):,} op tensors)")
    _timed("the same step again (cached)", lambda: census.ops(sc, step))
    print(f"\ncensus of one step (census model + pass):      {t_prep + t_one:7.2f} s   (target <= 10 s)")
    print(f"thresholds for all ops (census model + fits):  {t_prep + t_th:7.2f} s   (target <= 30 s)")
    for note in prepared.notes:
        print(f"note: {note}")

if __name__ == "__main__":
    main()
