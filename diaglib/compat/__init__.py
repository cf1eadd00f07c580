"""What the installed vLLM offers: every difference between vLLM releases, in one layer, organised by concern.

Other modules never test ``vllm.__version__``; they call a function here. Each concern module tries vLLM's
newest API first and falls back era by era, deciding by what the installed vLLM has (an import, an attribute,
a signature: :mod:`.detect`), never by its version string. An untested release runs the same code; its
answers are marked unverified, and an API none of the known spellings covers is named in one line
(:class:`.detect.VllmApiMissing`).

- :mod:`.releases`: supported releases, the installed one, the project's environments
- :mod:`.parsing`: the serve parser and vLLM's front-end checks
- :mod:`.compile`: compile mode and ranges, capture sizes
- :mod:`.cudagraphs`: CUDA-graph dispatch and padding
- :mod:`.scheduling`: the scheduler, its requests and outputs, KV-cache sizing
- :mod:`.prefix_cache`: which blocks a step handed out, evicting their hashes between replays
- :mod:`.models`: model building
- :mod:`.moe`: MoE layers, quant methods, experts, workspaces, chunking, Triton config inputs
- :mod:`.attention`: attention backend selection
- :mod:`.forward`: one forward pass outside the engine (forward context, attention metadata, dummy run)
- :mod:`.switches`: kill-switch spellings
- :mod:`.speculative`: the MTP draft of a checkpoint; the draft model a proposer builds and shares with the target
- :mod:`.envs`: vLLM's VLLM_* settings for one answer
- :mod:`.logs`: vLLM's log formatter and the calls behind the log lines diaglib triage reads
"""
from .attention import (
    attention_backend,
    attention_backend_class,
    attention_groups,
    backend_name,
    backend_traits,
    block_size_set_after_load,
    config_after_load,
    cudagraph_support,
    flash_attn_version,
    fresh_attention_backend,
    layer_backends,
    layer_kv_cache_specs,
    metadata_builder,
)
from .compile import (
    capture_sizes_flag,
    compilation_summary,
    compile_ranges,
    compile_target,
    max_capture_size_flags,
)
from .cudagraphs import (
    GraphDispatch,
    cudagraph_dispatcher,
    dispatch_batch,
    dispatch_derived,
    runner_kind,
    uniform_decode_query_len,
)
from .detect import VllmApiMissing
from .envs import vllm_env, with_env
from .forward import (
    KVLayout,
    attention_layers,
    bind_kv_cache,
    bind_runner_kv_caches,
    block_table,
    build_metadata,
    common_metadata,
    compute_logits,
    custom_ops,
    deep_gemm_scale_layout,
    device_view,
    dummy_batch,
    dummy_sampling_metadata,
    eager,
    forward_context,
    input_batch,
    kv_cache_tensor,
    layer_backend,
    layer_kv_spec,
    profile_runs_attention,
    runner_buffers,
    runner_kv_caches,
    runner_lays_out_kv_caches,
    sampler,
    splitting_ops,
    workspace,
)
from .logs import (
    configure_logging,
    decorate_logs,
    dump_engine_exception,
    log_formatter,
    log_non_default_args,
    prefix_writer,
)
from .models import set_default_torch_dtype
from .moe import (
    activation,
    block_shape,
    call_named,
    chunk_tokens,
    cutlass_index_buffers,
    experts_workspaces,
    fused_moe_launcher,
    fused_moe_module,
    has_workspaces,
    in_dtype,
    moe_chunk_size,
    moe_experts,
    moe_experts_at,
    moe_layer_class,
    moe_selection,
    triton_config_dtype,
    triton_config_lookup,
    triton_experts,
    triton_runs_layer,
)
from .parsing import check_prompt_len, flexible_argument_parser, serve_options, serve_parser
from .prefix_cache import can_evict_cached_blocks, evict_cached_blocks, scheduled_block_ids
from .releases import (
    CI,
    REFERENCE,
    failed_import,
    installed,
    is_verified,
    required_by_module,
    requirements,
    supported,
    venv_python,
)
from .scheduling import (
    batch_queue_size,
    cache_summary,
    full_attention_kv_specs,
    kv_cache_config,
    kv_cache_spec,
    kv_cache_tokens,
    new_request,
    new_scheduler,
    private_config,
    runner_output,
    scheduler_class,
    scheduler_summary,
)
from .speculative import draft_key, draft_vllm_config, drafter_class, mtp_draft, share_with_target
from .switches import kill_switches
