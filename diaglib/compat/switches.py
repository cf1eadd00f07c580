"""Kill switches: this vLLM's spelling of each switch that turns one layer of the stack off."""
from __future__ import annotations

from .detect import _legacy


def kill_switches(vllm_config, attention: str) -> dict[str, tuple[list[str], dict[str, str]] | str]:
    """This vLLM's spelling of each kill switch as (serve flags, env vars), or why the version has none.

    ``attention``: the attention backend the scenario runs (the switch picks another one).
    Checked against vLLM's parser and resolved config by diaglib.predict.switches.verify.
    """
    mnbt = vllm_config.scheduler_config.max_num_batched_tokens
    common = {
        "enforce-eager": (["--enforce-eager"], {}),
        "budget+1": (["--max-num-batched-tokens", str(mnbt + 1)], {}),
        "budget-1": (["--max-num-batched-tokens", str(mnbt - 1)], {}),
        "pad-off": "VLLM_DISABLE_PAD_FOR_CUDAGRAPH exists in neither 0.10.1.1 nor 0.20.2",
    }
    if _legacy():
        other = "FLASH_ATTN_VLLM_V1" if attention.startswith("TRITON") else "TRITON_ATTN_VLLM_V1"
        return {**common,
                "compile-off": (["-O", "0"], {}),
                "cudagraph-off": (["-O.cudagraph_mode=NONE"], {}),
                # -O.backend=eager is accepted but ignored at level 3 (PIECEWISE reads use_inductor).
                "inductor-off": (["-O.use_inductor=False"], {}),
                "chunked-prefill-off": "the V1 engine of 0.10 forces chunked prefill on "
                                       "(EngineArgs._set_default_args_v1 overrides --no-enable-chunked-prefill)",
                "async-off": "async scheduling is off by default on 0.10",
                "moe-chunk-off": ([], {"VLLM_ENABLE_FUSED_MOE_ACTIVATION_CHUNKING": "0"}),
                "moe-chunk-half": ([], {"VLLM_FUSED_MOE_CHUNK_SIZE": str(max(mnbt // 2, 1))}),
                "moe-backend": "no switch: sm90 FP8 compressed-tensors MoE always takes CUTLASS "
                               "(use_cutlass is checked before VLLM_TEST_FORCE_FP8_MARLIN in apply)",
                "attention-backend": ([], {"VLLM_ATTENTION_BACKEND": other})}
    other = "FLASH_ATTN" if attention.startswith("TRITON") else "TRITON_ATTN"
    return {**common,
            "compile-off": (["-cc.mode=0"], {}),
            "cudagraph-off": (["-cc.cudagraph_mode=NONE"], {}),
            "inductor-off": (["-cc.backend=eager"], {}),
            # Without chunking vLLM requires max_model_len <= max_num_batched_tokens.
            "chunked-prefill-off": (["--no-enable-chunked-prefill", "--max-model-len", str(mnbt)], {}),
            "async-off": (["--no-async-scheduling"], {}),
            "moe-chunk-off": "fused-MoE activation chunking was removed (no VLLM_ENABLE_FUSED_MOE_ACTIVATION_CHUNKING)",
            "moe-chunk-half": "fused-MoE activation chunking was removed (no VLLM_FUSED_MOE_CHUNK_SIZE)",
            "moe-backend": (["--moe-backend", "triton"], {}),
            "attention-backend": (["--attention-backend", other], {})}
