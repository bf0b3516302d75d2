"""Evaluations: benchmarks, grading, prompts, crash-safe result folders, lambda sweeps and their
frontier, needle in a haystack, and plots. Depends on models, decoding, dami and tailorkv."""
