"""Whatever a user types, every command answers or says in one line what is wrong (exit 2): never a traceback,
never diaglib's internal-error line. Property-based (hypothesis): serve commands with flags and values vLLM
accepts and refuses, GPU names and counts, token counts, scenario files (well-formed or not), model folders
(config.json valid, malformed, nonsensical) and output paths, for every command.

Run in-process through diaglib.cli.main; each distinct serve command is resolved by vLLM once per session (a
cache in front of diaglib.scenario.from_command), so an example costs little. DIAGLIB_FUZZ_EXAMPLES scales the
number of examples (default 40 per test), DIAGLIB_FUZZ_RANDOM=1 draws new ones instead of CI's fixed set.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diaglib import compat  # noqa: E402
from diaglib.errors import DiagError  # noqa: E402
from diaglib.paths import DATA  # noqa: E402

EXAMPLES = int(os.environ.get("DIAGLIB_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("DIAGLIB_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large], database=None)
TINY = DATA / "models" / "tiny-glm-fp8"


# --- the harness ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model folders of every kind, a cache folder, and vLLM's resolutions kept for the module."""
    from diaglib import scenario

    tmp = tmp_path_factory.mktemp("fuzz")
    folders = {}
    cfg = json.loads((TINY / "config.json").read_text())
    variants = {"ok": cfg, "malformed": "{not json", "empty": {}, "no-heads": {**cfg, "num_attention_heads": 0},
                "odd-heads": {**cfg, "num_attention_heads": 3, "num_key_value_heads": 3},
                "negative": {**cfg, "hidden_size": -64}, "unknown-arch": {**cfg, "architectures": ["NoSuchForCausalLM"]},
                "wrong-type": {**cfg, "hidden_size": "big"}, "array": [1, 2, 3], "binary": bytes(range(128, 256)),
                "no-config": None}
    for name, content in variants.items():
        d = tmp / "models" / name
        d.mkdir(parents=True)
        if content is not None:
            if isinstance(content, bytes):
                (d / "config.json").write_bytes(content)
            else:
                (d / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    folders.update({name: tmp / "models" / name for name in variants})
    afile = tmp / "a-file"
    afile.write_text("x")
    real = scenario.from_command
    kept: dict = {}

    def resolved(command, *, gpu, models=None, name="command line", source=None):
        key = (command, gpu, tuple(sorted((models or {}).items())), name, str(source))
        if key not in kept:
            try:
                kept[key] = real(command, gpu=gpu, models=models, name=name, source=source)
            except DiagError as e:
                kept[key] = e
        hit = kept[key]
        if isinstance(hit, DiagError):
            raise DiagError(str(hit))
        return hit

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scenario, "from_command", resolved)
        mp.setenv("DIAGLIB_CACHE_DIR", str(tmp / "cache"))
        mp.setenv("DIAGLIB_PROGRESS", "0")
        mp.setattr(os, "execv", _no_exec)
        yield {"tmp": tmp, "models": folders, "file": afile}


def _no_exec(*_a):
    raise AssertionError("the fuzz asked for another vLLM's environment: keep --vllm to this one")


def check(argv: list[str]) -> tuple[int, str]:
    """Run ``diaglib ARGV``; an answer (exit 0, something on stdout, JSON with --json) or exactly one line
    `diaglib: error: ...` and exit 2. Never a traceback or an internal error."""
    from diaglib.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own exit (our one-line error, or --help)
            rc = e.code
    o, e = out.getvalue(), err.getvalue()
    shown = shlex.join(argv)
    assert "Traceback" not in o + e, f"diaglib {shown}\n{e}"
    assert "internal error" not in e, f"diaglib {shown}\n{e}"
    lines = [x for x in e.splitlines() if x.strip()]
    if rc == 0:
        assert o.strip() and not lines, f"diaglib {shown}: exit 0 with stderr {e!r}"
        if "--json" in argv:
            json.loads(o)
    else:
        assert rc == 2, f"diaglib {shown}: exit {rc}\n{e}"
        assert len(lines) == 1 and lines[0].startswith("diaglib: error: "), f"diaglib {shown}:\n{e}"
        assert o == ""
    return rc, o if rc == 0 else lines[0]


# --- what a user may type ---------------------------------------------------------------------------------------

NUMBER = st.one_of(st.sampled_from([0, 1, 2, 3, 8, 16, -1, 512, 8191, 8192, 8193, 65536, 2**31, 10**15]),
                   st.integers(-4, 40)).map(str)
JUNK = st.sampled_from(["x", "", "1.5", "1e3", "-", "--", "'", '"', "0x10", "ünï", "8192 8193", "None"])
VALUE = st.one_of(NUMBER, JUNK)
INT_FLAGS = ["-tp", "--tensor-parallel-size", "-pp", "--max-num-batched-tokens", "--max-num-seqs", "--max-model-len",
             "--block-size", "--data-parallel-size", "--max-num-partial-prefills"]
CHOICE_FLAGS = {"--kv-cache-dtype": ["auto", "fp8", "bogus"], "--dtype": ["auto", "bfloat16", "float16", "bogus"],
                "--quantization": ["fp8", "bogus"], "--gpu-memory-utilization": ["0", "0.5", "0.92", "1.5", "-1"],
                "--compilation-config": ['{"cudagraph_mode": "NONE"}', "{bad json", '{"mode": 7}']}
SWITCHES = ["--enable-chunked-prefill", "--no-enable-chunked-prefill", "--enforce-eager", "--async-scheduling",
            "--no-async-scheduling", "--enable-prefix-caching", "--max-num-batched-tokenz", "--tp", "--"]


@st.composite
def serve_flags(draw) -> list[str]:
    flags = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["int", "choice", "switch"]))
        if kind == "int":
            flags += [draw(st.sampled_from(INT_FLAGS)), draw(VALUE)]
        elif kind == "choice":
            name = draw(st.sampled_from(sorted(CHOICE_FLAGS)))
            flags += [name, draw(st.sampled_from(CHOICE_FLAGS[name]))]
        else:
            flags.append(draw(st.sampled_from(SWITCHES)))
    return flags


@st.composite
def serve_command(draw, world) -> str:
    model = draw(st.sampled_from(["zai-org/GLM-4.6-FP8", str(TINY), "no/such-model", "",
                                  *(str(p) for p in world["models"].values())]))
    words = ["vllm", "serve", model, *draw(serve_flags())]
    text = shlex.join(words) if draw(st.booleans()) else " ".join(words)  # unquoted: broken quotes too
    return draw(st.sampled_from([text, text, text.removeprefix("vllm "), "vllm " + text[5:].replace("serve", "srv")]))


GPUS = st.sampled_from(["NVIDIA H200", "NVIDIA H20", "h100 80gb hbm3", "NVIDIA Z100", "", "A100"])


@st.composite
def target(draw, world) -> list[str]:
    """Where the scenario comes from: a name, a scenario file, or --cmd; a GPU and a count sometimes."""
    kind = draw(st.sampled_from(["name", "file", "cmd", "cmd"]))
    if kind == "name":
        args = [draw(st.sampled_from(["default", "rehearsal", "no-such-scenario"]))]
        if args[0] == "rehearsal":  # it pins the reference vLLM: answered here all the same
            args += ["--vllm", compat.installed()]
    elif kind == "file":
        args = [str(draw(scenario_file(world)))]
    else:
        args = ["--cmd", draw(serve_command(world))]
    if draw(st.booleans()):
        args += ["--gpu", draw(GPUS)]
    if draw(st.booleans()):
        args += ["--gpu-count", draw(VALUE)]
    return args


@st.composite
def scenario_file(draw, world) -> Path:
    """A scenario file as a user may write it: right, wrong types, missing parts, or not TOML at all."""
    lines = []
    if draw(st.integers(0, 9)):
        command = draw(st.one_of(serve_command(world), st.just("vllm serve my/model")))
        lines.append(draw(st.sampled_from([f"command = {json.dumps(command)}", "command = 7", "command = [1"])))
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(['name = "x"', "name = 3"])))
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from([f'vllm = "{compat.installed()}"', 'vllm = "0.0.1"', "vllm = 5"])))
    if draw(st.booleans()):
        lines += ["[gpu]", f"name = {json.dumps(draw(GPUS))}",
                  draw(st.sampled_from(["count = 1", "count = 8", "count = 0", "count = -2", 'count = "x"', ""])),
                  draw(st.sampled_from(["", "memory_mib = 1", "memory_mib = 0", "memory_mib = 10000000"]))]
    if draw(st.booleans()):
        target_dir = draw(st.sampled_from([*(str(p) for p in world["models"].values()), "/no/such/folder"]))
        lines += ["[models]", f'"my/model" = {json.dumps(target_dir)}']
    path = world["tmp"] / f"s{draw(st.integers(0, 10**9))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


TOKENS = st.lists(VALUE, min_size=1, max_size=3)


@st.composite
def question(draw, world) -> list[str]:
    """One command line for any subcommand."""
    sub = draw(st.sampled_from(["show", "dispatch", "trace", "moe", "boundaries", "memory", "sweep", "switches",
                                "report", "cache"]))
    if sub == "cache":
        return ["cache", *draw(st.sampled_from([[], ["--info"], ["--json"]]))]
    args = [sub, *draw(target(world))]
    if sub == "dispatch":
        args += ["--tokens", *draw(TOKENS)] + (["--decode"] if draw(st.booleans()) else [])
    elif sub == "trace":
        for t in draw(TOKENS):
            args += ["--prompt", t]
        args += draw(st.sampled_from([[], ["--decoders", "2"], ["--decoders", "-1"], ["--output-len", "0"],
                                      ["--output-len", "2"], ["--kv-memory-gib", "20"], ["--kv-memory-gib", "0"],
                                      ["--kv-memory-gib", "nan"], ["--kv-memory-gib", "1e12"]]))
    elif sub == "moe" and draw(st.booleans()):
        args += ["--tokens", draw(VALUE)]
    elif sub == "boundaries" and draw(st.booleans()):
        args += ["--around", *draw(TOKENS)]
    elif sub == "sweep":
        args += ["--lengths", draw(st.sampled_from(["8190:8193", "5", "1:3:1", "9:1", "a:b", "1:4:0", "", "0,1"]))]
        if draw(st.booleans()):
            args += ["--knob", draw(st.sampled_from(["max_num_batched_tokens=8191,8192", "enforce_eager=on,maybe",
                                                     "warp=9", "max_num_seqs=", "chunked_prefill=off"]))]
        if draw(st.booleans()):
            args += ["-o", draw(st.sampled_from([str(world["file"]) + "/x.csv", "/proc/no/x.parquet", "x.txt"]))]
    elif sub == "report":  # only what fails before any kernel starts
        args += ["-o", draw(st.sampled_from(["/proc/no/such/folder", str(world["file"]), "/dev/null/x"]))]
    if sub != "sweep" and draw(st.booleans()):
        args.append("--json")
    return args


# --- the properties ---------------------------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_any_command_line_gets_an_answer_or_one_clear_line(world, data):
    check(data.draw(question(world)))


@FUZZ
@given(data=st.data())
def test_any_serve_command_is_resolved_or_refused_in_one_line(world, data):
    rc, said = check(["show", "--cmd", data.draw(serve_command(world)), "--gpu", "NVIDIA H200", "--json"])
    if rc == 0:
        shown = json.loads(said)
        assert shown["vllm_version"] == compat.installed() and shown["gpu"]["name"] == "NVIDIA H200"


@FUZZ
@given(data=st.data())
def test_any_scenario_file_is_read_or_refused_in_one_line(world, data):
    check(["dispatch", str(data.draw(scenario_file(world))), "--tokens", "8", "--json"])


@FUZZ
@given(tokens=TOKENS, decode=st.booleans())
def test_any_token_count_is_dispatched_or_refused(world, tokens, decode):
    rc, said = check(["dispatch", "--cmd", f"vllm serve {TINY} --max-num-batched-tokens 8192", "--gpu", "NVIDIA H200",
                      "--gpu-count", "1", "--tokens", *tokens, "--json", *(["--decode"] if decode else [])])
    if rc == 0:
        rows = json.loads(said)
        assert [r["num_tokens"] for r in rows] == [int(t) for t in tokens]
        assert all(r["padded_tokens"] >= r["num_tokens"] for r in rows)


# --- the inputs found by hand (issue 16) --------------------------------------------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["show", "--cmd", "vllm serve zai-org/GLM-4.6-FP8 -tp 0"], "--tensor-parallel-size must be at least 1, got 0"),
    (["memory", "--cmd", "vllm serve zai-org/GLM-4.6-FP8 -tp 3", "--gpu-count", "3"], "is not divisible by 3"),
    (["show", "--gpu-count", "0"], "argument --gpu-count: must be at least 1, got 0"),
    (["report", "-o", "/proc/no/such/folder"], "cannot write the report into /proc/no/such/folder"),
    (["trace", "--prompt", "10", "--kv-memory-gib", "nan"], "argument --kv-memory-gib: must be a number above 0"),
])
def test_the_inputs_that_gave_tracebacks_now_say_why(world, argv, says):
    rc, line = check(argv)
    assert rc == 2 and says in line, line


def test_the_guard_names_an_unexpected_error(world, monkeypatch):
    """The last resort: exit 1 and one line naming the exception and the log (the fuzz above would flag it)."""
    from diaglib import cli

    monkeypatch.setattr(cli, "cmd_cache", lambda args: 1 / 0)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(["cache"]) == 1
    assert err.getvalue().startswith("diaglib: internal error: ZeroDivisionError: division by zero (in test_fuzz.py:")
    assert "Traceback" not in err.getvalue() and out.getvalue() == ""

