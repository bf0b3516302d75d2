"""dami-jax: dynamic model interpolation and tailored KV caches for reasoning LLMs, in JAX."""

from dami_jax.cache import DenseCacheConfig, DenseKVCache, KVCache
from dami_jax.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_hf_checkpoint
from dami_jax.config import ConfigError, ModelConfig
from dami_jax.generation import Generation, generate, stream_text, stream_tokens
from dami_jax.interpolation import interpolate, task_vector
from dami_jax.model import decoder, forward, lm_logits
from dami_jax.params import init_params, param_shapes, path_str
from dami_jax.sampling import GREEDY, Sampling
from dami_jax.sharding import make_mesh, shard_params

__all__ = [
    "CheckpointError", "ConfigError", "DenseCacheConfig", "DenseKVCache", "GREEDY", "Generation", "KVCache", "ModelConfig",
    "Sampling", "decoder", "forward", "generate", "interpolate", "task_vector", "lm_logits", "load_checkpoint", "make_mesh",
    "init_params", "param_shapes", "path_str", "save_checkpoint", "save_hf_checkpoint", "shard_params", "stream_text",
    "stream_tokens",
]  # fmt: skip
