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
- :mod:`.models`: model building, MoE layers and kernels
- :mod:`.attention`: attention backend selection
- :mod:`.switches`: kill-switch spellings
"""
from .attention import (
    attention_backend,
    attention_backend_class,
    fresh_attention_backend,
)
from .compile import (
    capture_sizes_flag,
    compilation_summary,
    compile_target,
    max_capture_size_flags,
)
from .cudagraphs import (
    cudagraph_dispatcher,
    dispatch_batch,
    dispatch_derived,
    uniform_decode_query_len,
)
from .detect import VllmApiMissing
from .models import (
    cutlass_index_buffers,
    experts_workspaces,
    moe_backend_of,
    moe_chunk_size,
    moe_experts,
    set_default_torch_dtype,
    triton_config_dtype,
    triton_experts,
)
from .parsing import check_prompt_len, flexible_argument_parser
from .prefix_cache import can_evict_cached_blocks, evict_cached_blocks, scheduled_block_ids
from .releases import CI, REFERENCE, installed, is_verified, supported, venv_python
from .scheduling import (
    batch_queue_size,
    cache_summary,
    kv_cache_config,
    kv_cache_spec,
    new_request,
    new_scheduler,
    private_config,
    runner_output,
    scheduler_summary,
)
from .switches import kill_switches
