"""diaglib.cache: what the key is made of (each part really changed, in a fresh process), hits without vLLM,
fresh answers when a part changes, never an error kept, --no-cache, `diaglib cache --info / --clear`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diaglib import cache, compat
from diaglib.cli import main
from diaglib.paths import DATA, ROOT

TINY = DATA / "models" / "tiny-glm-fp8"
KEY_OF = """
import sys
from diaglib import cache
from diaglib.cli import build_parser
args = build_parser().parse_args(sys.argv[1:])
print(cache.key(args.command, cache.question(args)))
"""


def key_in_fresh_process(*argv: str, root: Path = ROOT, env: dict | None = None, pythonpath: str | None = None) -> str:
    """The cache key of a CLI question, computed by a new interpreter (nothing memoised from this one)."""
    e = {**os.environ, **(env or {})}
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, str(root)]))
    r = subprocess.run([sys.executable, "-c", KEY_OF, *argv], capture_output=True, text=True, cwd=root, env=e,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture
def model(tmp_path):
    """A model folder of our own (a copy of the tiny GLM's JSON files) and a scenario file naming it."""
    d = tmp_path / "model"
    d.mkdir()
    for f in TINY.glob("*.json"):
        shutil.copy(f, d / f.name)
    spec = tmp_path / "s.toml"
    spec.write_text(f'command = "vllm serve my/model --max-num-batched-tokens 8192"\n'
                    f'[gpu]\nname = "NVIDIA H200"\ncount = 1\n[models]\n"my/model" = "{d}"\n')
    return d, spec


# --- every part of the key, really changed -------------------------------------------------------------

def test_key_changes_with_each_part_of_the_question(model):
    d, spec = model
    base = ["dispatch", str(spec), "--tokens", "8"]
    k0 = key_in_fresh_process(*base)
    assert key_in_fresh_process(*base) == k0, "the key is stable"
    assert key_in_fresh_process(*base, "--json", "-v", "--no-cache") == k0, "how the answer is shown is no part"
    changed = {
        "question": ["dispatch", str(spec), "--tokens", "9"],
        "subcommand": ["trace", str(spec), "--prompt", "8"],
        "GPU": [*base, "--gpu", "NVIDIA H100 80GB HBM3"],
        "GPU count": [*base, "--gpu-count", "2"],
        "command": ["dispatch", "--cmd", f"vllm serve {d} --max-num-batched-tokens 4096", "--tokens", "8"],
        "vLLM asked for": ["--vllm", "0.10.1.1", *base],
    }
    keys = {part: key_in_fresh_process(*argv) for part, argv in changed.items()}
    assert k0 not in keys.values() and len(set(keys.values())) == len(keys), keys


def test_key_changes_with_the_model_folder_and_the_scenario_file(model):
    d, spec = model
    argv = ["show", str(spec)]
    k0 = key_in_fresh_process(*argv)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    k1 = key_in_fresh_process(*argv)
    (d / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "FP8"}}')  # vLLM reads it too
    k2 = key_in_fresh_process(*argv)
    spec.write_text(spec.read_text().replace('count = 1', 'count = 2'))
    k3 = key_in_fresh_process(*argv)
    assert len({k0, k1, k2, k3}) == 4


def test_key_changes_with_vllms_build_and_settings(tmp_path, model):
    _, spec = model
    argv = ["show", str(spec)]
    k0 = key_in_fresh_process(*argv)
    assert key_in_fresh_process(*argv, env={"VLLM_ATTENTION_BACKEND": "TRITON_ATTN"}) != k0
    assert key_in_fresh_process(*argv, env={"VLLM_LOGGING_LEVEL": "DEBUG"}) == k0, "logging is no part"
    # another build of the same vLLM version: its dist-info (found first on sys.path) has another RECORD
    import importlib.metadata as md

    dist = md.distribution("vllm")
    fake = tmp_path / "site" / f"vllm-{dist.version}.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text(dist.read_text("METADATA"))
    (fake / "RECORD").write_text(dist.read_text("RECORD") + "vllm/rebuilt.so,sha256=x,1\n")
    assert key_in_fresh_process(*argv, pythonpath=str(tmp_path / "site")) != k0


def test_key_changes_with_diaglibs_own_source(tmp_path):
    """An edited checkout never serves an answer of the code before it."""
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT / "diaglib", copy / "diaglib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(DATA, copy / "data", ignore=shutil.ignore_patterns("live"))
    argv = ["show"]
    k0 = key_in_fresh_process(*argv, root=copy)
    with open(copy / "diaglib" / "predict" / "summarize.py", "a") as f:
        f.write("\n# an edit\n")
    assert key_in_fresh_process(*argv, root=copy) != k0
    catalog = json.loads((copy / "data" / "gpus.json").read_text())
    catalog["NVIDIA H20"]["memory_mib"] -= 1
    k1 = key_in_fresh_process(*argv, root=copy)
    (copy / "data" / "gpus.json").write_text(json.dumps(catalog))
    assert key_in_fresh_process(*argv, root=copy) != k1


def test_no_key_without_a_readable_scenario(tmp_path):
    from diaglib.cli import build_parser

    bad = tmp_path / "bad.toml"
    bad.write_text("command = [")
    for argv in (["show", str(bad)], ["show", "no-such-scenario"], ["show", "--cmd", "vllm serve 'unbalanced"]):
        assert cache.question(build_parser().parse_args(argv)) is None


# --- served, refreshed, never an error -----------------------------------------------------------------

@pytest.fixture
def answers(tmp_path, monkeypatch):
    """A cache folder of this test's own; counts how often the command really computes."""
    monkeypatch.setenv("DIAGLIB_CACHE_DIR", str(tmp_path / "cache"))
    from diaglib import cli

    calls = []
    real = cli.cmd_dispatch

    def counting(args):
        calls.append(args.tokens)
        return real(args)

    counting.cacheable = True
    monkeypatch.setattr(cli, "cmd_dispatch", counting)
    return calls


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_repeated_question_is_served_and_a_changed_one_computed(answers, capsys, model):
    d, spec = model
    rc, first, _ = _run(capsys, "dispatch", str(spec), "--tokens", "8", "513", "--json")
    assert rc == 0 and len(answers) == 1
    rc, again, _ = _run(capsys, "dispatch", str(spec), "--tokens", "8", "513", "--json")
    assert rc == 0 and again == first and len(answers) == 1, "served from the cache"
    rc, text, _ = _run(capsys, "dispatch", str(spec), "--tokens", "8", "513")
    assert rc == 0 and len(answers) == 1 and "padded_tokens" in text, "the text form is kept too"
    rc, fresh, _ = _run(capsys, "dispatch", str(spec), "--tokens", "8", "513", "--json", "--no-cache")
    assert rc == 0 and fresh == first and len(answers) == 2, "--no-cache computes"
    cfg = json.loads((d / "config.json").read_text())
    spec.write_text(spec.read_text().replace("--max-num-batched-tokens 8192", "--max-num-batched-tokens 512"))
    rc, changed, _ = _run(capsys, "dispatch", str(spec), "--tokens", "8", "513", "--json")
    assert len(answers) == 3 and rc == 2 or json.loads(changed) != json.loads(first), "a new budget: a new answer"
    assert cfg  # the model folder itself is covered by test_key_changes_with_the_model_folder_and_the_scenario_file


def test_errors_are_never_kept(answers, capsys, model):
    _, spec = model
    for _ in range(2):
        rc, out, err = _run(capsys, "dispatch", str(spec), "--tokens", "100000")
        assert rc == 2 and out == "" and "cannot happen" in err
    assert len(answers) == 2
    assert cache.info()["entries"] == 0


def test_a_corrupt_entry_is_a_miss(answers, capsys, model):
    _, spec = model
    _run(capsys, "dispatch", str(spec), "--tokens", "8")
    for f in cache.answers_dir().rglob("*.json"):
        f.write_text("{not json")
    rc, out, _ = _run(capsys, "dispatch", str(spec), "--tokens", "8")
    assert rc == 0 and "8" in out and len(answers) == 2


def test_cache_info_and_clear(answers, capsys, model):
    _, spec = model
    _run(capsys, "dispatch", str(spec), "--tokens", "8")
    rc, out, _ = _run(capsys, "cache", "--info", "--json")
    info = json.loads(out)
    assert rc == 0 and info["entries"] >= 1 and info["path"] == str(cache.answers_dir())
    assert info["by_namespace"].get("cli dispatch") == 1
    rc, out, _ = _run(capsys, "cache", "--clear")
    assert rc == 0 and "removed" in out
    assert cache.info()["entries"] == 0


def test_the_cache_lives_where_the_platform_says(monkeypatch, tmp_path):
    monkeypatch.delenv("DIAGLIB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.root() == tmp_path / "xdg" / "diaglib"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.root() == Path.home() / ".cache" / "diaglib"
    monkeypatch.setenv("DIAGLIB_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.root() == tmp_path / "mine"


def test_memo_keeps_json_and_refreshes_under_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DIAGLIB_CACHE_DIR", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"range": (1, 2)}

    assert cache.memo("t", {"a": 1}, compute) == {"range": [1, 2]}, "a miss returns what a hit will"
    assert cache.memo("t", {"a": 1}, compute) == {"range": [1, 2]} and len(calls) == 1
    assert cache.memo("t", {"a": 2}, compute) and len(calls) == 2
    monkeypatch.setenv("DIAGLIB_NO_CACHE", "1")
    cache.memo("t", {"a": 1}, compute)
    assert len(calls) == 3


def test_memo_keeps_a_pickled_value_as_computed(monkeypatch, tmp_path):
    import pandas as pd

    monkeypatch.setenv("DIAGLIB_CACHE_DIR", str(tmp_path))
    df = pd.DataFrame({"grid": [(1, 2, 3), None], "tokens": [8192, None]})
    calls = []

    def compute():
        calls.append(1)
        return df

    for _ in range(2):
        pd.testing.assert_frame_equal(cache.memo("t", {"a": 1}, compute, pickled=True), df)
    assert len(calls) == 1
    assert cache.memo("t", {"a": 1}, lambda: {"not": "pickled"}) == {"not": "pickled"}, "JSON and pickle keys differ"
    pickled = [e for e in (tmp_path / "answers").rglob("*.json") if '"codec": "pickle"' in e.read_text()]
    assert len(pickled) == 1
    pickled[0].write_text(pickled[0].read_text().replace('"value": "', '"value": "x'))  # no longer unpickles
    cache.memo("t", {"a": 1}, compute, pickled=True)
    assert len(calls) == 2, "an entry that does not unpickle is a miss"


def test_a_command_by_content_is_the_same_wherever_its_model_lies(tmp_path):
    a, b = tmp_path / "a" / "m", tmp_path / "b" / "m"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    ka, kb = (cache.command_content(f"vllm serve {d} -tp 2") for d in (a, b))
    assert ka == kb and str(a) not in str(ka)
    assert ka != cache.command_content(f"vllm serve {a} -tp 4")
    (b / "hf_quant_config.json").write_text("{}")
    assert cache.command_content(f"vllm serve {b} -tp 2") != ka, "a file beside config.json is part of it"


# --- a hit is quick and imports no vLLM ----------------------------------------------------------------

def test_a_kept_answer_is_served_without_importing_vllm(tmp_path):
    env = {**os.environ, "DIAGLIB_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    probe = ("import sys, json; from diaglib.cli import main; rc = main(sys.argv[1:]); "
             "print(json.dumps({'rc': rc, 'vllm': sorted(m for m in sys.modules if m.split('.')[0] in "
             "('vllm', 'torch', 'pandas'))}), file=sys.stderr)")
    argv = ["dispatch", "--cmd", f"vllm serve {TINY} --max-num-batched-tokens 8192", "--gpu", "NVIDIA H200",
            "--gpu-count", "1", "--tokens", "8", "--json"]
    runs = [subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=600) for _ in range(2)]
    cold, warm = (json.loads(r.stderr.strip().splitlines()[-1]) for r in runs)
    assert cold["rc"] == warm["rc"] == 0 and runs[0].stdout == runs[1].stdout
    assert "vllm" in cold["vllm"] and warm["vllm"] == [], "the second answer came without vLLM, torch or pandas"
    assert json.loads(runs[1].stdout)[0]["vllm_version"] == compat.installed()
