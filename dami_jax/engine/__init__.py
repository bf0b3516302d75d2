"""Continuous batching with a lambda per slot: host loop (engine), device steps, per-slot cache,
materialized thetas, and ``serve`` on top."""
