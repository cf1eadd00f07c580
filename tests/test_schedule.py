"""diaglib.predict.schedule drives vLLM's own V1 scheduler (the class the config picks): the behaviour issue 3 names."""
from __future__ import annotations

import pandas as pd
import pytest

from diaglib import compat
from diaglib.errors import DiagError
from diaglib.predict.schedule import Engine, parse_knob, parse_lengths, sweep, trace
from diaglib.predict.workload import (
    Req,
    Workload,
    prompts,
    single,
    summing_to,
    with_decoders,
)

pytestmark = pytest.mark.contract


@pytest.fixture(scope="session")
def budget(scenario):
    b = scenario.vllm_config.scheduler_config.max_num_batched_tokens
    assert b == 8192  # the seed command's --max-num-batched-tokens
    return b


def _tokens(tr):
    return list(tr.per_step[tr.per_step.forward].total_tokens)


def test_scheduler_class_is_the_configs(scenario):
    eng = Engine(scenario, 20 << 30)
    assert type(eng.scheduler).__name__ == compat.scheduler_summary(scenario.vllm_config)["scheduler_cls"].rsplit(".", 1)[-1]


def test_prompt_at_budget_is_one_step_then_decodes(scenario, budget):
    tr = trace(scenario, single(8192, output_len=4))
    assert _tokens(tr) == [budget, 1, 1, 1]
    assert tr.schedule() == ["a:8192L", "a:1D", "a:1D", "a:1D"]
    assert tr.per_step.at_budget.tolist()[0]


def test_one_over_budget_gives_a_one_token_chunk(scenario, budget):
    tr = trace(scenario, single(8193, output_len=2))
    assert _tokens(tr)[:2] == [budget, 1]
    assert tr.schedule()[:2] == ["a:8192P", "a:1L"]


def test_long_prompt_is_chunked_at_the_budget(scenario, budget):
    tr = trace(scenario, single(20000, output_len=2))
    assert _tokens(tr)[:3] == [budget, budget, 20000 - 2 * budget] == [8192, 8192, 3616]


def test_three_prompts_together(scenario):
    tr = trace(scenario, prompts(8192, 8193, 20000, output_len=3))
    assert tr.schedule()[:5] == ["a:8192L", "a:1D b:8191P", "a:1D b:2L c:8189P", "b:1D c:8191P", "b:1D c:3620L"]


def test_async_engine_keeps_two_steps_in_flight(scenario):
    """Async scheduling: step k+1 is scheduled before step k's output is processed (batch queue 2)."""
    flag = "--no-async-scheduling" if compat.scheduler_summary(scenario.vllm_config)["async_scheduling"] \
        else "--async-scheduling"
    w = prompts(8192, 8193, 20000, output_len=3)
    runs = {}
    for sc in (scenario, scenario.derive(flag)):
        eng = Engine(sc, 20 << 30)
        steps, _ = eng.run(w)
        runs[eng.queue_size] = [r["schedule"] for r in steps]
        assert eng.queue_size == (2 if compat.scheduler_summary(sc.vllm_config)["async_scheduling"] else 1)
    assert set(runs) == {1, 2}
    assert runs[1][:3] == runs[2][:3] == ["a:8192L", "a:1D b:8191P", "a:1D b:2L c:8189P"]
    assert runs[1][-1] == runs[2][-1] == ""  # the last step only tells the workers which requests finished


def test_per_request_rows_add_up(scenario):
    w = prompts(8192, 8193, 20000, output_len=3)
    tr = trace(scenario, w)
    pr = tr.per_request
    for r in w:
        rows = pr[pr.req_id == r.req_id]
        assert rows.tokens.sum() == r.prompt_len + r.output_len - 1  # the last sampled token is never fed back
        assert (rows.computed_before.diff().dropna() == rows.tokens.iloc[:-1].values).all()
        assert list(rows.phase).count("last-prefill-chunk") == 1
        assert (rows.phase == "decode").sum() == r.output_len - 1
    steps = pr.groupby("step").tokens.sum()
    fwd = tr.per_step[tr.per_step.forward].set_index("step").total_tokens
    pd.testing.assert_series_equal(steps, fwd, check_names=False)


def test_steps_are_dispatched_by_vllm(scenario):
    w = Workload(tuple(Req(f"x{i}", L, 1, 10 * i) for i, L in enumerate((513, 8191, 8192, 7))))
    tr = trace(scenario, w)  # each prompt alone in its step
    ps = tr.per_step.set_index("total_tokens")
    for n in (513, 8191, 8192):
        assert ps.loc[n, "cudagraph_mode"] == "NONE" and ps.loc[n, "padded_tokens"] == n
    assert ps.loc[7, "padded_tokens"] == 8 and ps.loc[7, "cudagraph_mode"] != "NONE"


def test_decoders_share_the_budget(scenario, budget):
    tr = trace(scenario, with_decoders(8192, 3, output_len=2))
    s = tr.per_step[tr.per_step.forward]
    assert s.total_tokens.iloc[1] == budget and s.num_decode.iloc[1] == 3
    assert tr.schedule()[1].endswith(f"prompt:{budget - 3}P")
    assert s.total_tokens.max() <= budget


def test_summing_to_the_budget_is_one_step(scenario, budget):
    tr = trace(scenario, summing_to(budget, 1001))
    assert _tokens(tr) == [budget]
    assert tr.per_step.num_reqs.iloc[0] == 9


def test_kv_memory_default_is_flagged_as_a_guess(scenario):
    tr = trace(scenario, single(100))
    assert tr.kv["guessed"] and "GUESS" in tr.notes[0]
    given = trace(scenario, single(100), kv_memory_bytes=20 << 30)
    assert not given.kv["guessed"] and "given" in given.notes[0]
    cfg = scenario.vllm_config
    per_block = compat.kv_cache_spec(cfg).page_size_bytes * cfg.model_config.get_num_layers(cfg.parallel_config)
    assert given.kv["num_blocks"] * per_block <= 20 << 30 < (given.kv["num_blocks"] + 1) * per_block


def test_kv_capacity_comes_from_vllms_sizing(scenario):
    small = scenario.derive("--max-model-len", "4096")
    spec = compat.kv_cache_spec(small.vllm_config)
    layers = small.vllm_config.model_config.get_num_layers(small.vllm_config.parallel_config)
    mem = 300 * spec.page_size_bytes * layers  # room for 300 blocks of 16 tokens
    tr = trace(small, prompts(2000, 2000, 2000, output_len=2), kv_memory_bytes=mem)
    assert tr.kv["num_blocks"] == 300
    assert tr.per_step.waiting.max() >= 1  # the third prompt waits for blocks
    assert tr.per_request.groupby("req_id").tokens.sum().to_dict() == {"a": 2001, "b": 2001, "c": 2001}


def test_trace_leaves_the_scenario_alone(scenario):
    def state():
        c = scenario.vllm_config
        return c.cache_config.num_gpu_blocks, c.model_config.skip_tokenizer_init, c.model_config.max_model_len

    before = state()
    trace(scenario, single(10))
    with pytest.raises(DiagError):  # vLLM's failed KV check searches max_model_len by writing it
        trace(scenario, single(10), kv_memory_bytes=1 << 30)
    assert state() == before


def test_too_long_prompt_is_rejected(scenario):
    m = scenario.vllm_config.model_config.max_model_len
    with pytest.raises(DiagError, match=rf"^vLLM would reject this request: The decoder prompt \(length {m + 1}\) "
                                        rf"is longer than the maximum model length of {m}$"):
        trace(scenario, single(m + 1))


def test_too_little_kv_memory_is_rejected(scenario):
    with pytest.raises(DiagError, match=r"^vLLM's KV-cache sizing: .*max seq len"):
        trace(scenario, single(10), kv_memory_bytes=1 << 30)
    with pytest.raises(DiagError, match="^kv_memory_bytes must be positive, got 0$"):
        trace(scenario, single(10), kv_memory_bytes=0)


def test_sweep_matches_single_traces_and_reuses_the_scheduler(scenario):
    df = sweep(scenario, [8191, 8192, 8193], {"max_num_batched_tokens": [8191, 8192]}, progress=False)
    assert set(df.max_num_batched_tokens) == {8191, 8192} and set(df.prompt_len) == {8191, 8192, 8193}
    assert (df.budget == df.max_num_batched_tokens).all()
    fwd = df[df.forward]
    got = fwd.groupby(["max_num_batched_tokens", "prompt_len"]).total_tokens.apply(list).to_dict()
    assert got[(8191, 8192)] == [8191, 1] and got[(8192, 8192)] == [8192]
    fresh = trace(scenario.derive("--max-num-batched-tokens", "8191"), single(8193))
    assert got[(8191, 8193)] == _tokens(fresh)


def test_sweep_in_worker_processes_gives_the_same_rows(scenario):
    knobs = {"max_num_batched_tokens": [8191, 8192]}
    one = sweep(scenario, range(8185, 8200), knobs, progress=False, workers=1)
    for workers in (2, 5):  # a share of each setting per worker; more workers than settings split the lengths
        pd.testing.assert_frame_equal(sweep(scenario, range(8185, 8200), knobs, progress=False, workers=workers), one)


def test_sweep_knobs_reach_vllm(scenario):
    df = sweep(scenario, [600], {"enforce_eager": ["off", "on"], "max_cudagraph_capture_size": ["1024"]}, progress=False)
    step = df[df.forward & (df.total_tokens == 600)].set_index("enforce_eager")
    assert step.loc["on", "cudagraph_mode"] == "NONE" and step.loc["on", "compile_kind"] == "none"
    assert step.loc["off", "cudagraph_mode"] != "NONE"  # 600 <= the raised largest capture size


def test_rejected_knob_value_is_one_clear_line(scenario):
    with pytest.raises(DiagError, match=r"^max_num_batched_tokens=abc: bad serve argument: argument "
                                        r"--max-num-batched-tokens: invalid"):
        sweep(scenario, [10], {"max_num_batched_tokens": ["abc"]}, progress=False)
    with pytest.raises(DiagError, match="^unknown knob 'warp_speed'"):
        sweep(scenario, [10], {"warp_speed": ["9"]}, progress=False)
    with pytest.raises(DiagError, match="^knob enforce_eager: expected on/off, got 'maybe'$"):
        sweep(scenario, [10], {"enforce_eager": ["maybe"]}, progress=False)
    with pytest.raises(DiagError, match="^no prompt lengths to sweep$"):
        sweep(scenario, [], progress=False)


def test_a_reused_engine_replays_as_a_fresh_one(scenario, monkeypatch):
    """Prefix-cache hashes handed out by prefix and the blocks evicted after each workload leave no trace:
    every workload on one engine gives what vLLM's own hasher gives on a fresh engine (kv usage included)."""
    workloads = [single(8193, 2), with_decoders(8192, 3, output_len=2), prompts(100, 8192, 20000, output_len=3),
                 single(8193, 2), single(40, 20)]
    reused = Engine(scenario, 20 << 30)
    assert (reused.prefix is not None) == compat.can_evict_cached_blocks()
    for w in workloads:
        fresh = Engine(scenario, 20 << 30)
        fresh.prefix = None  # vLLM's request block hasher for every request, on its own salt
        assert reused.run(w) == fresh.run(w), w.name
    if reused.prefix is None:
        return
    monkeypatch.setattr(compat, "evict_cached_blocks", lambda *a: None)  # the control: without the eviction
    reused.run(single(8193, 2))
    assert reused.run(single(8193, 2)) != Engine(scenario, 20 << 30).run(single(8193, 2)), "a prefix hit shows"


def test_kv_memory_beyond_the_gpu_is_refused(scenario):
    with pytest.raises(DiagError, match="more KV memory than one .* has"):
        trace(scenario, single(10), kv_memory_bytes=scenario.gpu.memory_bytes + 1)


def test_stalled_scheduler_is_reported(scenario):
    try:
        stalled = scenario.derive("--max-num-seqs", "0")
    except DiagError:
        pytest.skip("this vLLM rejects max_num_seqs 0 itself (see test_rejected_knob_value_is_one_clear_line)")
    with pytest.raises(DiagError, match="^vLLM's scheduler schedules nothing at step 1 while requests wait"):
        trace(stalled, single(10))


def test_parsers():
    assert parse_lengths("8100:8103") == [8100, 8101, 8102, 8103]
    assert parse_lengths("10:30:10") == [10, 20, 30] and parse_lengths("5,7") == [5, 7]
    assert parse_knob("max_num_seqs=1,2") == ("max_num_seqs", ["1", "2"])
    for bad in ("8300:8100", "a:b", "1:5:0", ""):
        with pytest.raises(DiagError, match="^--lengths: expected A:B"):
            parse_lengths(bad)
    for bad in ("max_num_seqs", "=1", "x="):
        with pytest.raises(DiagError, match="^--knob: expected NAME=V1,V2"):
            parse_knob(bad)


def test_cli_trace_and_sweep(scenario_name, tmp_path, capsys):
    from diaglib.cli import main

    assert main(["trace", scenario_name, "--prompt", "8193", "--output-len", "2"]) == 0
    out = capsys.readouterr().out
    assert "a:8192P" in out and "a:1L" in out and "GUESS" in out
    path = tmp_path / "s.csv"
    assert main(["sweep", scenario_name, "--lengths", "8191:8193", "--knob", "max_num_batched_tokens=8191,8192",
                 "-o", str(path)]) == 0
    df = pd.read_csv(path)
    assert len(df[df.forward]) == (1 + 2 + 2) + (1 + 1 + 2) and set(df.prompt_len) == {8191, 8192, 8193}
    assert main(["sweep", scenario_name, "--lengths", "10", "--knob", "max_num_batched_tokens=abc"]) == 2
    assert _last_err(capsys).startswith("diaglib: error: max_num_batched_tokens=abc: bad serve argument")
    assert main(["sweep", scenario_name, "--lengths", "10", "-o", "x.txt"]) == 2
    assert _last_err(capsys) == "diaglib: error: -o must name a .parquet or .csv file, got 'x.txt'"
    assert main(["trace", scenario_name, "--prompt", "5", "--prompt", "6", "--decoders", "2"]) == 2
    assert _last_err(capsys) == "diaglib: error: --decoders goes with exactly one --prompt"
    assert main(["sweep", scenario_name, "--lengths", "9:1"]) == 2
    assert _last_err(capsys) == "diaglib: error: --lengths: expected A:B, A:B:STEP or a,b,c with A <= B, got '9:1'"


def _last_err(capsys) -> str:
    """The CLI's own message: the last stderr line (vLLM logs to stderr before it)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_multimodal_folder_without_its_processor_files_is_scheduled_text_only():
    """A config-only multimodal folder: vLLM cannot build its processor, so the scheduler is vLLM's own in its
    text-only mode (no encoder cache), said in the notes; the scenario's config keeps its multimodal limits."""
    from diaglib.scenario import load

    sc = load(cmd="vllm serve data/models/gemma-3-27b-it --max-num-batched-tokens 8192", gpu="NVIDIA H200",
              gpu_count=1)
    eng = Engine(sc)
    assert any(n.startswith("scheduled text-only") for n in eng.notes)
    assert eng.scheduler.max_num_encoder_input_tokens == 0
    mine, theirs = eng.cfg.model_config.multimodal_config, sc.vllm_config.model_config.multimodal_config
    assert mine is not theirs
    assert mine.get_limit_per_prompt("image") == 0 < theirs.get_limit_per_prompt("image")
    tr = trace(sc, Workload((Req("a", 9000, 2, 0),)))
    assert list(tr.per_step["total_tokens"][:3]) == [8192, 808, 1]


def test_the_default_kv_memory_is_the_memory_budgets(scenario):
    """trace and sweep size the KV cache from the same estimate `diaglib memory` shows, through the same vLLM
    sizing: one capacity per scenario."""
    from diaglib.predict import memory

    b = memory.budget(scenario).set_index("item")
    eng = Engine(scenario)
    assert eng.kv_info["kv_memory_bytes"] == b.loc["KV cache", "bytes"]
    assert f"{eng.kv_info['num_blocks']} blocks of {eng.kv_info['block_size']} tokens" in b.loc["KV cache", "how"]


def test_a_sliding_window_model_is_sized_by_the_kv_specs_its_layers_give_themselves():
    """gemma-3 interleaves sliding-window and global layers: vLLM's sizing groups the layers by the spec each
    attention layer of its model gives itself (sliding-window groups need only a window's blocks per request),
    so 20 GiB hold a 128k-token request, which they could not if every layer were full attention."""
    from diaglib.predict import layers
    from diaglib.predict.schedule import kv_specs
    from diaglib.scenario import load

    sc = load(cmd="vllm serve data/models/gemma-3-27b-it --max-num-batched-tokens 8192", gpu="NVIDIA H200",
              gpu_count=1)
    eng = Engine(sc, kv_memory_bytes=20 << 30)
    grouped = {n: type(g.kv_cache_spec).__name__ for g in eng.kv_config.kv_cache_groups for n in g.layer_names}
    with layers.registered(sc), layers.rank0(sc):
        ctx = layers.forward_context(sc)
        own = {n: type(spec).__name__ for n, layer in ctx.items() if hasattr(layer, "get_kv_cache_spec")
               and (spec := layer.get_kv_cache_spec(sc.vllm_config)) is not None}
    assert set(grouped) == set(kv_specs(sc)) and len(grouped) == sc.vllm_config.model_config.get_num_layers(
        sc.vllm_config.parallel_config)
    if own:  # layers that build their own spec (the 0.10 line's model runner built them)
        assert grouped == own
    assert set(grouped.values()) == {"SlidingWindowSpec", "FullAttentionSpec"}
    assert compat.kv_cache_tokens(sc.vllm_config, eng.kv_config) >= sc.vllm_config.model_config.max_model_len
    with pytest.raises(DiagError, match="max seq len"):  # all full attention: no room for one 128k request
        compat.kv_cache_config(compat.private_config(sc.vllm_config), 20 << 30)
    assert f"shared by {len(eng.kv_config.kv_cache_groups)} KV-cache groups" in eng.notes[1]


def test_the_scheduler_takes_the_block_size_of_vllms_kv_cache_group():
    """A backend with a block size of its own (FlashMLA's 64 for the NVFP4 DeepSeek on H100, settled after loading
    the model in newer releases): the scheduler allocates and hashes in the block size of vLLM's KV-cache group, as
    the engine core settles it, and a prompt as long as the model allows replays."""
    import moe_models

    sc = moe_models.zoo("DeepSeek-V3.1-NVFP4", "NVIDIA H100 80GB HBM3")
    eng = Engine(sc)
    groups = eng.kv_config.kv_cache_groups
    assert eng.kv_info["block_size"] == min(g.kv_cache_spec.block_size for g in groups)
    steps, _ = eng.run(single(8191, 1))
    assert steps[0]["total_tokens"] == 8191
