"""Reading a 50 MB server log: diaglib triage's parse of a long-running server that crashed at the end.

    python benchmarks/bench_triage.py [--mb 50] [--profile] [--full]

The log is the seed log (tests/logs/seed-glm46-fp8-0.10.1.1.log) with its start-up, then hours of serving
(vLLM's periodic stats lines, request lines, worker lines, interleaved, colour prefixes and CRLF as vLLM writes
them) up to the crash. Prints the time to read it (decode, records, tracebacks, the input dump, the crash:
everything before vLLM is asked). --full also times the whole triage (rebuild, replay, suspects) with the
installed vLLM. --profile adds the top functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

from diaglib.triage import crash, diagnose, lines, parse

SEED = Path(__file__).resolve().parents[1] / "tests" / "logs" / "seed-glm46-fp8-0.10.1.1.log"
CYAN, RESET = "\x1b[1;36m", "\x1b[0;0m"
SERVING = [
    CYAN + "(APIServer pid=2817)" + RESET + " INFO 12-01 21:{m:02d}:{s:02d} [loggers.py:123] Engine 000: Avg prompt "
    "throughput: 8130.4 tokens/s, Avg generation throughput: 41.7 tokens/s, Running: 3 reqs, Waiting: 0 reqs, "
    "GPU KV cache usage: 1.9%, Prefix cache hit rate: 12.5%",
    CYAN + "(APIServer pid=2817)" + RESET + " INFO 12-01 21:{m:02d}:{s:02d} [logger.py:41] Received request "
    "cmpl-{i}: prompt: 'Summarise the following report in three sentences', params: SamplingParams(n=1, "
    "temperature=0.6, top_p=0.95, max_tokens=1024), prompt_token_ids: None, prompt_embeds shape: None, "
    "lora_request: None.",
    CYAN + "(APIServer pid=2817)" + RESET + " INFO 12-01 21:{m:02d}:{s:02d} [async_llm.py:273] Added request cmpl-{i}.",
    CYAN + "(APIServer pid=2817)" + RESET + " INFO:     10.1.2.3:51234 - \"POST /v1/completions HTTP/1.1\" 200 OK",
    CYAN + "(VllmWorker TP3 pid=3104)" + RESET + " WARNING 12-01 21:{m:02d}:{s:02d} [fused_moe.py:727] Using default "
    "MoE config. Performance might be sub-optimal! Config file not found at ['/x/E=160,N=192,device_name=NVIDIA_H20"
    ",dtype=fp8_w8a8.json']\r",
]


def make_log(mb: float) -> str:
    """The seed log's start-up, ``mb`` MB of serving, then its crash."""
    seed = SEED.read_text()
    cut = seed.index("Received request")
    start = seed.rfind("\n", 0, cut) + 1
    head, crash_part = seed[:start], seed[start:]
    body, size, i = [], 0, 0
    want = int(mb * 1e6) - len(head) - len(crash_part)
    while size < want:
        line = SERVING[i % len(SERVING)].format(m=(i // 60) % 60, s=i % 60, i=i) + "\n"
        body.append(line)
        size += len(line)
        i += 1
    return head + "".join(body) + crash_part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--full", action="store_true", help="also the whole triage through the installed vLLM")
    args = ap.parse_args()
    data = make_log(args.mb).encode()
    prof = cProfile.Profile() if args.profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    facts = parse.parse(lines.decode(data))
    c = crash.crash(facts)
    if prof:
        prof.disable()
    t_read, c_read = time.perf_counter() - t0, time.process_time() - c0
    print(f"log: {len(data) / 1e6:.1f} MB, {facts.lines:,} lines, {len(facts.tracebacks)} tracebacks")
    print(f"read: {t_read:.2f} s wall, {c_read:.2f} s CPU  (step {facts.dump.total_tokens if facts.dump else '?'} tokens, "
          f"kernel {c.kernel if c else '?'})")
    if args.full:
        t1 = time.perf_counter()
        t = diagnose.triage(data, source="bench")
        print(f"full triage: {time.perf_counter() - t1:.1f} s (vLLM {t.version['installed']}; verdict: "
              f"{diagnose.verdict(t)})")
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
        print(s.getvalue())


if __name__ == "__main__":
    main()
