"""Needle in a haystack for KV caches: the cases, transformers' quantized-cache baseline, the runner."""
