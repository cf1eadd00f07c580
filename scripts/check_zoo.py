"""Resolve every model folder under data/models with the installed vLLM on what-if GPUs, and say what came of it.

Run it with the interpreter of the vLLM you want answered, from the repository root (so this checkout's
diaglib and data are the ones used):

    .venvs/vllm-0.20.2/bin/python scripts/check_zoo.py                 # H200 and B200
    .venvs/vllm-0.10.1.1/bin/python scripts/check_zoo.py --gpu "NVIDIA GB200" --json out.json

Only configuration resolution is checked (diaglib.scenario.load: vLLM's serve parser and
create_engine_config); no model is built. Each (model, GPU) prints one line: `ok` with what vLLM
resolved, or `refused` with vLLM's one-line reason (the DiagError text). The TP per folder below only
chooses the tensor-parallel size; nothing in diaglib is keyed to a model name.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tensor-parallel size per folder (only to pick a sensible TP; unknown folders get 1).
TP = json.loads((ROOT / "data/models/usual-tp.json").read_text())["tp"]
DEFAULT_GPUS = ("NVIDIA H200", "NVIDIA B200")
TOKENS = 8192


def model_dirs() -> list[Path]:
    return sorted(d for d in (ROOT / "data" / "models").iterdir() if (d / "config.json").is_file())


def command(folder: str) -> str:
    return f"vllm serve data/models/{folder} -tp {TP.get(folder, 1)} --max-num-batched-tokens {TOKENS}"


def resolve(folder: str, gpu: str) -> dict:
    from diaglib.errors import DiagError
    from diaglib.scenario import load

    cmd = command(folder)
    t0 = time.time()
    try:
        sc = load(cmd=cmd, gpu=gpu, gpu_count=max(8, TP.get(folder, 1)))
    except DiagError as e:
        return {"model": folder, "gpu": gpu, "cmd": cmd, "status": "refused", "reason": str(e),
                "seconds": round(time.time() - t0, 1)}
    mc = sc.vllm_config.model_config
    text = mc.hf_text_config
    return {"model": folder, "gpu": gpu, "cmd": cmd, "status": "ok", "architecture": mc.architectures[0],
            "quantization": mc.quantization, "dtype": str(mc.dtype).removeprefix("torch."),
            "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
            "max_model_len": mc.max_model_len, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="append", help="what-if GPU (repeatable; default: H200 and B200)")
    ap.add_argument("--model", action="append", help="folder under data/models (repeatable; default: all)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    from diaglib.compat import releases as versions

    gpus = args.gpu or list(DEFAULT_GPUS)
    folders = args.model or [d.name for d in model_dirs()]
    results = []
    for folder in folders:
        for gpu in gpus:
            r = resolve(folder, gpu)
            r["vllm"] = versions.installed()
            results.append(r)
            if r["status"] == "ok":
                detail = (f"{r['architecture']} quant={r['quantization']} dtype={r['dtype']} "
                          f"hidden={r['hidden_size']} layers={r['num_hidden_layers']} max_len={r['max_model_len']}")
            else:
                detail = r["reason"]
            print(f"vllm {r['vllm']} | {folder} | {gpu} | {r['status']} | {detail}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
