"""The model zoo (data/models/*): every folder is well-formed, says where it came from, and the installed vLLM
either resolves it or refuses it in one line.

Folders are discovered, not listed. Each model is resolved once per session (module-scoped cache) with
diaglib.scenario.load on a what-if H200; a what-if GPU is process-wide, so the one active before this module
is put back afterwards.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.contract

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
FOLDERS = sorted(d.name for d in MODELS.iterdir() if d.is_dir())
GPU = "NVIDIA H200"

TP = json.loads((MODELS / "usual-tp.json").read_text())["tp"]  # only to choose a sensible TP (else 1)


def config_of(folder: str) -> dict:
    return json.loads((MODELS / folder / "config.json").read_text())


@pytest.mark.parametrize("folder", FOLDERS)
def test_folder_is_well_formed(folder):
    d = MODELS / folder
    cfg = config_of(folder)
    assert isinstance(cfg, dict) and cfg.get("architectures"), f"{folder}: config.json names no architecture"
    for extra in d.glob("*.json"):
        json.loads(extra.read_text())  # every JSON file shipped with the model parses
    source = d / "SOURCE.md"
    assert source.is_file(), f"{folder} has no SOURCE.md"
    assert re.search(r"https://\S+", source.read_text()), f"{folder}/SOURCE.md names no https URL"
    assert not list(d.glob("*.safetensors")), f"{folder}: weights are never part of the zoo"


@pytest.fixture(scope="module")
def resolved():
    """folder -> Scenario or DiagError, each model resolved at most once."""
    from diaglib import whatif

    before = whatif.active_gpu()
    cache: dict[str, object] = {}

    def get(folder: str):
        if folder not in cache:
            from diaglib.errors import DiagError
            from diaglib.scenario import load

            tp = TP.get(folder, 1)
            cmd = f"vllm serve data/models/{folder} -tp {tp} --max-num-batched-tokens 8192"
            try:
                cache[folder] = load(cmd=cmd, gpu=GPU, gpu_count=max(8, tp))
            except DiagError as e:
                cache[folder] = e
        return cache[folder]

    yield get
    if before is not None:
        whatif.activate(before)


def _text_section(cfg: dict) -> dict:
    """Where config.json keeps the language model's sizes (a multimodal wrapper may nest them)."""
    text = cfg.get("text_config") or {}
    return {**cfg, **text}


@pytest.mark.parametrize("folder", FOLDERS)
def test_vllm_resolves_or_refuses_in_one_line(folder, resolved):
    from diaglib.errors import DiagError

    got = resolved(folder)
    if isinstance(got, DiagError):
        msg = str(got)
        assert msg.strip() and "\n" not in msg, f"{folder}: vLLM's refusal is not one line: {msg!r}"
        return
    cfg = config_of(folder)
    mc = got.vllm_config.model_config
    declared = cfg["architectures"][0]
    if mc.architectures[0] != declared:
        # A wrapper vLLM maps to another class: it must be what vLLM's own ModelConfig carries.
        assert mc.architectures[0] in (getattr(mc, "architecture", None), *mc.hf_config.architectures), \
            f"{folder}: vLLM reports {mc.architectures} for a config declaring {declared}"
    text = _text_section(cfg)
    for key in ("hidden_size", "num_hidden_layers"):
        if key in text:
            assert getattr(mc.hf_text_config, key) == text[key], f"{folder}: {key} differs from config.json"
