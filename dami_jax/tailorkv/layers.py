"""TailorKV's per-layer device state (quantized and sparse layers), what starts a row in each
from its prompt store, and the helpers the decode steps share: the quantized layers' ring and
the sparse layers' channel and token estimates."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dami_jax.models.sharding import AXIS
from dami_jax.tailorkv.prompt_store import PROMPT_BLOCK, PromptStore
from dami_jax.tailorkv.quant import quantize_keys, quantize_values
from dami_kernels.packing import QuantizedKeys, QuantizedValues

def ring_slots(n: jax.Array, window: int) -> jax.Array:
    """int32 [B, window]: the token slot each ring entry holds in a row of n [B] tokens (the
    newest, n - 1, and the window - 1 before it; negative: empty)."""
    newest = n[:, None] - 1
    return newest - (newest - jnp.arange(window)[None, :]) % window


def gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, Hkv, S, hd] at per-row token indices [B, N] -> [B, Hkv, N, hd]."""
    return jnp.take_along_axis(x, index[:, None, :, None], axis=2)


def serve_dequantized(k_window: jax.Array, block: QuantizedKeys, block_start: jax.Array, n: jax.Array, apply: jax.Array) -> jax.Array:
    """The ring with the keys of R-block [block_start, block_start + R) (quantized as ``block``)
    replaced by their dequantized values, in rows where ``apply`` [B] holds."""
    window = k_window.shape[2]
    slots = ring_slots(n, window)
    offset = slots - block_start[:, None]
    inside = apply[:, None] & (offset >= 0) & (offset < block.num_tokens)
    dequantized = gather_tokens(block.dequantize(k_window.dtype), jnp.clip(offset, 0, block.num_tokens - 1))
    return jnp.where(inside[:, None, :, None], dequantized, k_window)


def largest(x: jax.Array, k: int, head_mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(x, k)`` of x [B, Hkv, N]. On ``head_mesh`` (the mesh its heads are split
    over) each device selects for its own heads: XLA does not split TopK along its batch axes,
    and would gather every head's x onto every device."""
    if head_mesh is None:
        return jax.lax.top_k(x, k)
    heads = P(None, AXIS)
    return jax.shard_map(lambda part: tuple(jax.lax.top_k(part, k)), mesh=head_mesh, in_specs=heads, out_specs=(heads, heads))(x)


def select_channels(query: jax.Array, k_absmax: jax.Array, num_channels: int, head_mesh: Mesh | None = None) -> jax.Array:
    """query [B, 1, Hq, hd], k_absmax [B, Hkv, hd] -> int32 [B, Hkv, num_channels]: the channels
    with the largest |mean over the GQA group of q_i| * max|K_i| (:func:`largest`)."""
    b, _, hq, hd = query.shape
    hkv = k_absmax.shape[1]
    group_mean = query[:, 0].reshape(b, hkv, hq // hkv, hd).mean(axis=2)
    return largest(jnp.abs(group_mean) * k_absmax, num_channels, head_mesh)[1].astype(jnp.int32)


def token_scores(q_channels: jax.Array, channel_rows: jax.Array, mode: str) -> jax.Array:
    """q_channels [B, Hkv, G, C] (a KV group's queries at its chosen channels), channel_rows
    [B, Hkv, C, P] (those channels of every prompt key) -> float32 [B, Hkv, P] partial scores,
    one per KV head and token (see ``TailorKVConfig.token_score``)."""
    rows = channel_rows.astype(jnp.float32)
    if mode == "group_mean":
        return jnp.einsum("bhc,bhcp->bhp", q_channels.astype(jnp.float32).mean(axis=2), rows)
    return jnp.einsum("bhgc,bhcp->bhgp", q_channels.astype(jnp.float32), rows).max(axis=2)


@flax.struct.dataclass
class QuantizedLayerCache:
    """Row b's n_b tokens (n_b = length[b]) sit at slots 0..n_b-1 of its row."""

    keys: QuantizedKeys  # [B, Hkv, C, hd], C = tokens per row rounded up to R; slots of whole R-blocks are final
    values: QuantizedValues  # [B, Hkv, C, hd]; each token's codes are written when it arrives
    k_window: jax.Array  # [B, Hkv, R + 1, hd] ring: slot s at s % (R + 1); dequantized once its key is quantized
    v_window: jax.Array  # [B, Hkv, R + 1, hd] ring of exact values


@flax.struct.dataclass
class SparseLayerCache:
    """A sparse layer's device part; its prompt K/V are in the layer's :class:`PromptStore`."""

    k_absmax: jax.Array  # [B, Hkv, hd] per-channel max |K| over the row's prompt tokens
    k_window: jax.Array  # [B, Hkv, sink + recent, hd]
    v_window: jax.Array
    window_mask: jax.Array  # bool [B, sink + recent]: real, non-duplicate tokens
    k_gen: jax.Array  # [B, Hkv, G, hd] generated tokens
    v_gen: jax.Array
    channels: jax.Array  # int32 [B, Hkv, num_channels], chosen from the lookahead query


def start_quantized(state: QuantizedLayerCache, store: PromptStore, rows: jax.Array, safe: jax.Array, count: jax.Array, *,
                    residual: int, quantize: dict, offload: bool) -> QuantizedLayerCache:  # fmt: skip
    """Quantize rows' prompts (count [n] tokens each; ``rows`` [n] to write, ``safe`` [n] to read)
    R-block by R-block from the store; the ring takes the last R + 1 tokens, the keys of the last
    whole R-block among them dequantized. ``quantize``: quantize_keys' options."""
    r = residual

    def add_block(i, stores):
        keys, values = stores
        k, v = store.read_rows(safe, i * r, r, offload)
        return keys.update_rows(quantize_keys(k, **quantize), rows, i * r), values.update_rows(quantize_values(v, **quantize), rows, i * r)

    blocks = (jnp.max(count) + r - 1) // r
    keys, values = jax.lax.fori_loop(0, blocks, add_block, (state.keys, state.values))
    k_ring, v_ring = store.tokens(safe, jnp.clip(ring_slots(count, r + 1), 0), offload)
    last_block = jnp.maximum(count // r * r - r, 0)  # the last whole R-block (the ring reaches no earlier one)
    block = quantize_keys(store.tokens(safe, last_block[:, None] + jnp.arange(r), offload)[0], **quantize)
    k_ring = serve_dequantized(k_ring, block, last_block, count, count >= r)
    return state.replace(keys=keys, values=values, k_window=state.k_window.at[rows].set(k_ring, mode="drop"),
                         v_window=state.v_window.at[rows].set(v_ring.astype(state.v_window.dtype), mode="drop"))  # fmt: skip


def start_sparse(state: SparseLayerCache, store: PromptStore, rows: jax.Array, safe: jax.Array, count: jax.Array, *,
                 sink: int, recent: int, offload: bool) -> SparseLayerCache:  # fmt: skip
    """Rows' per-channel max |K| over their prompts (read block by block), and their sink and
    recent windows."""

    def add_block(i, absmax):
        k, _ = store.read_rows(safe, i * PROMPT_BLOCK, PROMPT_BLOCK, offload)
        real = i * PROMPT_BLOCK + jnp.arange(PROMPT_BLOCK)[None, :] < count[:, None]  # [n, block]
        return jnp.maximum(absmax, jnp.max(jnp.where(real[:, None, :, None], jnp.abs(k.astype(jnp.float32)), 0.0), axis=2))

    blocks = (jnp.max(count) + PROMPT_BLOCK - 1) // PROMPT_BLOCK
    absmax = jax.lax.fori_loop(0, blocks, add_block, jnp.zeros((rows.shape[0], *state.k_absmax.shape[1:]), jnp.float32))
    sink_slots = jnp.broadcast_to(jnp.arange(sink), (rows.shape[0], sink))
    recent_slots = count[:, None] - recent + jnp.arange(recent)[None, :]
    mask = jnp.concatenate([sink_slots < count[:, None], (recent_slots >= sink) & (recent_slots >= 0)], axis=1)
    k, v = store.tokens(safe, jnp.clip(jnp.concatenate([sink_slots, recent_slots], axis=1), 0, store.capacity - 1), offload)

    def put(current: jax.Array, new: jax.Array) -> jax.Array:
        return current.at[rows].set(new.astype(current.dtype), mode="drop")

    return state.replace(k_absmax=put(state.k_absmax, absmax), k_window=put(state.k_window, k),
                         v_window=put(state.v_window, v), window_mask=put(state.window_mask, mask))  # fmt: skip
