"""Inputs shared by the kernel tests: decode-attention cases in the caches' layouts, rows of
very different live lengths with whatever past them (NaN), a float64 reference over live slots,
and a launcher that runs a Triton :class:`Launch` on torch CPU tensors (Triton's interpreter)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from dami_jax.models.attention import MASKED_SCORE
from dami_jax.tailorkv.quant import quantize_keys, quantize_values
from dami_kernels.packing import codes_per_word

# Interpret mode compiles every new shape (~2-4 s on 2 cores): few examples, no deadline.
FEW = settings(deadline=None, max_examples=8)
SEEDS = st.integers(0, 2**31 - 1)
BITS = st.sampled_from([1, 2, 4])
GQA = st.sampled_from([1, 2, 3, 4, 17])  # query heads per KV head: 17 needs 32 padded rows
BLOCKS = st.sampled_from([16, 32])
SPLITS = st.sampled_from([1, 2, 3, 16])
SCALE_DTYPES = st.sampled_from([jnp.float16, jnp.bfloat16, jnp.float32])

# Same float32 products as the references, summed in another order (blocks merged by their
# max): a few float32 ulps of the output's magnitude.
TOLERANCE = 1e-5


def gaussian(rng: np.random.Generator, shape, dtype=jnp.float32) -> jnp.ndarray:
    """Normal data with a random magnitude and offset, so scores span a wide range."""
    return jnp.asarray(rng.normal(size=shape) * 10.0 ** rng.uniform(-1, 0.5) + rng.uniform(-1, 1), dtype)


def prefix_mask(rng: np.random.Generator, batch: int, length: int) -> jnp.ndarray:
    """bool [B, 1, length]: row b sees its first n_b slots, n_b drawn in [0, length] (rows of
    different lengths; an empty row too)."""
    n = rng.integers(0, length + 1, size=batch)
    return jnp.asarray(np.arange(length)[None, None, :] < n[:, None, None])


def edge_lengths(capacity: int) -> list[int]:
    """Live lengths at the edges of 64-token blocks and of the capacity: 0 (an idle slot), 1, 63,
    64, 65, S - 1, S (those in [0, S])."""
    return sorted({n for n in (0, 1, 63, 64, 65, capacity - 1, capacity) if 0 <= n <= capacity})


def lengths_strategy(capacity: int, batch: int) -> st.SearchStrategy:
    """int32 [batch] live lengths in [0, capacity], edges (:func:`edge_lengths`) drawn often."""
    one = st.sampled_from(edge_lengths(capacity)) | st.integers(0, capacity)
    return st.lists(one, min_size=batch, max_size=batch).map(lambda n: np.asarray(n, np.int32))


def past(lengths, x: np.ndarray, fill=np.nan) -> np.ndarray:
    """``x`` [B, H, S, ...] with every slot at or past its row's length set to ``fill``: what a
    kernel that reads only live slots never sees (a NaN it read would reach the output through
    0 * NaN in the probabilities' product with V)."""
    x = np.array(x)
    dead = np.arange(x.shape[2])[None, :] >= np.asarray(lengths)[:, None]  # [B, S]
    x[np.broadcast_to(dead[:, None], x.shape[:3])] = fill
    return x


def spare(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` [B, ...] with ``rows`` more rows of NaN after its own (a cache larger than the batch)."""
    x = np.asarray(x)
    return np.concatenate([x, np.full((rows, *x.shape[1:]), np.nan, x.dtype)])


def dense_strategies(dtypes=st.sampled_from([jnp.float32, jnp.bfloat16])) -> dict:
    """``@given`` keywords for a per-slot dense cache with rows of drawn lengths (the Pallas and
    Triton tests draw the same space; build it with :func:`draw_dense_case`)."""
    return dict(seed=SEEDS, capacity=st.integers(1, 200), batch=st.integers(1, 4), kv_heads=st.integers(1, 2), gqa=GQA,
                head_dim=st.sampled_from([16, 32]), dtype=dtypes, block=st.sampled_from([16, 32, 64]), splits=SPLITS,
                data=st.data())  # fmt: skip


def draw_dense_case(data, seed: int, capacity: int, batch: int, kv_heads: int, gqa: int, head_dim: int, dtype):
    """(q, k, v, lengths) of :func:`dense_case`, with lengths drawn by :func:`lengths_strategy`."""
    lengths = data.draw(lengths_strategy(capacity, batch), label="lengths")
    return *dense_case(seed, lengths, kv_heads, gqa, capacity, head_dim, dtype), lengths


def edge_case(gqa: int) -> tuple:
    """(q, k, v, lengths): rows of lengths 0 (an idle slot), 1, 63, 64, 65, S - 1 and S (S = 160)."""
    lengths = np.asarray(edge_lengths(160), np.int32)
    return *dense_case(0, lengths, 2, gqa, 160, 16, jnp.float32), lengths


def dense_case(seed: int, lengths: np.ndarray, kv_heads: int, gqa: int, capacity: int, head_dim: int, dtype):
    """q [B, 1, Hq, hd]; k, v [B, Hkv, S, hd] in ``dtype``, NaN in every slot past its row's length."""
    rng = np.random.default_rng(seed)
    q = gaussian(rng, (len(lengths), 1, kv_heads * gqa, head_dim))
    k, v = (past(lengths, gaussian(rng, (len(lengths), kv_heads, capacity, head_dim), dtype)) for _ in range(2))
    return q, jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def dense_reference64(q, k, v, lengths) -> tuple[np.ndarray, np.ndarray]:
    """:func:`reference64` over one dense cache read up to each row's length."""
    return reference64(q, [(k, v, None, lengths)])


def reference64(q, segments) -> tuple[np.ndarray, np.ndarray]:
    """Decode attention in float64 over the segments' live slots -> (float64 [B, 1, Hq, hd], bool
    [B]: rows with a live slot). q [B, 1, Hq, hd]; segments of (k, v [B, Hkv, S_j, hd] (a store
    dequantized), mask bool [B, S_j], [B, 1, S_j] or [B, Hkv, S_j] or None, lengths [B] or None).
    Live slots the mask hides score MASKED_SCORE; slots past a row's length are never read (they
    may hold NaN); a row with no live slot gives zeros."""
    q = np.asarray(q, np.float64)
    b, _, hq, hd = q.shape
    hkv = segments[0][0].shape[1]
    rows = q[:, 0].reshape(b, hkv, hq // hkv, hd) * hd**-0.5
    scores, values, alive = [], [], []
    for k, v, mask, lengths in segments:
        size = k.shape[2]
        n = np.full(b, size) if lengths is None else np.clip(np.asarray(lengths), 0, size)
        live = np.broadcast_to((np.arange(size)[None, :] < n[:, None])[:, None], (b, hkv, size))
        k, v = (np.where(live[..., None], np.asarray(x, np.float64), 0.0) for x in (k, v))
        s = np.einsum("bhgd,bhsd->bhgs", rows, k)
        if mask is not None:
            s = np.where(np.asarray(mask).reshape(b, -1, 1, size), s, MASKED_SCORE)
        scores.append(np.where(live[:, :, None], s, -np.inf))
        values.append(v)
        alive.append(n > 0)
    s = np.concatenate(scores, axis=-1)
    top = s.max(axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    norm = p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhgs,bhsd->bhgd", p, np.concatenate(values, axis=2)) / np.where(norm > 0, norm, 1.0)
    return out.reshape(b, 1, hq, hd), np.any(alive, axis=0)


def assert_matches_reference64(out, reference: tuple[np.ndarray, np.ndarray]) -> None:
    """Finite everywhere, zeros in rows without a live slot, TOLERANCE elsewhere."""
    want, alive = reference
    out = np.asarray(out, np.float64)
    assert out.shape == want.shape and np.isfinite(out).all()
    np.testing.assert_array_equal(out[~alive], 0.0)
    if alive.any():
        err = np.max(np.abs(out[alive] - want[alive])) / np.max(np.abs(want[alive]))
        assert err <= TOLERANCE, err


def quantized_strategies(scale_dtypes=SCALE_DTYPES) -> dict:
    """``@given`` keywords for a quantized store + residual case (the Pallas and Triton tests
    draw the same space; draw the groups with :func:`draw_groups`)."""
    return dict(seed=SEEDS, batch=st.integers(1, 2), kv_heads=st.integers(1, 2), gqa=GQA, k_bits=BITS, v_bits=BITS,
                key_groups=st.integers(1, 3), residual=st.integers(1, 20), scale_dtype=scale_dtypes, block=BLOCKS,
                data=st.data())  # fmt: skip


def draw_groups(data, k_bits: int) -> tuple[int, int]:
    """(key group, value group): key groups of whole words up to 64 tokens, value groups 8-32."""
    k_group = data.draw(st.sampled_from(group_choices(k_bits, 64)), label="k_group")
    return k_group, data.draw(st.sampled_from([8, 16, 32]), label="v_group")


def group_choices(bits: int, limit: int) -> list[int]:
    """Power-of-two key groups of whole ``bits``-bit words, up to ``limit``."""
    return [g for g in (8, 16, 32, 64) if g % codes_per_word(bits) == 0 and g <= limit]


def quantized_case(seed: int, batch: int, kv_heads: int, gqa: int, head_dim: int, store: int, residual: int):
    """Float inputs for the reference: q, k, v (the store: ``store`` tokens), k_res, v_res
    (``residual`` tokens), mask_quant, mask_res (rows of different lengths). Quantize them with
    :func:`quantize_case` inside the test's jit (eager quantization compiles op by op)."""
    rng = np.random.default_rng(seed)
    q = gaussian(rng, (batch, 1, kv_heads * gqa, head_dim))
    k, v = (gaussian(rng, (batch, kv_heads, store, head_dim)) for _ in range(2))
    k_res, v_res = (gaussian(rng, (batch, kv_heads, residual, head_dim)) for _ in range(2))
    return q, k, v, k_res, v_res, prefix_mask(rng, batch, store), prefix_mask(rng, batch, residual)


def quantize_case(case, k_bits: int, k_group: int, v_bits: int, v_group: int, scale_dtype):
    """:func:`quantized_case`'s inputs with the store quantized: the reference's arguments."""
    q, k, v, *rest = case
    return q, quantize_keys(k, k_bits, k_group, scale_dtype), quantize_values(v, v_bits, v_group, scale_dtype), *rest


def draw_quantized_lengths_case(data, seed: int, batch: int, kv_heads: int, gqa: int, k_bits: int, v_bits: int,
                                key_groups: int, residual: int, scale_dtype) -> tuple:  # fmt: skip
    """(the reference's arguments, (store lengths, residual lengths)) for one draw of
    :func:`quantized_strategies`: lengths drawn per row, NaN past them (:func:`with_dead_slots`)."""
    k_group, v_group = draw_groups(data, k_bits)
    store = k_group * key_groups
    lengths = data.draw(lengths_strategy(store, batch), label="store"), data.draw(lengths_strategy(residual, batch))
    raw = quantized_case(seed, batch, kv_heads, gqa, 32, store, residual)
    case = jax.jit(quantize_case, static_argnums=(1, 2, 3, 4, 5))(raw, k_bits, k_group, v_bits, v_group, scale_dtype)
    return with_dead_slots(case, *lengths), lengths


def with_dead_slots(case, lengths_quant, lengths_res):
    """A quantized case (:func:`quantize_case`) with NaN in every slot past its row's length: the
    residual's K/V, the store's per-token value scales and zeros, and its key scales and zeros of
    token groups wholly past the length."""
    q, keys, values, k_res, v_res, *masks = case
    live_groups = -(-np.asarray(lengths_quant) // keys.group)
    keys = keys.replace(scale=jnp.asarray(past(live_groups, keys.scale)),
                        zero=jnp.asarray(past(live_groups, keys.zero)))  # fmt: skip
    values = values.replace(scale=jnp.asarray(past(lengths_quant, values.scale)),
                            zero=jnp.asarray(past(lengths_quant, values.zero)))  # fmt: skip
    return q, keys, values, jnp.asarray(past(lengths_res, k_res)), jnp.asarray(past(lengths_res, v_res)), *masks


def quantized_reference64(case, lengths_quant, lengths_res) -> tuple[np.ndarray, np.ndarray]:
    """:func:`reference64` over a quantized case's dequantized store and its residual."""
    q, keys, values, k_res, v_res, mask_quant, mask_res = case
    store = (keys.dequantize(), values.dequantize(), mask_quant, lengths_quant)
    return reference64(q, [store, (k_res, v_res, mask_res, lengths_res)])


def torch_launch(launch):
    """Run a :class:`dami_kernels.triton_attention.Launch` on torch CPU tensors (Triton's
    interpreter under TRITON_INTERPRET=1) -> its outputs as jax arrays."""
    import torch

    def tensor(a):
        a = np.array(a)  # a writable copy
        # uint32 words as int32: the same bits, and the kernel masks every shifted code, so the sign never shows.
        return torch.from_numpy(a.view(np.int32) if a.dtype == np.uint32 else a)

    outputs = [torch.empty(o.shape, dtype=torch.float32) for o in launch.outputs]
    launch.kernel[launch.grid](*map(tensor, launch.args), *outputs, **launch.constants)
    return tuple(jnp.asarray(o.numpy()) for o in outputs)
