"""The model core: config, parameter trees, the decoder, checkpoints (HF safetensors, GGUF, orbax),
sharding and tokenizers. Depends on nothing else in dami_jax."""
