"""Rank-equivalent stand-in: a model config reshaped to one tensor-parallel rank's per-GPU shapes.

Every key of the config that names a size vLLM shards over TP ranks (attention and KV heads, any
``*intermediate_size``, the vocabulary) is divided by TP; hidden size, head sizes, MLA's latent ranks, expert
count, depth and the quantization config stay. Loaded on one GPU with vLLM's
``load_format="dummy"``, it runs the exact per-rank kernel shapes of the TP deployment.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import DiagError

# Config keys vLLM shards over TP ranks (column-parallel heads and MLP widths, the vocab-parallel embedding).
DIVIDED = re.compile(r"^(num_attention_heads|num_key_value_heads|vocab_size|\w*intermediate_size)$")

NOT_REPRODUCED = (
    "all-reduce and NCCL between ranks (no communication kernels, no FlashInfer allreduce+RMSNorm fusion)",
    "TP-dependent compile choices: compile ranges split at the allreduce-fusion limit, sequence parallelism",
    "real routing: dummy weights give arbitrary expert loads, not the real model's token-to-expert spread",
    "the vocab-parallel embedding's masking of ids owned by other ranks (ids must be < the per-rank vocab)",
    "real numerics: outputs are meaningless, only shapes, kernels, schedules and memory are real",
)


def rank_config(config: dict, tp: int) -> dict:
    """``config`` (a config.json dict) as seen by one of ``tp`` ranks; raises DiagError if a size won't divide.
    A multimodal wrapper's ``text_config`` (the language model vLLM shards) is divided the same way."""
    if tp < 1:
        raise DiagError(f"tensor-parallel size must be >= 1, got {tp}")
    out, divided = _divide(config, tp)
    if isinstance(config.get("text_config"), dict):
        out["text_config"], inner = _divide(config["text_config"], tp)
        divided.update({f"text_config.{k}": v for k, v in inner.items()})
    out["diaglib_standin"] = {"kind": "rank-equivalent", "tp": tp, "divided": divided,
                              "not_reproduced": list(NOT_REPRODUCED)}
    return out


def _divide(config: dict, tp: int) -> tuple[dict, dict]:
    """(a copy of ``config`` with its TP-sharded sizes per rank, {key: [total, per rank]})."""
    out = json.loads(json.dumps(config))
    heads = config.get("num_attention_heads")
    if heads and "head_dim" not in out and "kv_lora_rank" not in config and "hidden_size" in config:
        out["head_dim"] = config["hidden_size"] // heads  # keep the real head size once heads are divided
    divided = {}
    for key, value in config.items():
        if not DIVIDED.match(key) or not isinstance(value, int) or isinstance(value, bool):
            continue
        if key == "num_key_value_heads" and value < tp:
            if tp % value:
                raise DiagError(f"{key}={value} does not divide evenly over TP {tp}")
            per_rank = 1  # vLLM replicates KV heads when there are fewer than ranks
        elif value % tp:
            raise DiagError(f"{key}={value} is not divisible by TP {tp}")
        else:
            per_rank = value // tp
        out[key] = per_rank
        divided[key] = [value, per_rank]
    return out, divided


def write_standin(model_dir: str | Path, tp: int, out_dir: str | Path) -> Path:
    """Write the rank-equivalent config.json of the model in ``model_dir`` into ``out_dir``; returns out_dir."""
    src = Path(model_dir) / "config.json"
    if not src.is_file():
        raise DiagError(f"{src}: no config.json to build a stand-in from")
    try:
        config = json.loads(src.read_text())
    except json.JSONDecodeError as e:
        raise DiagError(f"{src}: malformed JSON: {e}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = rank_config(config, tp)
    cfg["diaglib_standin"]["source"] = str(src.name if src.parent == out else src.parent.name)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        (out / "generation_config.json").write_text(gen.read_text())
    return out


def per_rank_vocab(model_dir: str | Path) -> int:
    """The vocabulary a probe's token ids must stay below (class 14: vLLM does not check them)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    if not vocab:  # left to the config class's default: ask transformers, as vLLM does
        try:
            from transformers import AutoConfig

            vocab = AutoConfig.from_pretrained(str(model_dir)).get_text_config().vocab_size
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise DiagError(f"{model_dir}: no vocab_size in config.json, nor from transformers ({e})") from None
    return int(vocab)
