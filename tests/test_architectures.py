"""Every zoo model on an H100 and a B200: diaglib's answers against vLLM's own objects.

Folders are discovered (data/models/*), never listed, and each (folder, GPU) is resolved and built once per
module: at the largest TP of 8, 4, 2, 1 that vLLM's config accepts. Where vLLM refuses (a model this
release does not know, a shape it does not build), the answer is its reason in one line. The what-if GPU
is process-wide, so the one active before this module is put back afterwards.
"""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest

from diaglib import compat
from diaglib.compat.detect import takes
from diaglib.errors import DiagError

pytestmark = pytest.mark.contract

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
FOLDERS = sorted(d.name for d in MODELS.iterdir() if (d / "config.json").is_file())
GPUS = ("NVIDIA H100 80GB HBM3", "NVIDIA B200")
CASES = [(f, g) for f in FOLDERS for g in GPUS]
IDS = [f"{f}-{g.split()[1]}" for f, g in CASES]


@pytest.fixture(scope="module")
def zoo():
    """(folder, gpu) -> built Scenario, or the DiagError vLLM's refusal became; each resolved once."""
    from diaglib import whatif
    from diaglib.gpus import gpu_spec
    from diaglib.predict import layers
    from diaglib.scenario import load, prepare_vllm

    before = whatif.active_gpu()
    prepare_vllm(gpu_spec(GPUS[0], 8))  # before any test body imports vLLM
    cache: dict[tuple[str, str], object] = {}

    def get(folder: str, gpu: str):
        if (folder, gpu) not in cache:
            tps = [8, 4, 2, 1]
            while tps:
                tp = tps.pop(0)
                try:
                    sc = load(cmd=f"vllm serve data/models/{folder} -tp {tp} --max-num-batched-tokens 8192",
                              gpu=gpu, gpu_count=8)
                    layers.build_model(sc)
                    cache[folder, gpu] = sc
                    break
                except DiagError as e:
                    cache[folder, gpu] = e
                    smaller = re.search(r"builds it at TP (\d+)", str(e))  # a per-rank rule: its refusal says where
                    if smaller:
                        tps = [int(smaller.group(1))]
                    elif "divisible by tensor parallel size" not in str(e):
                        break
        return cache[folder, gpu]

    yield get
    if before is not None:
        whatif.activate(before)


def built(zoo, folder, gpu):
    got = zoo(folder, gpu)
    if isinstance(got, DiagError):
        pytest.skip(f"vLLM refuses: {got}")
    return got


@pytest.mark.parametrize("folder,gpu", CASES, ids=IDS)
def test_resolves_and_builds_or_refuses_in_one_line(zoo, folder, gpu):
    got = zoo(folder, gpu)
    if isinstance(got, DiagError):
        msg = str(got)
        assert msg.strip() and "\n" not in msg and "vLLM" in msg, msg
        return
    from diaglib.predict import layers

    params = list(layers.build_model(got).parameters())
    assert params and all(p.device.type in ("meta", "cpu") for p in params)
    assert sum(p.numel() for p in params if p.device.type == "meta") > 0.99 * sum(p.numel() for p in params)


@pytest.mark.parametrize("folder,gpu", CASES, ids=IDS)
def test_attention_backends_are_what_each_layer_asked_vllm_for(zoo, folder, gpu):
    """Per layer kind, diaglib's table counts exactly the model's attention-like modules and the backend
    each one holds (found here by walking the model's modules, not its forward-context registry); mamba
    layers of releases where the model runner picks their backend are the only extra rows."""
    from diaglib.predict import architecture, layers

    sc = built(zoo, folder, gpu)
    registered = {id(m) for m in layers.forward_context(sc).values()}
    expected, mamba = collections.Counter(), set()
    for m in layers.build_model(sc).modules():
        if id(m) not in registered:
            continue
        if callable(getattr(m, "get_attn_backend", None)):
            expected[type(m).__name__, m.get_attn_backend().get_name()] += 1
        elif isinstance(getattr(m, "attn_backend", None), type):
            expected[type(m).__name__, m.attn_backend.get_name()] += 1
        elif hasattr(m, "get_state_shape"):
            mamba.add(type(m).__name__)
    got = collections.Counter()
    for row in architecture.attention_kinds(sc):
        got[row["layer"], row["backend"]] += row["layers"]
    extra = got - expected
    assert expected - got == collections.Counter() and all(cls in mamba for cls, _ in extra), (got, expected)


def _supports(block_size: int, sizes: list) -> bool:
    """Whether a KV block of ``block_size`` tokens splits into one of a backend's kernel block sizes (ints, or
    "multiple of N"): vLLM runs a KV block as several kernel blocks where they differ."""
    return any(block_size % (s if isinstance(s, int) else int(s.split()[-1])) == 0 for s in sizes)


@pytest.mark.parametrize("folder,gpu", CASES, ids=IDS)
def test_layer_facts_are_vllms(zoo, folder, gpu):
    """Sliding windows are the windows vLLM's attention layers hold; a mamba / DeltaNet state is the shape
    vLLM's model class states for this config; the KV block size after load is one the backend supports."""
    from vllm.config import set_current_vllm_config

    from diaglib.predict import architecture, layers

    sc = built(zoo, folder, gpu)
    f = architecture.facts(sc)
    windows = {getattr(m, "sliding_window", None) for m in layers.forward_context(sc).values()}
    assert set(f["sliding_windows"]) == {w for w in windows if isinstance(w, int)}
    states = [a["state_shapes"] for a in f["attention"] if a["state_shapes"]]
    mc = sc.vllm_config.model_config
    from vllm.model_executor.models import ModelRegistry

    kw = {"model_config": mc} if takes("vllm.model_executor.models.registry:_ModelRegistry.resolve_model_cls",
                                              "model_config") else {}
    cls = ModelRegistry.resolve_model_cls(mc.architectures, **kw)[0]
    if states and hasattr(cls, "get_mamba_state_shape_from_config"):
        with layers.rank0(sc), set_current_vllm_config(sc.vllm_config):
            shapes = cls.get_mamba_state_shape_from_config(sc.vllm_config)
        assert states[0] == [list(s) for s in shapes]
    kv = f["kv_block_size"]
    if not kv["set_after_load"]:
        assert kv["after_load"] == kv["resolved"]
    for a in f["attention"]:
        if a["kernel_block_sizes"] and a["kv_spec"] and "Mamba" not in a["kv_spec"]:
            assert _supports(kv["after_load"], a["kernel_block_sizes"]), (a["backend"], kv)


@pytest.mark.parametrize("folder,gpu", CASES, ids=IDS)
def test_per_rank_weight_shapes_follow_vllms_layers(zoo, folder, gpu):
    """Every TP-split linear layer's per-rank sizes times TP are its whole sizes, an unquantized 2-D weight on the
    meta device has exactly the per-rank shape its vLLM layer states, and every MoE layer holds its local
    experts."""
    from vllm.model_executor.layers.linear import LinearBase

    from diaglib.predict import layers

    sc = built(zoo, folder, gpu)
    tp = sc.vllm_config.parallel_config.tensor_parallel_size
    checked = 0
    for name, m in layers.build_model(sc).named_modules():
        if isinstance(m, LinearBase) and hasattr(m, "output_size_per_partition"):
            for whole, per in ((m.output_size, m.output_size_per_partition), (m.input_size, m.input_size_per_partition)):
                assert per == whole or per * tp == whole, name
            weight = getattr(m, "weight", None)
            if type(m.quant_method).__name__ == "UnquantizedLinearMethod" and weight is not None and weight.dim() == 2:
                assert tuple(weight.shape) == (m.output_size_per_partition, m.input_size_per_partition), name
            checked += 1
        if hasattr(m, "w13_weight") and hasattr(m, "local_num_experts"):
            assert m.w13_weight.shape[0] == m.w2_weight.shape[0] == m.local_num_experts, name
            checked += 1
    assert checked


@pytest.mark.parametrize("folder,gpu", CASES, ids=IDS)
def test_show_answers_with_vllms_config(zoo, folder, gpu):
    from diaglib.predict import architecture
    from diaglib.predict.summarize import format_text, summarize

    sc = built(zoo, folder, gpu)
    s = summarize(sc)
    assert s["compilation"] == compat.compilation_summary(sc.vllm_config)
    assert s["attention_backend"] == architecture.attention_summary(s["architecture"])
    text = format_text(s)
    assert text.count("attention layers") == len(s["architecture"]["attention"])
    json.dumps(s, default=str)


@pytest.mark.parametrize("folder,gpu", CASES, ids=IDS)
def test_boundary_rows_evaluate_to_their_sides(zoo, folder, gpu):
    from diaglib.predict import architecture

    sc = built(zoo, folder, gpu)
    rows = architecture.boundary_rows(sc)
    assert list(rows.columns) == ["axis", "tokens", "below", "above", "kind", "rule", "feature", "distance",
                                  "source"]
    for r in rows.itertuples():
        assert architecture.feature_value(sc, r.feature, r.tokens - 1) == r.below
        assert architecture.feature_value(sc, r.feature, r.tokens) == r.above


def _first_mla(zoo):
    for folder in FOLDERS:
        got = zoo(folder, GPUS[0])
        if not isinstance(got, DiagError) and got.vllm_config.model_config.use_mla:
            return folder
    pytest.skip("no zoo model with MLA attention resolves here")


def test_moving_from_h100_to_b200_lists_what_vllm_changes(zoo):
    from diaglib.predict import architecture, gpucompare

    folder = _first_mla(zoo)
    a, b = built(zoo, folder, GPUS[0]), built(zoo, folder, GPUS[1])
    df = gpucompare.compare_scenarios(a, b).set_index("aspect")
    assert df.loc["GPU", "changed"]
    for sc in (a, b):
        ranges = compat.compilation_summary(sc.vllm_config)["compile_ranges"]
        assert df.loc["compile ranges", sc.gpu.name] == (", ".join(f"[{x}, {y}]" for x, y in ranges) or "none")
        for kind in architecture.attention_kinds(sc):
            row = next(k for k in df.index if k.startswith(f"attention: {kind['layers']} x {kind['layer']}"))
            assert df.loc[row, sc.gpu.name].startswith(architecture.backend_label(kind))
    ka, kb = (architecture.attention_kinds(sc)[0]["backend"] for sc in (a, b))
    row = next(k for k in df.index if k.startswith("attention:"))
    assert df.loc[row, "changed"] == (df.loc[row, a.gpu.name] != df.loc[row, b.gpu.name])
    assert ka == kb or df.loc[row, "changed"]


# --- refusals ------------------------------------------------------------------------------------

SMALL_FP8_MOE = {  # a Qwen3-MoE-layout config with block FP8: 768 / 4 ranks = 192, not a multiple of 128
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 1024,
    "intermediate_size": 3072, "moe_intermediate_size": 768, "num_experts": 16, "num_experts_per_tok": 4,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64, "num_hidden_layers": 2,
    "vocab_size": 4096, "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16", "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    "tie_word_embeddings": False, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                          "quant_method": "fp8", "weight_block_size": [128, 128]}}


@pytest.fixture(scope="module")
def small_fp8_moe(tmp_path_factory):
    d = tmp_path_factory.mktemp("small-fp8-moe")
    (d / "config.json").write_text(json.dumps(SMALL_FP8_MOE))
    return d


def test_a_block_that_does_not_divide_a_rank_is_one_line_with_the_tp_vllm_builds(small_fp8_moe):
    from diaglib.predict import layers
    from diaglib.scenario import load

    sc = load(cmd=f"vllm serve {small_fp8_moe} -tp 4 --max-model-len 4096", gpu=GPUS[0], gpu_count=8)
    try:
        layers.build_model(sc)
    except layers.BuildRefused as e:
        msg = str(e)
    else:
        pytest.skip(f"vLLM {compat.installed()} builds a block-FP8 layer whose rank share is not a multiple of the block")
    assert "\n" not in msg and "model.layers.0." in msg and "TP 4" in msg
    assert "128" in msg and "builds it at TP 2" in msg  # the block size, and the TP vLLM does build
    layers.build_model(sc.derive("-tp", "2"))  # what the message promises, asked of vLLM again
    if "--enable-expert-parallel" in msg and "it builds" in msg:
        layers.build_model(sc.derive("--enable-expert-parallel"))


SMALL_AWQ = {  # a Qwen2 layout with AWQ int4, group 128: 2944 = 23 x 128, so half of it per rank is no multiple
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1024, "intermediate_size": 2944,
    "num_attention_heads": 16, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 4096,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "torch_dtype": "float16",
    "tie_word_embeddings": False, "quantization_config": {"bits": 4, "group_size": 128, "quant_method": "awq",
                                                          "version": "gemm", "zero_point": True}}


def test_an_int4_group_that_does_not_divide_a_rank_names_the_size_and_the_group(tmp_path):
    """AWQ's own refusal names no numbers; the one line carries the per-rank size and the group from vLLM's frame."""
    from diaglib.predict import layers
    from diaglib.scenario import load

    (tmp_path / "config.json").write_text(json.dumps(SMALL_AWQ))
    sc = load(cmd=f"vllm serve {tmp_path} -tp 2 --max-model-len 4096", gpu=GPUS[0], gpu_count=8)
    with pytest.raises(layers.BuildRefused) as refused:
        layers.build_model(sc)
    msg, group = str(refused.value), SMALL_AWQ["quantization_config"]["group_size"]
    assert "\n" not in msg and "TP 2" in msg and "down_proj" in msg
    assert f"per rank {SMALL_AWQ['intermediate_size'] // 2}, not a multiple of {group}" in msg
    assert "builds it at TP 1" in msg
    layers.build_model(sc.derive("-tp", "1"))  # what the message promises, asked of vLLM again


def test_an_architecture_vllm_does_not_know_is_its_reason_in_one_line(tmp_path):
    from diaglib.predict import layers
    from diaglib.scenario import load

    cfg = {**SMALL_FP8_MOE, "architectures": ["NoSuchModelForCausalLM"]}
    cfg.pop("quantization_config")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DiagError) as e:
        layers.build_model(load(cmd=f"vllm serve {tmp_path} --max-model-len 4096", gpu=GPUS[0], gpu_count=1))
    assert "\n" not in str(e.value) and "NoSuchModelForCausalLM" in str(e.value)


def test_a_quantization_vllm_applies_to_no_layer_of_a_folder_without_weights_is_said(tmp_path):
    """A GPTQ config without `modules_in_block_to_quantize`: vLLM's GPTQ-Marlin config takes the quantized layers
    from the checkpoint's safetensors headers; a config-only folder has none, so vLLM builds every linear layer
    unquantized, and show says so instead of passing for a quantized model."""
    from diaglib.predict import architecture
    from diaglib.scenario import load

    cfg = json.loads((MODELS / "Llama-3.1-8B-Instruct" / "config.json").read_text())
    cfg.update(num_hidden_layers=2, torch_dtype="float16", quantization_config={
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sc = load(cmd=f"vllm serve {tmp_path} --max-model-len 4096", gpu=GPUS[0], gpu_count=1)
    f = architecture.facts(sc)
    methods = {m["method"] for m in f["linear_methods"]}
    said = [text for label, text in architecture.format_lines(f) if "unquantized although" in text]
    if methods == {"UnquantizedLinearMethod"}:
        assert f["quantization"] and len(said) == 1 and f["quantization"] in said[0]
    else:  # a vLLM that quantizes every layer of a folder without weights
        assert not said and not architecture.unquantized_despite_config(f)


def test_a_quantization_of_the_experts_only_is_not_said_to_be_missing():
    """gpt-oss quantizes its MoE experts (MXFP4) and leaves attention and other linear layers bf16 by design:
    no "unquantized although" hint where vLLM attached a quantized method to the experts."""
    from diaglib.predict import architecture
    from diaglib.scenario import load

    sc = load(cmd=f"vllm serve {MODELS / 'gpt-oss-120b'} -tp 2", gpu=GPUS[0], gpu_count=8)
    f = architecture.facts(sc)
    experts = [m for m in f["other_quant_methods"] if not m.startswith("Unquantized")]
    if not experts:
        pytest.skip(f"vLLM {compat.installed()} builds gpt-oss's experts unquantized here")
    assert not architecture.unquantized_despite_config(f)
    assert not [text for _, text in architecture.format_lines(f) if "unquantized although" in text]
