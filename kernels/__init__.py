"""Pallas / jax-triton kernels, installed as ``dami_jax.kernels``.

Each kernel sits behind a pure-jnp reference in the main package and is tested against it.
GPU-only modules import ``jax_triton`` lazily: it raises ImportError on CPU-only JAX.
"""
