"""Decode-attention kernels (Pallas and Triton), each beside its pure-jnp reference and taking
the reference's arguments:

- :mod:`.quant_attention` (Pallas): one query step against KIVI codes plus the full-precision
  residual, dequantized tile by tile (ref. ``dami_jax.tailorkv.quant_attention``);
- :mod:`.decode_attention` (Pallas): full-precision attention over one or more KV segments
  (ref. ``dami_jax.models.attention.attention``);
- :mod:`.sparse_scores` (Pallas): a sparse layer's token scores at its critical channels
  (ref. ``dami_jax.tailorkv.cache.token_scores``);
- :mod:`.triton_attention` (Triton, through jax-triton): the quantized attention again.

They share one block algorithm (:mod:`.blocks`: flash-decoding partials merged at the end) and
read the packed format of :mod:`.packing`. The Pallas kernels target Pallas' Triton lowering on
GPU and run anywhere with ``interpret=True``.

Where this package sits: the repository's top-level ``kernels/`` folder, as the design card has
it, under an import name of its own (``dami_kernels``, mapped by ``package-dir`` in
pyproject.toml). ``kernels/`` itself has no ``__init__.py`` and must never get one: transformers
(5.25 on) imports PyPI's ``kernels`` package, and a regular package named ``kernels`` at the
repository root (on ``sys.path`` under ``python -m pytest`` or in a notebook started there) would
shadow it and break every model load, while a folder without ``__init__.py`` loses to it.

Dependencies: the kernels sit below the caches that call them (``dami_jax.tailorkv``, the
engine) and import only ``dami_jax.models`` (``MASKED_SCORE``); the packed format is defined
here, and ``dami_jax.tailorkv.quant`` fills it.
"""
