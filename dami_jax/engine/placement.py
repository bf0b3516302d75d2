"""The engine on a device mesh: where the pair and the slots' state live, and what memory the slots
may take.

The pair is tensor-parallel (:func:`dami_jax.models.sharding.param_shardings`: attention over
heads, the MLP over its intermediate dimension, experts over the expert axis). The slots' KV is
split over KV heads, as attention is, and replicated where the mesh axis does not divide them: the
dense cache [slots, Hkv, capacity, hd], and every per-head array of a TailorKV slot (quantized
codes, windows, critical channels, and the prompt stores, which stay in host memory: each device's
heads in its own host memory). The rest of the state (per-slot settings, tokens, counters) is
replicated. The steps' output state is pinned to the same shardings
(:func:`~dami_jax.engine.steps.jitted_steps`), so that a mesh adds no compilation.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dami_jax.dami.pair import ModelPair
from dami_jax.distributed import least
from dami_jax.engine.memory import free_memory
from dami_jax.engine.steps import SlotState
from dami_jax.models.config import ModelConfig
from dami_jax.models.sharding import AXIS, auto_axes, param_shardings


def mesh_of(pair: ModelPair) -> Mesh | None:
    """The tensor-parallel mesh ``pair`` was loaded onto (``load_pair(..., mesh=...)``), if any: an
    engine given such a pair runs on that mesh without being told."""
    sharding = jax.tree.leaves(pair.instruct)[0].sharding
    if isinstance(sharding, NamedSharding) and AXIS in sharding.mesh.shape and len(sharding.device_set) > 1:
        return sharding.mesh
    return None


def pair_on_mesh(pair: ModelPair, mesh: Mesh) -> ModelPair:
    """``pair`` with both endpoints placed on ``mesh`` (already placed leaves do not move)."""
    shardings = param_shardings(pair.cfg, mesh)
    return dataclasses.replace(pair, instruct=jax.device_put(pair.instruct, shardings), thinking=jax.device_put(pair.thinking, shardings))


def kv_split(cfg: ModelConfig, mesh: Mesh) -> int:
    """How many devices share one slot's KV cache: the mesh axis, when it divides the KV heads."""
    size = mesh.shape[AXIS]
    return size if cfg.num_kv_heads % size == 0 else 1


def state_shardings(state: SlotState, cfg: ModelConfig, mesh: Mesh) -> SlotState:
    """A tree of ``NamedSharding`` matching ``state``, each leaf in its own memory kind (TailorKV's
    prompt stores stay in host memory): the cache's per-head arrays [slots, Hkv, ...] split over KV
    heads where the mesh divides them, the rest replicated."""
    mesh, heads = auto_axes(mesh), heads_spec(cfg, mesh)  # as the params' shardings have it

    def sharding(path, leaf):
        names = [getattr(p, "name", None) for p in path]
        per_head = names[0] == "cache" and leaf.ndim >= 3 and leaf.shape[1] == cfg.num_kv_heads
        return NamedSharding(mesh, heads if per_head else P(), memory_kind=leaf.sharding.memory_kind)

    return jax.tree_util.tree_map_with_path(sharding, state)


def store_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """Where TailorKV's host prompt stores [slots, Hkv, ...] are allocated on ``mesh``: as
    :func:`state_shardings` places them, so that no store is ever whole on one device's host."""
    return NamedSharding(auto_axes(mesh), heads_spec(cfg, mesh), memory_kind="pinned_host")


def heads_spec(cfg: ModelConfig, mesh: Mesh) -> P:
    """How an array [slots, Hkv, ...] is laid out on ``mesh``: split over KV heads where the mesh divides them."""
    return P(None, AXIS) if kv_split(cfg, mesh) > 1 else P()


def mesh_free_memory(cfg: ModelConfig, mesh: Mesh) -> tuple[int, str]:
    """(bytes the slots' KV may count on, where): the least free device's memory times the devices
    a slot's KV is split over; on virtual CPU devices, the host's memory once (they share it). A
    process reads its own devices; on a mesh over several processes they agree on the least, so
    that every process sizes the same engine."""
    devices = [device for device in mesh.devices.flat if device.process_index == jax.process_index()]
    agree = least if len(devices) < mesh.devices.size else int
    free = [free_memory(device) for device in devices]
    if any(where == "host memory" for _, where in free):
        return agree(free[0][0]), free[0][1]
    split = kv_split(cfg, mesh)
    return agree(min(n for n, _ in free)) * split, f"{free[0][1]} ({split} of {mesh.devices.size} devices share each slot)"
