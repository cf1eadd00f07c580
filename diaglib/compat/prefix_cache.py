"""Prefix-cache housekeeping between two replays on one scheduler: which KV blocks a step handed to the workers,
and evicting their hashes from vLLM's prefix cache with vLLM's own ``KVCacheManager.evict_blocks``."""
from __future__ import annotations

from collections.abc import Iterator

from .detect import has


def can_evict_cached_blocks() -> bool:
    """Whether this vLLM's KV-cache manager can evict chosen blocks from its prefix cache (0.13 on)."""
    return has("vllm.v1.core.kv_cache_manager:KVCacheManager.evict_blocks")


def scheduled_block_ids(out) -> Iterator[int]:
    """The block ids a SchedulerOutput hands to the workers: new requests' block tables and the blocks added to
    running (or resumed) requests, every KV-cache group."""
    for req in out.scheduled_new_reqs:
        for group in req.block_ids:
            yield from group
    for new in out.scheduled_cached_reqs.new_block_ids:
        for group in new or ():
            yield from group


def evict_cached_blocks(scheduler, block_ids: set[int]) -> None:
    """Drop these blocks' hashes from the scheduler's prefix cache (blocks in use stay allocated)."""
    scheduler.kv_cache_manager.evict_blocks(block_ids)
