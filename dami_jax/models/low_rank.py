"""A low-rank update of a checkpoint's linear weights, kept apart from the checkpoint.

``W' = W + A @ B`` for each targeted kernel ``W [in, out]``, with ``A [in, r]`` and ``B [r, out]``.
A fine-tune stored this way ships in a few MB (SmolLM2-135M at rank 8: under 10 MB in float32)
and merges into a full checkpoint at load (:func:`merge_low_rank_exact`, which gives the same bits
on any machine and backend: what a shipped update is checked with). Training never merges:
:func:`apply_low_rank` keeps each update beside its kernel (:class:`LowRankKernel`), and the model
computes ``x @ W + (x @ A) @ B``, whose gradient with respect to A and B never forms W's full
weight gradient (a third less work per step than differentiating through a merged ``W + A @ B``).

The update is a flat dict ``{"layers/3/attn/q": {"a": A, "b": B}}``, keyed by the kernels' tree
paths (:func:`dami_jax.models.params.path_str`), and saved as safetensors (``<path>.a``,
``<path>.b``) with string metadata beside the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from dami_jax.errors import InputError
from dami_jax.files import write_atomic
from dami_jax.models.params import Params, get_path, iter_paths, set_path

LowRank = dict[str, dict[str, jax.Array]]

# Every linear kernel of a decoder layer (embeddings, norms and the head stay as they are).
LINEAR_KERNELS = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")


def target_paths(params: Params, kernels: tuple[str, ...] = LINEAR_KERNELS) -> list[str]:
    """The paths of ``params``' layer kernels named in ``kernels`` (e.g. ``"attn/q"``), in tree order."""
    return [path for path, _ in iter_paths(params) if path.startswith("layers/") and path.split("/", 2)[2] in kernels]


def init_low_rank(params: Params, rank: int, key: jax.Array, kernels: tuple[str, ...] = LINEAR_KERNELS) -> LowRank:
    """A zero update (``B = 0``) with random ``A ~ N(0, 1/in)``, as LoRA starts: the merged
    model equals the base until B moves, and B's first gradients are not zero."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    paths = target_paths(params, kernels)
    if not paths:
        raise ValueError(f"no layer kernel of these params is named in {kernels}")
    update = {}
    for path, k in zip(paths, jax.random.split(key, len(paths))):
        fan_in, fan_out = _kernel(params, path).shape
        a = jax.random.normal(k, (fan_in, rank), jnp.float32) / np.sqrt(fan_in)
        update[path] = {"a": a, "b": jnp.zeros((rank, fan_out), jnp.float32)}
    return update


@flax.struct.dataclass
class LowRankKernel:
    """A kernel ``W [in, out]`` with its update ``A [in, r] @ B [r, out]`` kept apart; the model
    (:func:`dami_jax.models.model.dense`) computes ``x @ W + (x @ A) @ B``."""

    kernel: jax.Array
    a: jax.Array
    b: jax.Array


def apply_low_rank(params: Params, update: LowRank) -> Params:
    """``params`` with each updated kernel a :class:`LowRankKernel` (untouched leaves shared, not
    copied): the model of :func:`merge_low_rank_exact` up to rounding, traceable and
    differentiable in the update, which is how training sees it."""
    return _with_kernels(params, update, LowRankKernel)


def merge_low_rank_exact(params: Params, update: LowRank) -> Params:
    """``params`` with ``A @ B`` added to each updated kernel, computed so that every machine gets
    the same bits: in float64 with numpy, one rank at a time in a fixed order (a float32 x float32
    product is exact in float64, and elementwise adds are not reordered), rounded once to the
    kernel's dtype; untouched leaves are shared, not copied. A BLAS or GPU matmul would sum in an
    order of its own, and so could differ in the last bit."""

    def exact(w, a, b):
        a, b = (np.asarray(jax.device_get(x), np.float64) for x in (a, b))
        total = np.asarray(jax.device_get(w), np.float64)
        for k in range(a.shape[1]):
            total = total + a[:, k, None] * b[None, k, :]
        return jnp.asarray(total.astype(w.dtype))

    return _with_kernels(params, update, exact)


def _with_kernels(params: Params, update: LowRank, merge) -> Params:
    """``params`` (new containers, the same leaves) with each updated kernel ``w`` replaced by
    ``merge(w, a, b)``."""
    merged = jax.tree.map(lambda x: x, params)
    for path, factors in update.items():
        set_path(merged, _keys(path), merge(_kernel(params, path), factors["a"], factors["b"]))
    return merged


def update_bytes(update: LowRank) -> int:
    return sum(int(x.size) * x.dtype.itemsize for f in update.values() for x in f.values())


def save_low_rank(path: str | Path, update: LowRank, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``update`` as one safetensors file, atomically; the same update and metadata are
    the same bytes (a shipped file's sha256 is pinned)."""
    tensors = {f"{p}.{name}": np.asarray(jax.device_get(x)) for p, f in update.items() for name, x in f.items()}
    return write_atomic(path, _sorted_metadata(save(tensors, metadata=dict(metadata or {}))))


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors writes the metadata in hash order, which differs from one process to the next:
    rewrite the header with it sorted (the same length: only the order of its keys changes)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:
        raise AssertionError(f"a sorted safetensors header grew from {size} to {len(text)} bytes")
    return data[:8] + text.ljust(size) + data[8 + size :]


def load_low_rank(path: str | Path) -> tuple[LowRank, dict[str, str]]:
    """(update, metadata) from :func:`save_low_rank`'s file; a file that is not one is named."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, ValueError, SafetensorError) as e:  # missing, unreadable, or not safetensors
        raise InputError(f"{path}: not a low-rank update file ({e})") from None
    update: LowRank = {}
    for key, tensor in tensors.items():
        kernel, _, name = key.rpartition(".")
        if name not in ("a", "b"):
            raise InputError(f"{path}: tensor {key!r} is not a low-rank factor (<kernel path>.a or .b)")
        update.setdefault(kernel, {})[name] = jnp.asarray(tensor)
    if not update or any(set(f) != {"a", "b"} for f in update.values()):
        raise InputError(f"{path}: every kernel needs both factors .a and .b")
    return update, metadata


def check_fits(params: Params, update: LowRank, source: str) -> None:
    """Raise :class:`InputError` naming the first kernel of ``update`` that ``params`` lacks or
    whose shape its factors do not fit."""
    for path, factors in update.items():
        try:
            shape = _kernel(params, path).shape
        except (KeyError, IndexError, ValueError, TypeError):
            raise InputError(f"{source}: the checkpoint has no kernel {path}") from None
        a, b = factors["a"].shape, factors["b"].shape
        if len(a) != 2 or len(b) != 2 or (a[0], b[1]) != tuple(shape) or a[1] != b[0]:
            raise InputError(f"{source}: {path} factors {a} @ {b} do not fit its kernel {tuple(shape)}")


def _keys(path: str) -> tuple[str | int, ...]:
    return tuple(int(p) if p.isdigit() else p for p in path.split("/"))


def _kernel(params: Params, path: str) -> jax.Array:
    return get_path(params, _keys(path))
