"""Kill switches: this vLLM's spelling of each switch that turns one layer of the stack off.

Spellings come from what this vLLM's serve parser, CompilationConfig and vllm.envs have:
- compilation config flag: ``-O`` (``--compilation-config``) up to 0.11.2, ``-cc`` from 0.12.0 (where -O is
  the optimization level and -O.key is refused); its key: ``level`` up to 0.10.2, ``mode`` from 0.11.2.
- graphs off: ``cudagraph_mode=NONE`` from 0.10.1 (0.10.0: ``use_cudagraph=False``).
- Inductor off: ``use_inductor=False`` while that field decides (up to 0.10.2; -O.backend=eager is accepted
  there but ignored at level 3), ``backend=eager`` from 0.11.2.
- ``--no-async-scheduling`` where the flag is a boolean pair; ``--moe-backend`` from 0.17.1;
  ``--attention-backend`` from 0.13.0 (the VLLM_ATTENTION_BACKEND variable before);
  the MoE chunking variables while vllm.envs has them; VLLM_DISABLE_PAD_FOR_CUDAGRAPH in 0.10.2 only;
  ``--gdn-prefill-backend triton`` where the parser has it (0.20 on).
Whether a spelling does what it claims is checked on vLLM's resolved config by diaglib.predict.switches.verify.
"""
from __future__ import annotations

from .compile import has_compilation_mode, has_cudagraph_mode, inductor_by_flag
from .parsing import option_alias, serve_options


def _env_known(name: str) -> bool:
    import vllm.envs as envs

    return name in getattr(envs, "environment_variables", {})


def _other_backend(attention: str) -> str:
    """A different attention backend of this vLLM's registry: Triton's for FlashAttention, else FlashAttention's."""
    from .detect import first

    enum = first("the attention backend registry", "vllm.v1.attention.backends.registry:AttentionBackendEnum",
                 "vllm.attention.backends.registry:_Backend", "vllm.attention.backends.registry:AttentionBackendEnum",
                 "vllm.platforms.interface:_Backend")
    want = "FLASH_ATTN" if attention.startswith("TRITON") else "TRITON_ATTN"
    names = [m for m in enum.__members__ if m.startswith(want)]
    return min(names, key=len) if names else want


def kill_switches(vllm_config, attention: str) -> dict[str, tuple[list[str], dict[str, str]] | str]:
    """This vLLM's spelling of each kill switch as (serve flags, env vars), or why the version has none.

    ``attention``: the attention backend the scenario runs (the switch picks another one).
    """
    opts = serve_options()
    mnbt = vllm_config.scheduler_config.max_num_batched_tokens
    cc = option_alias("--compilation-config")
    level = "mode" if has_compilation_mode() else "level"
    other = _other_backend(attention)
    chunk = ("VLLM_ENABLE_FUSED_MOE_ACTIVATION_CHUNKING", "VLLM_FUSED_MOE_CHUNK_SIZE")

    def env_switch(var: str, value: str):
        return ([], {var: value}) if _env_known(var) else f"this vLLM has no {var}"

    return {
        "enforce-eager": (["--enforce-eager"], {}),
        "budget+1": (["--max-num-batched-tokens", str(mnbt + 1)], {}),
        "budget-1": (["--max-num-batched-tokens", str(mnbt - 1)], {}),
        "compile-off": ([f"{cc}.{level}=0"], {}),
        "cudagraph-off": ([f"{cc}.cudagraph_mode=NONE" if has_cudagraph_mode() else f"{cc}.use_cudagraph=False"], {}),
        "inductor-off": ([f"{cc}.use_inductor=False" if inductor_by_flag() else f"{cc}.backend=eager"], {}),
        # Without chunking vLLM requires max_model_len <= max_num_batched_tokens.
        "chunked-prefill-off": (["--no-enable-chunked-prefill", "--max-model-len", str(mnbt)], {}),
        "async-off": (["--no-async-scheduling"], {}) if "--no-async-scheduling" in opts
        else "this vLLM has no --no-async-scheduling (async scheduling is off unless asked for)",
        "moe-chunk-off": env_switch(chunk[0], "0"),
        "moe-chunk-half": env_switch(chunk[1], str(max(mnbt // 2, 1))),
        "moe-backend": (["--moe-backend", "triton"], {}) if "--moe-backend" in opts
        else "this vLLM has no --moe-backend flag",
        "attention-backend": (["--attention-backend", other], {}) if "--attention-backend" in opts
        else env_switch("VLLM_ATTENTION_BACKEND", other),
        "pad-off": env_switch("VLLM_DISABLE_PAD_FOR_CUDAGRAPH", "1"),
        "gdn-prefill-triton": (["--gdn-prefill-backend", "triton"], {}) if "--gdn-prefill-backend" in opts
        else "this vLLM has no --gdn-prefill-backend flag",
    }
