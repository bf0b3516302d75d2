"""The parameter tree: its layout, HF tensor names, and readable paths.

Params are plain nested dicts (layers a list) so that interpolation, sharding and
checkpointing are each one ``jax.tree`` call. Linear kernels are stored as ``[in, out]``
(HF stores ``[out, in]``) so that the model reads ``x @ kernel``.

    embed            [vocab, hidden]
    layers/i/attn_norm, layers/i/mlp_norm          [hidden]
    layers/i/attn/q  [hidden, heads*head_dim]      (+ q_bias [heads*head_dim])
    layers/i/attn/k, v  [hidden, kv_heads*head_dim] (+ k_bias, v_bias)
    layers/i/attn/o  [heads*head_dim, hidden]      (+ o_bias [hidden])
    layers/i/attn/q_norm, k_norm  [head_dim]       (Qwen3)
    layers/i/mlp/gate, up  [hidden, intermediate];  layers/i/mlp/down [intermediate, hidden]
    a mixture-of-experts layer's mlp instead (experts stacked, so interpolation stays one
    tree_map and the expert axis can be sharded):
    layers/i/mlp/router  [hidden, experts]
    layers/i/mlp/experts/gate, up  [experts, hidden, moe_intermediate];  .../down [experts, moe_intermediate, hidden]
    final_norm       [hidden]
    lm_head          [hidden, vocab]               (absent when embeddings are tied)
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.models.config import ModelConfig

Params = dict[str, Any]

_LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm",),
    "post_attention_layernorm.weight": ("mlp_norm",),
    "self_attn.q_norm.weight": ("attn", "q_norm"),
    "self_attn.k_norm.weight": ("attn", "k_norm"),
    **{f"self_attn.{n}_proj.weight": ("attn", n) for n in "qkvo"},
    **{f"self_attn.{n}_proj.bias": ("attn", f"{n}_bias") for n in "qkvo"},
    **{f"mlp.{n}_proj.weight": ("mlp", n) for n in ("gate", "up", "down")},
    "mlp.gate.weight": ("mlp", "router"),
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("embed",),
    "model.norm.weight": ("final_norm",),
    "lm_head.weight": ("lm_head",),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_NAME = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")  # the Hub's layout: one tensor per expert
# Tensors some exporters write that carry nothing the model needs.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


class TensorPlace(NamedTuple):
    """Where an HF tensor goes: the tree path, whether it is stored transposed ([out, in]), and
    for one expert of a stacked leaf, its index along the leaf's first axis."""

    path: tuple[str | int, ...]
    transposed: bool
    expert: int | None = None


def hf_name_to_path(name: str) -> TensorPlace | None:
    """HF tensor name -> its :class:`TensorPlace`; None for names we do not know."""
    expert = None
    if name in _GLOBAL_TENSORS:
        path = _GLOBAL_TENSORS[name]
    elif (m := _LAYER_NAME.fullmatch(name)) and m.group(2) in _LAYER_TENSORS:
        path = ("layers", int(m.group(1)), *_LAYER_TENSORS[m.group(2)])
    elif m and (e := _EXPERT_NAME.fullmatch(m.group(2))):
        path, expert = ("layers", int(m.group(1)), "mlp", "experts", e.group(2)), int(e.group(1))
    else:
        return None
    is_kernel = name.endswith(".weight") and ("_proj." in name or name == "lm_head.weight" or path[-1] == "router")
    return TensorPlace(path, is_kernel, expert)


def hf_tensor_names(cfg: ModelConfig) -> dict[str, TensorPlace]:
    """HF tensor name -> :class:`TensorPlace` for every parameter of ``cfg`` (one name per expert)."""
    names = list(_GLOBAL_TENSORS)
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.{suffix}" for suffix in _LAYER_TENSORS]
        if cfg.is_moe_layer(i):
            names += [f"model.layers.{i}.mlp.experts.{e}.{n}_proj.weight" for e in range(cfg.num_experts) for n in ("gate", "up", "down")]
    known = {path for path, _ in iter_paths(param_shapes(cfg))}
    places = {name: hf_name_to_path(name) for name in names}
    return {name: place for name, place in places.items() if path_str(place.path) in known}


def param_shapes(cfg: ModelConfig) -> Params:
    """The expected tree for ``cfg``, with shape tuples as leaves."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attn: dict[str, tuple[int, ...]] = {"q": (d, q_dim), "k": (d, kv_dim), "v": (d, kv_dim), "o": (q_dim, d)}
    if cfg.qkv_bias:
        attn.update(q_bias=(q_dim,), k_bias=(kv_dim,), v_bias=(kv_dim,))
    if cfg.o_bias:
        attn["o_bias"] = (d,)
    if cfg.qk_norm:
        attn.update(q_norm=(hd,), k_norm=(hd,))
    mlp = {"gate": (d, cfg.intermediate_size), "up": (d, cfg.intermediate_size), "down": (cfg.intermediate_size, d)}
    e, m = cfg.num_experts, cfg.moe_intermediate_size
    moe = {"router": (d, e), "experts": {"gate": (e, d, m), "up": (e, d, m), "down": (e, m, d)}}

    def layer(i: int) -> Params:
        return {"attn_norm": (d,), "mlp_norm": (d,), "attn": dict(attn), "mlp": _copy(moe if cfg.is_moe_layer(i) else mlp)}

    tree: Params = {
        "embed": (cfg.vocab_size, d),
        "layers": [layer(i) for i in range(cfg.num_layers)],
        "final_norm": (d,),
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = (d, cfg.vocab_size)
    return tree


def _copy(tree):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def path_str(path: tuple[Any, ...]) -> str:
    """('layers', 3, 'attn', 'q') or a jax key path -> 'layers/3/attn/q'."""
    parts = []
    for p in path:
        for attr in ("key", "idx", "name"):
            if hasattr(p, attr):
                p = getattr(p, attr)
                break
        parts.append(str(p))
    return "/".join(parts)


def iter_paths(tree: Params) -> Iterator[tuple[str, Any]]:
    """(readable path, leaf) pairs in tree order."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]:
        yield path_str(path), leaf


def get_path(tree: Params, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: Params, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def init_params(cfg: ModelConfig, key: jax.Array, dtype=np.float32, scale: float = 0.02) -> Params:
    """Random params of the right shapes: normal kernels, unit norms, zero biases."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [p for p, _ in iter_paths(shapes)]
    keys = jax.random.split(key, len(flat))
    leaves = []
    for path, shape, k in zip(paths, flat, keys):
        name = path.rsplit("/", 1)[-1]
        if name.endswith("norm"):
            leaves.append(jax.numpy.ones(shape, dtype))
        elif name.endswith("bias"):
            leaves.append(jax.numpy.zeros(shape, dtype))
        else:
            leaves.append((scale * jax.random.normal(k, shape)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32 [2]: two position-mixed sums of the leaf's bits. Integer sums wrap exactly and do
    not depend on the order of summation, so the digest is the same on any device or sharding."""
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).reshape(-1).astype(jnp.uint32)
    index = jnp.arange(bits.size, dtype=jnp.uint32)
    lanes = []
    for salt, multiplier in ((0x9E3779B9, 0x85EBCA6B), (0x7F4A7C15, 0xC2B2AE35)):
        h = (bits ^ (index * jnp.uint32(salt))) * jnp.uint32(multiplier)
        h = (h ^ (h >> 15)) * jnp.uint32(0x27D4EB2F)
        lanes.append(jnp.sum(h ^ (h >> 13), dtype=jnp.uint32))
    return jnp.stack(lanes)


def fingerprint(params: Params) -> str:
    """A content hash of a parameter tree (paths, shapes, dtypes and every bit of every weight),
    cheap enough to compute on each run: one pass over the weights at memory bandwidth, on the
    device where they live. 16 hex digits; not cryptographic, but any changed weight changes it."""
    digest = hashlib.sha256()
    for path, leaf in iter_paths(params):
        if leaf.dtype.itemsize not in _UNSIGNED:
            raise ValueError(f"parameter {path}: dtype {leaf.dtype} cannot be fingerprinted (1, 2 or 4 bytes per element)")
        digest.update(f"{path}:{leaf.shape}:{leaf.dtype};".encode())
        digest.update(np.asarray(_leaf_digest(leaf)).tobytes())
    return digest.hexdigest()[:16]
