"""What vLLM decides: analyzers over a resolved scenario, answered on the CPU by vLLM's own objects."""
