"""The kernel package, installed as ``dami_jax.kernels`` (never as a top-level ``kernels``: that
name is taken on PyPI). It holds no kernel yet; the library runs on its pure-jnp code paths."""
