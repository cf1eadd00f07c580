"""diaglib: why vLLM crashes or falls off a cliff at a token boundary."""
