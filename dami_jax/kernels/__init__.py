"""Decode-attention kernels for the TailorKV cache. Each sits beside its pure-jnp reference and
takes the reference's arguments:

- :mod:`.quant_attention` (Pallas): one query step against KIVI codes plus the full-precision
  residual, dequantized tile by tile (ref. ``dami_jax.tailorkv.quant_attention``);
- :mod:`.decode_attention` (Pallas): full-precision attention over one or more KV segments
  (ref. ``dami_jax.models.attention.attention``);
- :mod:`.sparse_scores` (Pallas): a sparse layer's token scores at its critical channels
  (ref. ``dami_jax.tailorkv.cache.token_scores``);
- :mod:`.triton_attention` (Triton, through jax-triton): the quantized attention again.

They share one block algorithm (:mod:`.blocks`: flash-decoding partials merged at the end). The
Pallas kernels target Pallas' Triton lowering on GPU and run anywhere with ``interpret=True``.

They live inside the package, never in a top-level ``kernels/`` folder: transformers (5.25 on)
depends on the PyPI package ``kernels``, which such a folder shadows whenever the repository root
is on ``sys.path`` (``python -m pytest``, a notebook started there), breaking every model load.
"""
