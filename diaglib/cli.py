"""`diaglib`: one command line with subcommands; bad input prints one line and exits 2.

While a subcommand computes, whatever vLLM, torch or any other library prints goes to diaglib's log file
(to stderr with -v); stdout carries the answer alone. Answers of subcommands marked :func:`cache.cacheable`
are kept (diaglib.cache) and served again without importing vLLM; --no-cache computes afresh.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import sys
import traceback
from pathlib import Path

from . import cache, compat, progress
from .cache import cacheable
from .errors import DiagError, vllm_refusal

LOG_MAX_BYTES = 8 << 20  # the log is started afresh (one old copy kept) past this size


class _Parser(argparse.ArgumentParser):
    """argparse with diaglib's one-line error (exit 2) instead of a usage block."""

    def error(self, message: str):
        self.exit(2, f"diaglib: error: {one_line(message)} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return x


def _scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", help="scenario file or name under data/scenarios (default: the seed)")
    p.add_argument("--cmd", help='a serve command instead of a scenario file: "vllm serve MODEL [flags]"')
    p.add_argument("--gpu", help='GPU to resolve for, e.g. "NVIDIA H200" (default: the scenario\'s)')
    p.add_argument("--gpu-count", type=positive_int, help="GPUs on the host (default: the scenario's, else 8)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--vllm", default=argparse.SUPPRESS, help="as the global --vllm (here too for convenience)")


def _common_args(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """-v and --no-cache, accepted before and after the subcommand."""
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="show vLLM's and torch's own log lines (stderr) and tracebacks")
    p.add_argument("--no-cache", action="store_true", default=default,
                   help="compute the answer afresh (and keep it) instead of serving a kept one")


def _load(args):
    from .scenario import load

    return load(args.scenario, cmd=args.cmd, gpu=args.gpu, gpu_count=args.gpu_count, vllm=args.vllm)


def _print(args, data, text) -> None:
    """The command's answer: printed once the command is done (JSON with --json), and kept if cacheable."""
    args._answers.append((json.loads(json.dumps(data, default=str)), text))


def _echo(text: str) -> None:
    """A line for the user while the command still runs (stdout)."""
    print(text, file=_Quiet.current.user_out if _Quiet.current else sys.stdout, flush=True)


def _warn(text: str) -> None:
    """A message for the user while the command still runs (stderr)."""
    print(text, file=_Quiet.current.user_err if _Quiet.current else sys.stderr, flush=True)


@cacheable
def cmd_show(args) -> None:
    from .predict.summarize import format_text, summarize

    s = summarize(_load(args))
    _print(args, s, format_text(s))


def cmd_compare(args) -> None:
    """Several releases side by side (each answers in its own environment), differences first."""
    from .present.versions import compare, format_text, versions_arg

    versions = versions_arg(args.vllm or "")
    scenario = [args.scenario] if args.scenario else []
    for flag, value in (("--cmd", args.cmd), ("--gpu", args.gpu), ("--gpu-count", args.gpu_count)):
        if value is not None:
            scenario += [flag, str(value)]
    tokens = getattr(args, "tokens", None)
    df = compare(versions, scenario, tokens)
    _print(args, json.loads(df.to_json(orient="records")), format_text(df, all_fields=getattr(args, "all", False)))


def cmd_report(args) -> int:
    from .present.report import ReportError, build

    try:
        pages = build(args.scenario, out=args.out, cmd=args.cmd, gpu=args.gpu, gpu_count=args.gpu_count,
                      vllm=args.vllm, jobs=args.jobs, only=args.only)
    except ReportError as e:
        _warn(f"diaglib: report: failed: {e} (pages written to {args.out})")
        return 1
    rows = [{"notebook": p.notebook, "title": p.title, "seconds": round(p.seconds, 1), "slowest": p.slowest,
             "html": os.path.join(args.out, p.notebook.replace(".ipynb", ".html"))} for p in pages]
    _print(args, {"index": os.path.join(args.out, "index.html"), "pages": rows},
           "\n".join(f"{r['seconds']:6.1f} s  {r['html']}  (slowest {r['slowest']})" for r in rows)
           + f"\n{os.path.join(args.out, 'index.html')}")
    return 0


def _records(data: dict) -> dict:
    """DataFrames inside a result -> JSON-ready lists of rows."""
    return {k: json.loads(v.to_json(orient="records")) if hasattr(v, "to_json") else v for k, v in data.items()}


@cacheable
def cmd_moe(args) -> None:
    from .predict.moe import format_text, launches

    sc = _load(args)
    tokens = sc.vllm_config.scheduler_config.max_num_batched_tokens if args.tokens is None else args.tokens
    info = launches(sc, tokens)
    _print(args, _records(info), format_text(info))


@cacheable
def cmd_kernels(args) -> None:
    from .predict.census import format_text, step_for, summary

    sc = _load(args)
    tokens = sc.vllm_config.scheduler_config.max_num_batched_tokens if args.tokens is None else args.tokens
    info = summary(sc, step_for(sc, tokens, args.reqs, args.decode, args.step))
    _print(args, _records(info), format_text(info))


@cacheable
def cmd_dispatch(args) -> None:
    from .predict.dispatch import dispatch_table

    df = dispatch_table(_load(args), args.tokens, decode=args.decode)
    _print(args, json.loads(df.to_json(orient="records")), _dispatch_text(df))


def _dispatch_text(df) -> str:
    note = df.derived.iloc[0]
    table = df.drop(columns=["vllm_version", "derived", "batch_descriptor"]).to_string(index=False)
    return table + (f"\n({note})" if isinstance(note, str) else "")


@cacheable
def cmd_trace(args) -> None:
    from .predict.schedule import format_trace, trace
    from .predict.workload import prompts, with_decoders

    if args.decoders and len(args.prompt) != 1:
        raise DiagError("--decoders goes with exactly one --prompt")
    w = (with_decoders(args.prompt[0], args.decoders, output_len=args.output_len) if args.decoders
         else prompts(*args.prompt, output_len=args.output_len))
    tr = trace(_load(args), w, _gib(args.kv_memory_gib))
    data = {"scenario": tr.scenario, "vllm_version": tr.vllm_version, "notes": tr.notes, "kv": tr.kv,
            "per_step": tr.per_step, "per_request": tr.per_request}
    _print(args, _records(data), format_trace(tr))


def cmd_sweep(args) -> None:
    from .predict.schedule import format_sweep, parse_knob, parse_lengths, sweep

    knobs = dict(parse_knob(k) for k in args.knob or [])
    if args.live:
        return _sweep_live(args, parse_lengths(args.lengths), knobs)
    df = sweep(_load(args), parse_lengths(args.lengths), knobs, output_len=args.output_len, decoders=args.decoders,
               kv_memory_bytes=_gib(args.kv_memory_gib), progress=not args.json)
    if args.out:
        if args.out.endswith(".parquet"):
            df.assign(compile_range=df.compile_range.astype(str)).to_parquet(args.out, index=False)
        elif args.out.endswith(".csv"):
            df.to_csv(args.out, index=False)
        else:
            raise DiagError(f"-o must name a .parquet or .csv file, got {args.out!r}")
        _print(args, {"out": args.out, "rows": len(df)}, f"{args.out}: {len(df)} rows")
        return
    _print(args, json.loads(df.to_json(orient="records")), format_sweep(df, list(knobs)))


def _sweep_live(args, lengths: list[int], knobs: dict) -> None:
    from .live import livesweep as L

    planted = _planted_probe(args.planted)
    gpus = _gpus(args.gpus)
    if gpus is None:
        raise DiagError("a live sweep runs probes on a GPU, and this host has none")
    sc = _load(args)
    prefix = L.prefix(sc, args.planted)
    labels = [s.label for s in L.settings(sc, knobs)]
    rows = []
    for row in L.stream(sc, lengths, knobs, store_path=args.store, prefix=prefix, weights=args.weights, gpus=gpus,
                        make_probe=planted):
        rows.append(row)
        if not args.json:
            done, total = L.progress(L.heatmap_frame(rows, lengths, labels))
            _echo(f"[{done}/{total}] {row['setting']} {row['tokens']}: {row['outcome']}"
                  + (" (stored)" if row["stored"] else ""))
    grid = L.heatmap_frame(rows, lengths, labels)
    _print(args, {"store": args.store, "prefix": prefix, "rows": rows}, grid.to_string())


def _gib(value: float | None) -> int | None:
    return None if value is None else int(value * 2**30)


def _switch_names(text: str | None) -> list[str] | None:
    from .predict.switches import BY_NAME

    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in BY_NAME]
    if bad or not names:
        raise DiagError(f"unknown kill switch {bad[0]!r}; known: {', '.join(BY_NAME)}" if bad else "no switches given")
    return names


def _token_range(text: str | None, tokens: int) -> tuple[int, int] | None:
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    try:
        rng = int(lo), int(hi)
    except ValueError:
        raise DiagError(f"--range wants LO:HI, got {text!r}") from None
    if not sep or not 1 <= rng[0] <= tokens <= rng[1]:
        raise DiagError(f"--range {text} must be LO:HI with 1 <= LO <= {tokens} <= HI")
    return rng


def _gpus(text: str | None) -> list[int] | None:
    from .live.observe import gpu_count

    if text is None:
        return list(range(gpu_count())) or None
    try:
        return [int(g) for g in text.split(",")]
    except ValueError:
        raise DiagError(f"--gpus wants indices like 0,1, got {text!r}") from None


def cmd_probe(args) -> None:
    """Crash-isolated probes at exact token counts on this host's GPUs, or (--compare) the side-by-side table."""
    from .live import compare
    from .live import probe as P

    if args.compare:
        df = compare.probes(args.store, args.run)
        cols = ["run", "key", "outcome", "observed_tokens", "steps_match", "modes_match", "kernel", "probe_s"]
        _print(args, json.loads(df.to_json(orient="records")), df[cols].to_string(index=False))
        return
    from .live.engine import plan
    from .scenario import find_scenario, read_scenario_file

    if args.cmd is not None:
        command, models = args.cmd, {}
    else:
        path = find_scenario(args.scenario)
        data = read_scenario_file(path)
        command = data["command"]
        models = {k: str((path.parent / v).resolve()) for k, v in data.get("models", {}).items()}
    probes = P.exact(P.parse_lengths(args.lengths)) if args.lengths else []
    probes += [P.batch(P.parse_batch(b)) for b in args.batch or []]
    if args.planted_oob is not None:
        probes.append(P.planted_fault("oob_write", key=f"planted-oob-m{args.planted_oob}", m=args.planted_oob,
                                      threshold=args.planted_oob))
    if not probes:
        raise DiagError("nothing to probe: give --lengths, --batch or --planted-oob")
    gpus = _gpus(args.gpus)
    if gpus is None:
        raise DiagError("no GPU here: live probes need one (use --compare to read stored records)")
    spec = plan(command, models=models, gpus=len(gpus), weights=args.weights)
    df = P.run(probes, spec, store_path=args.store, run_name=args.run or "probe", gpus=gpus,
               probe_timeout_s=args.timeout, ready_timeout_s=args.ready_timeout)
    cols = ["key", "outcome", "detail", "engine_seq", "engine_ready_s", "probe_s", "observed_tokens", "kernel"]
    _print(args, json.loads(df.to_json(orient="records")), df[cols].to_string(index=False))


@cacheable
def cmd_switches(args) -> None:
    from .predict.switches import format_text, verify

    df = verify(_load(args))
    _print(args, json.loads(df.to_json(orient="records")), format_text(df))


def cmd_bisect(args) -> None:
    from .live import bisect as B
    from .live.observed import fit
    from .predict import switches as sw

    if args.tokens < 1:
        raise DiagError("--tokens must be >= 1")
    names = _switch_names(args.switches)
    rng = _token_range(args.range, args.tokens)
    gpus = _gpus(args.gpus)
    sc = _load(args)
    candidates = names or sw.candidates(sc)
    prefix = args.prefix or B.store_prefix(sc) + (f"-planted{args.planted}" if args.planted else "")
    # plain probes of other runs on an engine built as a trial's would be count too (never for a planted rehearsal)
    engines = {} if args.planted else B.planned_engines(sc, candidates, gpus=gpus, weights=args.weights)
    known = B.known_from_store(args.store, prefix, engines)
    if gpus is None and not any(not s and t == args.tokens for s, t, _ in known):
        raise DiagError(f"no result for {args.tokens} tokens in {args.store} and no GPU here to run it")
    run = B.live_oracle(sc, store_path=args.store, prefix=prefix, weights=args.weights, gpus=gpus,
                        probe_timeout_s=args.timeout, make_probe=_planted_probe(args.planted))
    result = B.bisect(run, args.tokens, candidates, token_range=rng, known=known,
                      max_runs=0 if gpus is None else args.max_runs, precheck=B.vllm_precheck(sc))
    data, text = B.describe(result, sc, B.fault_detail(args.store, prefix, engines, args.tokens))
    classes = fit(sc, data, {"error": data["error"]})
    fits = classes[classes.verdict == "fits"]
    text += "\nknown classes that fit: " + (", ".join(fits.id) or "none") + "".join(
        f"\n  {r.id}: {r.why}" for r in fits.itertuples())
    if args.planted:
        text = (f"REHEARSAL: a planted fault fires with CUDA graphs on in a forward pass of {args.planted} tokens\n"
                + text)
    _print(args, {**data, "planted": args.planted, "store": str(args.store), "prefix": prefix,
                  "classes": json.loads(classes.to_json(orient="records"))}, text)


def cmd_evidence(args) -> None:
    from pathlib import Path

    from .live import evidence as E
    from .live.engine import plan
    from .live.observed import fit
    from .live.probe import exact
    from .predict import switches as sw

    if args.tokens < 1:
        raise DiagError("--tokens must be >= 1")
    names = _switch_names(args.switches) or []
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in E.steps(Path("."))]
    if unknown or not steps:
        raise DiagError(f"unknown evidence step {unknown[0]!r}; known: {', '.join(E.steps(Path('.')))}"
                        if unknown else "no evidence steps given")
    work = args.work or f"{args.out}.work"
    failing = _planted_probe(args.planted)(args.tokens) if args.planted else exact([args.tokens])[0]
    gpus = _gpus(args.gpus)
    if gpus is None and not all(E.stored(work, s, failing.key) for s in steps):
        raise DiagError("evidence re-runs the failing probe on a GPU, and this host has none "
                        f"(only steps already run in {work} can be read back here)")
    sc = _load(args)
    flags, env = sw.apply(sc, names)
    spec = None
    if gpus is not None:
        spec = plan(sc.command, models=sc.models, gpus=len(gpus), flags=flags, weights=args.weights)
        spec.env.update(env)
    results = E.run_steps(spec, failing, work, names=steps, gpus=(gpus or [None])[:1], probe_timeout_s=args.timeout)
    built = (E.engine_record(work, steps) or {}).get("spec") or (spec.as_dict() if spec else {})
    about = {"scenario": sc.name, "command": sc.command, "vllm": sc.vllm_version, "gpu": sc.gpu.name,
             "tokens": args.tokens, "switches": names, "engine": built.get("command"), "weights": built.get("weights")}
    if args.planted:
        about["planted"] = (f"rehearsal: a planted Triton out-of-bounds write fires with CUDA graphs on in a "
                            f"forward pass of {args.planted} tokens")
    facts = E.findings(results, Path(work))
    error = next((s["detail"] for s in facts["steps"] if s["outcome"] not in (None, "ok")), None)
    classes = fit(sc, None, {"kernel": facts["kernel"], "error": error})
    out = E.assemble(args.out, results, work, about=about, classes=classes, facts=facts)
    data = json.loads((out / "summary.json").read_text())
    _print(args, data, f"{out}/summary.html\nfaulting kernel: {data['kernel'] or 'not identified'}"
                       + (f" (from {data['kernel_from']})" if data["kernel"] else ""))


def _planted_probe(at: int | None):
    """``make_probe(tokens[, switches])`` (bisect's and livesweep's) for a rehearsal with the graphs-only fault
    planted at ``at`` tokens."""
    from .live.probe import in_forward

    if at is None:
        return None
    if at < 1:
        raise DiagError("--planted must be >= 1")
    return lambda tokens, _switches=(): in_forward(tokens, at)


@cacheable
def cmd_memory(args) -> None:
    from .predict.memory import format_text, layout

    info = layout(_load(args))
    _print(args, _records(info), format_text(info))


@cacheable
def cmd_boundaries(args) -> None:
    from .predict.boundaries import around, boundaries, format_text, summary
    from .predict.known_issues import match

    sc = _load(args)
    df = boundaries(sc)
    near, info = around(sc, args.around, df=df), summary(sc, df)
    issues = match(sc)
    applying = issues[issues["applies"]]
    text = (format_text(df, near, info, limit=None if args.all else 25) + "\n\nKnown bug classes that apply\n"
            + "\n".join(f"- {r.id}: {r.why} ({r.links[0] if r.links else 'no upstream link'})"
                        for r in applying.itertuples()))
    _print(args, {"summary": info, **_records({"around": near, "boundaries": df, "known_issues": issues})}, text)


def cmd_triage(args) -> int | None:
    """The crash a log records: its step replayed through vLLM, the known bug classes ranked, the next commands."""
    from .triage import diagnose, handover

    data, label = handover.read(args.log)
    if not args.no_replay:
        q = _Quiet.current
        rc = handover.maybe(args, data, q.user_out if q else None, q.user_err if q else None)
        if rc is not None:
            return rc
    t = diagnose.triage(data, source=args.label or label, model_dir=args.model_dir, gpu=args.gpu,
                        gpu_count=args.gpu_count, prompts=args.prompt, resolve=not args.no_replay)
    out = diagnose.as_dict(t)
    if args.out:
        from .present.triage_page import page

        handover.write(args.out, page(out))
    _print(args, out, diagnose.format_text(t) + (f"\npage        {args.out}" if args.out else ""))
    return None


def cmd_cache(args) -> None:
    """Where kept answers live and what they hold; --clear empties it."""
    data = cache.clear() if args.clear else cache.info()
    verb = "removed" if args.clear else "holds"
    spaces = ", ".join(f"{n} {k}" for k, n in data["by_namespace"].items())
    _print(args, data, f"{data['path']} {verb} {data['entries']} answers, {data['bytes'] / 2**20:.1f} MiB"
                       + (f" ({spaces})" if spaces else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diaglib", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm", help=f"which vLLM release answers ({', '.join(compat.supported())}: its project "
                                       "environment); default: the scenario file's, else this environment's. "
                                       "show/compare take several, comma-separated")
    _common_args(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("cache", help="where kept answers live and what they hold; --clear empties it")
    p.add_argument("--clear", action="store_true", help="remove every kept answer")
    p.add_argument("--info", action="store_true", help="show where the cache is and what it holds (default)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("show", help="the resolved vLLM configuration that matters at token boundaries")
    _scenario_args(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("compare", help="several vLLM releases side by side, differences first: "
                                       "--vllm 0.10.1.1,0.33.0 (also: show --vllm A,B)")
    _scenario_args(p)
    p.add_argument("--tokens", type=int, nargs="+", metavar="N",
                   help="also compare the dispatch of steps of N tokens (default: the budget and one below)")
    p.add_argument("--all", action="store_true", help="also list the answers that are the same")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("moe", help="MoE kernels, Triton config, buffers and grids for one step of M tokens")
    _scenario_args(p)
    p.add_argument("--tokens", type=int, default=None, help="tokens in the step (default: max_num_batched_tokens)")
    p.set_defaults(func=cmd_moe)

    p = sub.add_parser("kernels", help="every kernel of one step of N tokens (vLLM's forward on meta): shapes, who "
                                       "runs it, int32 and grid headroom, the first to cross as N grows")
    _scenario_args(p)
    p.add_argument("--tokens", type=int, default=None, help="tokens in the step (default: max_num_batched_tokens)")
    p.add_argument("--reqs", type=int, default=None, help="requests sharing them (default 1; with --decode: N)")
    p.add_argument("--decode", action="store_true", help="a decode batch: every request brings one token")
    p.add_argument("--step", choices=["mixed", "profile"], help="a mix (reqs - 1 decodes + one prefill chunk) or "
                   "vLLM's profile run (its dummy requests at --tokens, default the budget, plus the sampler)")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("memory", help="predicted per-GPU memory: weights by component, KV cache, large buffers")
    _scenario_args(p)
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("boundaries", help="every token count where vLLM's behaviour changes, nearest first")
    _scenario_args(p)
    p.add_argument("--around", type=int, nargs="+", metavar="N",
                   help="token counts to describe (default: max_num_batched_tokens - 1, itself, + 1)")
    p.add_argument("--all", action="store_true", help="list every boundary (default: the nearest 25)")
    p.set_defaults(func=cmd_boundaries)

    p = sub.add_parser("dispatch", help="padded size, CUDA-graph mode and compile range vLLM picks for steps of N tokens")
    _scenario_args(p)
    p.add_argument("--tokens", type=int, nargs="+", required=True, metavar="N", help="tokens in the step")
    p.add_argument("--decode", action="store_true", help="uniform decode steps (N requests, 1 token each)")
    p.set_defaults(func=cmd_dispatch)

    p = sub.add_parser("trace", help="vLLM's real scheduler on a workload: the step table, with graph dispatch")
    _scenario_args(p)
    p.add_argument("--prompt", type=int, action="append", required=True, metavar="TOKENS",
                   help="a prompt of TOKENS tokens arriving at step 0 (repeat for several)")
    p.add_argument("--decoders", type=int, default=0, metavar="N", help="N requests already decoding when the prompt arrives")
    p.add_argument("--output-len", type=int, default=3, help="tokens each prompt generates (default 3)")
    p.add_argument("--kv-memory-gib", type=positive_float, help="KV-cache memory per GPU (default: diaglib's guess)")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("sweep", help="trace single prompts over a range of lengths x knob values, one row per step")
    _scenario_args(p)
    p.add_argument("--lengths", required=True, help="prompt lengths: A:B (inclusive), A:B:STEP or a,b,c")
    p.add_argument("--knob", action="append", metavar="NAME=V1,V2",
                   help="a knob and its values, e.g. max_num_batched_tokens=8191,8192 (repeatable)")
    p.add_argument("--decoders", type=int, default=0, metavar="N", help="N concurrent decoders with every prompt")
    p.add_argument("--output-len", type=int, default=1, help="tokens each prompt generates (default 1)")
    p.add_argument("--kv-memory-gib", type=positive_float, help="KV-cache memory per GPU (default: diaglib's guess)")
    p.add_argument("-o", "--out", help="write the frame to a .parquet or .csv file")
    p.add_argument("--live", action="store_true", help="run exact-length probes on the GPU instead (resumable; "
                   "knobs may include switches=none,cudagraph-off,...)")
    p.add_argument("--store", default="data/live/sweep.jsonl", help="--live: the live record store")
    p.add_argument("--gpus", help="--live: GPU indices to use, e.g. 0,1 (default: all)")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "standin"], help="--live: model weights")
    p.add_argument("--planted", type=int, metavar="N", help="--live rehearsal: plant a Triton out-of-bounds write "
                   "that fires only with CUDA graphs on, in a forward pass of exactly N tokens")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="run every notebook headless and write self-contained HTML + index.html")
    _scenario_args(p)
    p.add_argument("-o", "--out", default="reports", help="output folder (default: reports)")
    p.add_argument("-j", "--jobs", type=int, help="kernels working in parallel (default: CPU cores, at most 4)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only notebooks whose file name contains NAME")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("switches", help="the kill switches of this vLLM: spelling, layer, checked effect")
    _scenario_args(p)
    p.set_defaults(func=cmd_switches)

    p = sub.add_parser("bisect", help="find the fewest kill switches and the nearest token counts that avoid a fault")
    _scenario_args(p)
    p.add_argument("--tokens", type=int, required=True, help="the prompt length that faults")
    p.add_argument("--switches", help="candidate kill switches, broadest first, comma-separated "
                                      "(default: all that work on this vLLM; see `diaglib switches`)")
    p.add_argument("--range", help="token counts searched, LO:HI (default: 1:TOKENS+1)")
    p.add_argument("--store", default="data/live/bisect.jsonl", help="live record store (results are reused)")
    p.add_argument("--prefix", help="run-name prefix in the store (default: one per scenario)")
    p.add_argument("--max-runs", type=int, help="stop after this many new runs")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "standin"], help="model weights for runs")
    p.add_argument("--gpus", help="GPU indices to use, e.g. 0,1 (default: all)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one probe may take (default 600)")
    p.add_argument("--planted", type=int, metavar="N", help="rehearsal: plant a Triton out-of-bounds write that "
                   "fires only with CUDA graphs on, in a forward pass of exactly N tokens")
    p.set_defaults(func=cmd_bisect)

    p = sub.add_parser("probe", help="crash-isolated probes of exact token counts on the GPU; --compare: "
                                     "predicted vs observed from stored records")
    _scenario_args(p)
    p.add_argument("--lengths", help="prompt lengths, e.g. 8180-8200,16384 (one probe each)")
    p.add_argument("--batch", action="append", help="prompts arriving together, e.g. 8x1001+184 (repeatable)")
    p.add_argument("--planted-oob", type=int, metavar="M", help="also run the planted Triton fault at M rows")
    p.add_argument("--store", default="data/live/probes.jsonl", help="append-only record store (re-runs resume)")
    p.add_argument("--run", help="run name in the store (default: probe)")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "standin"], help="model weights")
    p.add_argument("--gpus", help="GPU indices to spread probes over, e.g. 0,1 (default: all)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one probe may take (default 300)")
    p.add_argument("--ready-timeout", type=float, default=900, help="seconds an engine may take to start")
    p.add_argument("--compare", action="store_true", help="print predicted vs observed for --store/--run")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("evidence", help="re-run a failing probe under debug aids; one folder with a summary page")
    _scenario_args(p)
    p.add_argument("--tokens", type=int, required=True, help="the prompt length that faults")
    p.add_argument("--switches", help="kill switches to keep on during the re-runs, comma-separated")
    p.add_argument("--steps", default="blocking,sanitizer,trace",
                   help="debug-aid runs: blocking, sanitizer, trace, debuglog, coredump (default: the first three)")
    p.add_argument("-o", "--out", required=True, help="bundle folder (safe to share)")
    p.add_argument("--work", help="folder for raw outputs (default: OUT.work; not for sharing)")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "standin"], help="model weights for runs")
    p.add_argument("--gpus", help="GPU index to use (default: the first)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one probe may take (default 600)")
    p.add_argument("--planted", type=int, metavar="N", help="rehearsal: plant a Triton out-of-bounds write that "
                   "fires only with CUDA graphs on, in a forward pass of exactly N tokens")
    p.set_defaults(func=cmd_evidence)

    p = sub.add_parser("triage", help="a crash from its log: the step that died, what vLLM did in it, ranked suspects")
    p.add_argument("log", help="the server's log: a file, or - for stdin")
    p.add_argument("--model-dir", help="the model's local folder (config.json at least), if not data/models/NAME")
    p.add_argument("--gpu", help='GPU when the log names none, e.g. "NVIDIA H200" (overrides the log\'s)')
    p.add_argument("--gpu-count", type=positive_int, help="GPUs on the host (default: what the parallel sizes need)")
    p.add_argument("--prompt", type=positive_int, action="append", metavar="TOKENS",
                   help="a prompt length of the workload, for candidate steps when the log has no input dump")
    p.add_argument("--no-replay", action="store_true", help="only read the log (no vLLM: no rebuild, no replay)")
    p.add_argument("-o", "--out", help="also write a self-contained HTML page (safe to attach to an issue)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--label", help=argparse.SUPPRESS)  # the log's name when another environment reads it on stdin
    p.set_defaults(func=cmd_triage)

    for p in sub.choices.values():  # every subcommand, also those added later, takes -v and --no-cache
        _common_args(p)
    return parser


def _wanted_version(args) -> str | None:
    """The vLLM version that must answer (scenario.answering_vllm): --vllm, else the scenario file's pin."""
    from .scenario import answering_vllm, find_scenario, read_scenario_file

    pinned = None
    if args.vllm is None and getattr(args, "cmd", None) is None and hasattr(args, "scenario"):
        pinned = read_scenario_file(find_scenario(args.scenario)).get("vllm")
    return answering_vllm(args.vllm, pinned)[0]


def _reexec_if_needed(args, argv: list[str]) -> None:
    """Hand over to the project's environment for another vLLM version (scripts/venv.sh makes them). The
    arguments go over unchanged, so the other side finds the same reason (--vllm or the scenario's pin)."""
    if args.vllm and "," in args.vllm:
        return  # several releases: compare asks each in its own environment
    wanted = _wanted_version(args)
    if not wanted or wanted == compat.installed():
        return
    py = compat.venv_python(wanted)
    os.execv(str(py), [str(py), "-m", "diaglib", *argv])


def log_path() -> Path:
    """diaglib's log: library output of the commands run without -v, and tracebacks of internal errors."""
    return cache.root() / "diaglib.log"


class _Quiet:
    """While a command computes, stdout and stderr (Python's objects and the file descriptors, so C-level
    writes too) go to the log, or with ``verbose`` both to stderr; :meth:`echo`, progress bars and the answer
    printed afterwards reach the user's own streams."""

    current: "_Quiet | None" = None

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.saved: list[tuple[int, int]] = []

    def __enter__(self) -> "_Quiet":
        self.out, self.err = sys.stdout, sys.stderr
        for stream in (self.out, self.err):
            with contextlib.suppress(Exception):
                stream.flush()
        if self.verbose:
            self.sink = self.err
        else:
            path = log_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.stat().st_size > LOG_MAX_BYTES:
                path.replace(path.with_suffix(".log.1"))
            self.sink = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
            self.sink.write(f"--- diaglib {' '.join(sys.argv[1:])} (pid {os.getpid()})\n")
        self.user_out, self.user_err = self._keep(self.out, 1), self._keep(self.err, 2)
        sink_fd = self._fd(self.sink)
        for stream, fd in ((self.out, 1), (self.err, 2)):
            if sink_fd is not None and self._fd(stream) == fd and sink_fd != fd:
                self.saved.append((fd, os.dup(fd)))
                os.dup2(sink_fd, fd)
        sys.stdout, sys.stderr = self.sink, self.sink
        progress.use_stream(self.user_err)
        _Quiet.current = self
        return self

    def __exit__(self, *exc) -> None:
        _Quiet.current = None
        progress.use_stream(None)
        with contextlib.suppress(Exception):
            self.sink.flush()
        sys.stdout, sys.stderr = self.out, self.err
        for fd, copy in reversed(self.saved):
            os.dup2(copy, fd)
            os.close(copy)
        for stream in {self.user_out, self.user_err} - {self.out, self.err}:
            stream.close()
        if self.sink is not self.err:
            self.sink.close()

    @staticmethod
    def _fd(stream) -> int | None:
        try:
            return stream.fileno()
        except (AttributeError, OSError, ValueError):
            return None

    def _keep(self, stream, fd: int):
        """A writer that still reaches ``stream``'s destination after fd ``fd`` is redirected."""
        if self._fd(stream) != fd:
            return stream  # not backed by the descriptor (a test's capture): untouched by the redirection
        return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                         errors="replace")

    def log(self, text: str) -> None:
        print(text, file=self.sink, flush=True)


def _bytecode_cache() -> None:
    """This process keeps the bytecode of what it imports where diaglib.cache.bytecode_prefix says."""
    prefix = cache.bytecode_prefix()
    if prefix and sys.dont_write_bytecode and sys.pycache_prefix is None:
        sys.pycache_prefix = prefix
        sys.dont_write_bytecode = False


def _skip_iri_grammars() -> None:
    """jsonschema checks the "iri" string format only when the optional ``rfc3987_syntax`` is installed (Jupyter
    brings it), which compiles about 30 Earley grammars at import: 1.5-2.5 s of every cold answer, reached through
    vLLM's gguf and mistral_common imports. Nothing diaglib asks vLLM validates an IRI, so this process goes without."""
    sys.modules.setdefault("rfc3987_syntax", None)


def _internal_error(exc: BaseException, q: _Quiet) -> str:
    """One line naming an unexpected exception and where it was raised (the traceback is in the log)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}diaglib{os.sep}" in f.filename]
    at = ""
    if frames:
        last = frames[-1]
        at = f" (in {Path(last.filename).name}:{last.lineno}, {last.name}"
        if ours and ours[-1] is not last:
            at += f", called from diaglib's {Path(ours[-1].filename).name}:{ours[-1].lineno}"
        at += ")"
    text = " ".join(str(exc).split())[:300]
    where = "above" if q.verbose else f"in {log_path()}; -v shows it"
    return f"diaglib: internal error: {type(exc).__name__}: {text}{at}; the traceback is {where}"


def _run(args) -> int:
    """Run the subcommand, serving or keeping its answer when it is cacheable (--no-cache: afresh, also for
    what the library keeps on the way, in this process and the ones it starts)."""
    args._answers = []
    if args.no_cache:
        before = os.environ.get("DIAGLIB_NO_CACHE")
        os.environ["DIAGLIB_NO_CACHE"] = "1"
        try:
            return _run_cached(args, serve=False)
        finally:
            os.environ.pop("DIAGLIB_NO_CACHE") if before is None else os.environ.update(DIAGLIB_NO_CACHE=before)
    return _run_cached(args, serve=True)


def _run_cached(args, serve: bool) -> int:
    k = None
    if getattr(args.func, "cacheable", False):
        parts = cache.question(args)
        k = cache.key(args.command, parts) if parts is not None else None
        hit = cache.get(k) if k and serve else None
        if hit is not None:
            args._answers.append((hit["json"], hit["text"]))
            return 0
    with _collector_paused(getattr(args.func, "cacheable", False)):
        rc = args.func(args) or 0
    if k and rc == 0 and len(args._answers) == 1:
        data, text = args._answers[0]
        cache.put(k, {"json": data, "text": text},
                  {"namespace": f"cli {args.command}", "parts": parts, "environment": cache.environment()})
    return rc


@contextlib.contextmanager
def _collector_paused(pause: bool):
    """Python's cyclic collector off while a one-answer command runs: importing vLLM (torch, transformers, and
    grammars some of their dependencies compile at import) grows the heap by millions of objects, and each full
    collection on the way walks all of them; what such a command leaves is freed when its process ends."""
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def one_line(text: str) -> str:
    """A message as one line: its lines joined, pydantic's type tags and help-URL lines dropped."""
    lines = [x.strip() for x in str(text).splitlines()]
    lines = [re.sub(r"\s*\[type=[^\]]*\]", "", x) for x in lines if x and not x.startswith("For further information")]
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _bytecode_cache()
        _skip_iri_grammars()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args._argv = argv
    if args.vllm and "," in args.vllm and args.command in ("show", "compare"):
        args.func, args.tokens, args.all = cmd_compare, getattr(args, "tokens", None), getattr(args, "all", False)
    message = None
    try:
        _reexec_if_needed(args, argv)
        with _Quiet(args.verbose) as q:
            try:
                rc = _run(args)
            except DiagError as e:
                message, rc = f"diaglib: error: {e}", e.exit_code
            except Exception as e:  # vLLM's own checks, and the last resort: never a raw traceback
                q.log("".join(traceback.format_exception(type(e), e, e.__traceback__)))
                refusal = vllm_refusal(e)
                message, rc = (f"diaglib: error: {refusal}", 2) if refusal else (_internal_error(e, q), 1)
    except DiagError as e:
        message, rc = f"diaglib: error: {e}", e.exit_code
    except KeyboardInterrupt:
        message, rc = "diaglib: interrupted", 130
    if message:
        print(one_line(message), file=sys.stderr)
        return rc
    for data, text in args._answers:
        print(json.dumps(data, indent=2) if args.json else text)
    return rc
