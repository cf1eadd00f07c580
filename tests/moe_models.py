"""Scenarios shared by the MoE / memory / boundary / known-issue tests: a small dense model and the zoo's MoE
models on named GPUs, each resolved once per test session by the installed vLLM."""
from __future__ import annotations

import json

import pytest

from diaglib.paths import DATA

_cache: dict[tuple, object] = {}

# The zoo's MoE checkpoints (data/models/NAME), at the TP the zoo serves each with; skipped where missing.
_TP = json.loads((DATA / "models" / "usual-tp.json").read_text())["tp"]
MOE_ZOO = {name: _TP.get(name, 8) for name in (
    "DeepSeek-V3", "DeepSeek-R1", "DeepSeek-V3.1-NVFP4", "Qwen3-235B-A22B-NVFP4", "gpt-oss-120b",
    "Qwen3-Next-80B-A3B-Thinking", "Llama-4-Scout-17B-16E-Instruct",
    "Mixtral-8x22B-Instruct-v0.1", "Mixtral-8x22B-v0.1")}
GPUS = ("NVIDIA H100 80GB HBM3", "NVIDIA B200")
DENSE_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
             "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4,
             "num_hidden_layers": 2, "vocab_size": 1024, "max_position_embeddings": 2048,
             "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}


def dense(tmp_path_factory):
    """A small dense Llama named dense-llama (no MoE layers) on one H200."""
    if "dense" not in _cache:
        from diaglib.scenario import load

        d = tmp_path_factory.mktemp("models") / "dense-llama"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(DENSE_CFG))
        _cache["dense"] = load(cmd=f"vllm serve {d} --max-model-len 2048 --max-num-batched-tokens 1024",
                               gpu="NVIDIA H200", gpu_count=1)
    return _cache["dense"]


def zoo(name: str, gpu: str):
    """The zoo model at its TP on ``gpu`` (8192-token budget); skipped when its folder is not here."""
    key = (name, gpu)
    if key not in _cache:
        folder = DATA / "models" / name
        if not (folder / "config.json").exists():
            pytest.skip(f"no data/models/{name} here")
        from diaglib.errors import DiagError
        from diaglib.scenario import load

        tp = MOE_ZOO[name]
        try:
            _cache[key] = load(cmd=f"vllm serve {folder} -tp {tp} --max-model-len 8192 "
                                   "--max-num-batched-tokens 8192", gpu=gpu, gpu_count=tp)
        except DiagError as e:  # vLLM refuses the model here (e.g. unknown to this release): its one line
            _cache[key] = e
    if isinstance(_cache[key], Exception):
        pytest.skip(f"vLLM refuses {name} on {gpu}: {_cache[key]}")
    return _cache[key]


def moe_layer(sc):
    """The scenario's first MoE layer; skipped (with vLLM's reason) where this vLLM cannot build the model here."""
    from diaglib.predict import layers

    try:
        layer = layers.build_moe_layer(sc)
    except Exception as e:  # e.g. an attention backend that touches the GPU at import (the what-if layer's part)
        pytest.skip(f"vLLM cannot build {sc.vllm_config.model_config.model} on the meta device here: "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    assert layer is not None, "a zoo MoE model without MoE layers"
    return layer


def tiny(gpu: str):
    """The small GLM-4.6-layout FP8 model (data/models/tiny-glm-fp8) at TP 1 on ``gpu``, 8192-token budget."""
    key = ("tiny", gpu)
    if key not in _cache:
        from diaglib.scenario import load

        _cache[key] = load(cmd=f"vllm serve {DATA / 'models' / 'tiny-glm-fp8'} --enable-chunked-prefill "
                               "--max-num-batched-tokens 8192", gpu=gpu, gpu_count=1)
    return _cache[key]
