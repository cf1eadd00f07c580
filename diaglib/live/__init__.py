"""Live runs on a GPU: load the scenario's model into vLLM (real weights or a TP-rank stand-in) and fire
crash-isolated probes at exact token counts.

Modules, lowest first: ``classify`` (outcome of a finished child), ``store`` (append-only JSONL records),
``observe`` (NVML timeline, logged figures, memory summary, kernel table), ``standin`` (rank-equivalent
config), ``checkpoint`` (small real checkpoints), ``planted`` (planted faults), ``engine`` (what the child
builds and runs), ``child`` (the child process), ``probe`` (the parent-side runner), ``compare``
(predicted against observed).
"""
