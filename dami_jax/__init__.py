"""dami-jax: dynamic model interpolation and tailored KV caches for reasoning LLMs, in JAX.

The public API (``dj.*``) is listed below. Names are imported on first use, so that importing the
package (and running ``dami-jax --help``) does not pay for jax and transformers up front.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

__version__ = metadata.version("dami-jax")

_PUBLIC = {
    "dami_jax.models.checkpoint": ("CheckpointError", "load_checkpoint", "save_checkpoint", "save_hf_checkpoint"),
    "dami_jax.models.config": ("ConfigError", "ModelConfig"),
    "dami_jax.models.model": ("KVCache", "decoder", "forward", "lm_logits", "observe_layers"),
    "dami_jax.models.params": ("fingerprint", "init_params", "param_shapes", "path_str"),
    "dami_jax.models.sharding": ("make_mesh", "shard_params"),
    "dami_jax.decoding.cache": ("DenseCacheConfig", "DenseKVCache"),
    "dami_jax.decoding.generation": ("Generation", "generate", "stream_text", "stream_tokens"),
    "dami_jax.decoding.sampling": ("GREEDY", "Sampling"),
    "dami_jax.dami.interpolation": ("interpolate", "task_vector"),
    "dami_jax.dami.pair": ("ModelPair", "load_pair"),
    "dami_jax.engine.engine": ("Engine",),
    "dami_jax.engine.serve": ("serve",),
    "dami_jax.tailorkv.cache": ("TAILORKV_1", "TAILORKV_2", "TailorKVConfig"),
    "dami_jax.toy.pair": ("load_toy_pair",),
    "dami_jax.errors": ("InputError",),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'dami_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from dami_jax.dami.interpolation import interpolate, task_vector  # noqa: F401
    from dami_jax.dami.pair import ModelPair, load_pair  # noqa: F401
    from dami_jax.decoding.cache import DenseCacheConfig, DenseKVCache  # noqa: F401
    from dami_jax.decoding.generation import Generation, generate, stream_text, stream_tokens  # noqa: F401
    from dami_jax.decoding.sampling import GREEDY, Sampling  # noqa: F401
    from dami_jax.engine.engine import Engine  # noqa: F401
    from dami_jax.engine.serve import serve  # noqa: F401
    from dami_jax.errors import InputError  # noqa: F401
    from dami_jax.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_hf_checkpoint  # noqa: F401
    from dami_jax.models.config import ConfigError, ModelConfig  # noqa: F401
    from dami_jax.models.model import KVCache, decoder, forward, lm_logits, observe_layers  # noqa: F401
    from dami_jax.models.params import fingerprint, init_params, param_shapes, path_str  # noqa: F401
    from dami_jax.models.sharding import make_mesh, shard_params  # noqa: F401
    from dami_jax.tailorkv.cache import TAILORKV_1, TAILORKV_2, TailorKVConfig  # noqa: F401
    from dami_jax.toy.pair import load_toy_pair  # noqa: F401
