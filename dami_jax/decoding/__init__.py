"""Decoding: the dense KV cache and cache configs, batched generation and streaming, sampling, and
teacher-forced scoring. Depends on models only."""
