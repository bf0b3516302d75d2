"""Tensor parallelism with JAX itself: params placed on a ``Mesh``, XLA/GSPMD does the rest.

Attention is split over heads (q/k/v columns, o rows) and the MLP over its intermediate
dimension (gate/up columns, down rows), a mixture of experts over its experts (whole experts per
device; the router replicated); embeddings, norms and biases of unsplit outputs are
replicated. A weight whose split axis does not divide evenly (e.g. fewer KV heads than
devices) stays replicated rather than failing.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dami_jax.models.config import ModelConfig
from dami_jax.models.params import Params, param_shapes

AXIS = "tp"
# Which axis of each parameter is split across the mesh (None: replicated).
_SPLIT_AXIS = {"q": 1, "k": 1, "v": 1, "o": 0, "q_bias": 0, "k_bias": 0, "v_bias": 0, "gate": 1, "up": 1, "down": 0}


def make_mesh(devices=None) -> Mesh:
    """A 1-D tensor-parallel mesh over ``devices`` (default: all)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (AXIS,), (AxisType.Auto,), devices=devices)


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with Auto (GSPMD) axes, checked to have the tensor-parallel axis."""
    if AXIS not in mesh.shape:
        raise ValueError(f"mesh: needs an axis named {AXIS!r} (see dami_jax.make_mesh), got {tuple(mesh.shape)}")
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    """A tree of ``NamedSharding`` matching :func:`param_shapes`.

    The mesh is used with Auto (GSPMD) axes whatever it was built with: under Explicit axes
    (``jax.make_mesh``'s default) sharding-in-types rejects the model's head reshapes.
    """
    mesh = auto_axes(mesh)
    size = mesh.shape[AXIS]

    def sharding(path, shape):
        keys = [getattr(p, "key", None) for p in path]
        name = keys[-1]
        axis = 0 if keys[-2:-1] == ["experts"] else _SPLIT_AXIS.get(name)  # experts: whole experts per device
        # Heads must not straddle devices: split only whole heads (or whole MLP columns).
        unit = cfg.head_dim if name in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias") else 1
        if axis is None or (shape[axis] // unit) % size:
            return NamedSharding(mesh, P())
        spec = [None] * len(shape)
        spec[axis] = AXIS
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(sharding, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """Place ``params`` on ``mesh`` with :func:`param_shardings`."""
    return jax.device_put(params, param_shardings(cfg, mesh))
