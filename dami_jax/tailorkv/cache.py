"""TailorKV (Yao et al., ACL Findings 2025): a hybrid KV cache, one policy per layer.

- Quantized layers (dense attention; layer 0 for most models): every token is kept as KIVI
  codes (keys per channel in token groups, values per token in channel groups) with the
  reference code's full-precision schedule (R = ``residual``): keys keep the newest n % R
  tokens exact and quantize R at once when R are exact (1..R exact keys at each step); values
  keep a sliding window of the last R tokens plus the current one (R + 1 exact). One ring of
  R + 1 full-precision tokens serves both: a ring key whose token is already quantized holds
  its dequantized value, so each token has one split for K and V and attention stays one
  :func:`quantized_attention` call. Each row is quantized from its own first real token (its
  tokens at slots 0..n-1 of its row), so left padding never enters a group: a prompt gets the
  same codes, scales and zeros alone or in any padded batch.
- Sparse layers (attention on a few dominant tokens): the prompt's full-precision K/V live in
  host memory (memory kind ``pinned_host``); the device keeps sink + recent prompt tokens,
  every generated token and the per-channel max |K|. Each decode step predicts the layer's
  query from the previous layer's input (lookahead), scores channels s_i = |mean_group q_i| *
  max|K_i|, estimates attention over all prompt tokens from the top ``num_channels`` channels,
  and brings only the top-k tokens' rows to the device. Nothing is evicted. How a KV group's
  query heads turn into one token score is ``TailorKVConfig.token_score``: ``"group_mean"``
  (the reference code: the group-mean query at the chosen channels) or ``"head_max"`` (ours:
  each query head's partial dot product, max over the group).

Host memory inside jit: a gather cannot mix memory spaces, so the gathers of selected rows run
on the host (``compute_on("device_host")``) and only their results cross to the device.
Per sparse layer and step that moves B * Hkv * (num_channels * P + 2 * top_k * hd) elements
(:func:`bytes_moved_per_step`). Prefill runs in full precision on the dense cache (as the paper
does); :meth:`TailorKVConfig.after_prefill` then builds this cache from it.
"""

from __future__ import annotations

import dataclasses
import importlib

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

from dami_jax.decoding.cache import DenseKVCache
from dami_jax.models.attention import attention
from dami_jax.models.config import ModelConfig
from dami_jax.tailorkv.quant import quantize_keys, quantize_values
from dami_jax.tailorkv.quant_attention import quantized_attention
from dami_kernels import decode_attention as pallas_attention
from dami_kernels import quant_attention as pallas_quant
from dami_kernels import sparse_scores as pallas_scores
from dami_kernels.blocks import unsupported
from dami_kernels.packing import BIT_WIDTHS, QuantizedKeys, QuantizedValues, check_quant_config

TOKEN_SCORES = pallas_scores.MODES  # the kernel and the reference rank tokens the same ways
KERNELS = ("auto", "xla", "pallas", "triton")


@dataclasses.dataclass(frozen=True)
class TailorKVConfig:
    """Budget = sink + recent + top-k prompt tokens per sparse layer and KV head.

    ``token_score``: how a sparse layer ranks prompt tokens for one KV head from its query group's
    partial dot products at the chosen channels. ``"group_mean"`` is the reference code's (the
    group-mean query dotted with the keys). ``"head_max"`` (each query head's own dot product,
    max over the group) is ours: a token that one head needs is not averaged away by the others.
    It is kept because on SmolLM2 NIAH it found as many needles or more, with lower KL to dense
    (docs/results.md, "TailorKV token scoring: reference vs ours").

    ``kernel``: what computes decode attention (static: chosen once, when the cache is built).
    ``"xla"``: the pure-jnp references. ``"pallas"``: :mod:`dami_kernels` (quantized
    attention, sparse token scores, attention over the sparse layers' segments without
    concatenating them); on CPU they run in Pallas' interpreter (slow; for checking). ``"triton"``:
    the quantized layers through the Triton kernel (jax-triton, CUDA GPUs only), the sparse layers
    through Pallas. ``"auto"``: Pallas on GPU/TPU when the kernels can read this store (see
    :func:`dami_kernels.blocks.unsupported`), else XLA; XLA on CPU.
    """

    bits: int = 1
    budget: int = 192
    sink: int = 8
    recent: int = 56
    num_channels: int = 8
    group: int = 64
    residual: int = 128
    quantized_layers: tuple[int, ...] = (0,)  # the paper's split for Llama-3.1-8B; profile yours
    scale_dtype: str = "float16"
    offload: bool = True  # keep sparse layers' prompt K/V in host memory
    token_score: str = "group_mean"  # one of TOKEN_SCORES
    kernel: str = "auto"  # one of KERNELS

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got kernel={self.kernel!r}")
        if self.token_score not in TOKEN_SCORES:
            raise ValueError(f"token_score must be one of {TOKEN_SCORES}, got token_score={self.token_score!r}")
        if self.bits not in BIT_WIDTHS:
            raise ValueError(f"bits must be one of {BIT_WIDTHS}, got bits={self.bits}")
        if min(self.sink, self.recent) < 0 or self.num_channels < 1:
            raise ValueError(f"sink={self.sink}, recent={self.recent} must be >= 0 and num_channels >= 1")
        if self.budget < self.sink + self.recent:
            raise ValueError(
                f"budget={self.budget} is smaller than sink + recent = {self.sink} + {self.recent}: no room for top-k tokens"
            )
        if self.group <= 0 or self.residual < self.group or self.residual % self.group:
            raise ValueError(f"residual={self.residual} must be a positive multiple of group={self.group}")

    @property
    def top_k(self) -> int:
        return self.budget - self.sink - self.recent

    def validate(self, cfg: ModelConfig) -> None:
        check_quant_config(self.bits, self.group, cfg.head_dim)
        bad = [i for i in self.quantized_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"quantized_layers: {bad} outside the model's {cfg.num_layers} layers")
        if self.num_channels > cfg.head_dim:
            raise ValueError(f"num_channels={self.num_channels} exceeds head_dim={cfg.head_dim}")
        self.kernel_for(cfg)

    def kernel_for(self, cfg: ModelConfig, backend: str | None = None) -> str:
        """``kernel`` resolved for ``cfg`` on ``backend`` (default: JAX's): "xla", "pallas" or
        "triton". ValueError when an explicit kernel cannot run here."""
        backend = backend or jax.default_backend()
        stores = jax.eval_shape(lambda: (
            QuantizedKeys.zeros(1, 1, self.group, cfg.head_dim, self.bits, self.group),
            QuantizedValues.zeros(1, 1, self.group, cfg.head_dim, self.bits, self.group),
        ))  # fmt: skip
        reason = unsupported(*stores)
        if self.kernel == "auto":
            return "xla" if backend == "cpu" or reason else "pallas"
        if self.kernel != "xla" and reason:
            raise ValueError(f"kernel={self.kernel!r} cannot read this cache: {reason}")
        if self.kernel == "triton" and backend != "gpu":
            raise ValueError(f"kernel='triton' runs through jax-triton on a CUDA GPU; the backend here is {backend}")
        return self.kernel

    def after_prefill(self, cfg: ModelConfig, dense: DenseKVCache, prompt_len: int) -> "TailorKVCache":
        self.validate(cfg)
        layers = tuple(
            _quantized_layer(self, dense.k[i], dense.v[i], dense.start, prompt_len)
            if i in self.quantized_layers
            else _sparse_layer(self, cfg, dense.k[i], dense.v[i], dense.start, prompt_len)
            for i in range(cfg.num_layers)
        )
        return TailorKVCache(
            layers=layers, length=dense.length, start=dense.start, config=self, prompt_len=prompt_len,
            kernel=self.kernel_for(cfg),
        )  # fmt: skip


TAILORKV_1 = TailorKVConfig(bits=1, budget=192, sink=8, recent=56, num_channels=8)
TAILORKV_2 = TailorKVConfig(bits=2, budget=1024, sink=64, recent=64, num_channels=12)
PRESETS = {"TailorKV-1": TAILORKV_1, "TailorKV-2": TAILORKV_2}


@flax.struct.dataclass
class QuantizedLayerCache:
    """Row-local: row b's n_b real tokens sit at slots 0..n_b-1 of its row (n_b = length - start[b])."""

    keys: QuantizedKeys  # [B, Hkv, C, hd], C = cache size rounded up to R; slots of whole R-blocks are final
    values: QuantizedValues  # [B, Hkv, C, hd]; each token's codes are written when it arrives
    k_window: jax.Array  # [B, Hkv, R + 1, hd] ring: slot s at s % (R + 1); dequantized once its key is quantized
    v_window: jax.Array  # [B, Hkv, R + 1, hd] ring of exact values


@flax.struct.dataclass
class SparseLayerCache:
    k_host: jax.Array  # [B, Hkv, P, hd] prompt keys (host memory when offloaded)
    v_host: jax.Array  # [B, Hkv, P, hd]
    kt_host: jax.Array  # [B, Hkv, hd, P] transposed keys: one channel is one contiguous row
    k_absmax: jax.Array  # [B, Hkv, hd] per-channel max |K| over the real prompt tokens
    k_window: jax.Array  # [B, Hkv, sink + recent, hd] on the device
    v_window: jax.Array
    window_mask: jax.Array  # bool [B, sink + recent]: real, non-duplicate tokens
    k_gen: jax.Array  # [B, Hkv, max_new, hd] generated tokens
    v_gen: jax.Array
    channels: jax.Array  # int32 [B, Hkv, num_channels], chosen from the lookahead query


def _to_host(x: jax.Array, config: TailorKVConfig) -> jax.Array:
    return jax.device_put(x, jax.memory.Space.Host) if config.offload else x


def _host_take(x: jax.Array, index: jax.Array, axis: int, config: TailorKVConfig) -> jax.Array:
    """``take_along_axis`` on a host-resident array, run on the host; only the result moves."""
    if not config.offload:
        return jnp.take_along_axis(x, index, axis=axis)
    index = jax.device_put(index, jax.memory.Space.Host)
    with compute_on("device_host"):
        rows = jnp.take_along_axis(x, index, axis=axis, mode="promise_in_bounds")
    return jax.device_put(rows, jax.memory.Space.Device)


def _row_local(x: jax.Array, start: jax.Array, length: int) -> jax.Array:
    """Left-padded x [B, Hkv, S, hd] -> [B, Hkv, length, hd] with row b's tokens from slot 0
    (slots past the row's end repeat its last slot; they are never served)."""
    slots = jnp.clip(start[:, None] + jnp.arange(length)[None, :], 0, x.shape[2] - 1)
    return jnp.take_along_axis(x, slots[:, None, :, None], axis=2)


def _ring_slots(n: jax.Array, window: int) -> jax.Array:
    """int32 [B, window]: the token slot each ring entry holds in a row of n [B] tokens (the
    newest, n - 1, and the window - 1 before it; negative: empty)."""
    newest = n[:, None] - 1
    return newest - (newest - jnp.arange(window)[None, :]) % window


def _gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, Hkv, S, hd] at per-row token indices [B, N] -> [B, Hkv, N, hd]."""
    return jnp.take_along_axis(x, index[:, None, :, None], axis=2)


def _serve_dequantized(k_window: jax.Array, block: QuantizedKeys, block_start: jax.Array, n: jax.Array, apply: jax.Array) -> jax.Array:
    """The ring with the keys of R-block [block_start, block_start + R) (quantized as ``block``)
    replaced by their dequantized values, in rows where ``apply`` [B] holds."""
    window = k_window.shape[2]
    slots = _ring_slots(n, window)
    offset = slots - block_start[:, None]
    inside = apply[:, None] & (offset >= 0) & (offset < block.num_tokens)
    dequantized = _gather_tokens(block.dequantize(k_window.dtype), jnp.clip(offset, 0, block.num_tokens - 1))
    return jnp.where(inside[:, None, :, None], dequantized, k_window)


def _quantized_layer(config: TailorKVConfig, k: jax.Array, v: jax.Array, start: jax.Array, prompt_len: int) -> QuantizedLayerCache:
    """Quantize every prompt token row-locally; the ring takes the last R + 1 slots, the keys of
    whole R-blocks among them dequantized."""
    size, r = k.shape[2], config.residual
    capacity = -(-size // r) * r
    n = prompt_len - start  # real tokens per row
    k_rows, v_rows = _row_local(k, start, capacity), _row_local(v, start, capacity)
    quantize = dict(bits=config.bits, group=config.group, scale_dtype=jnp.dtype(config.scale_dtype))
    ring = jnp.clip(_ring_slots(n, r + 1), 0)
    last_block = jnp.maximum(n // r * r - r, 0)  # the last whole R-block (the ring reaches no earlier one)
    block = quantize_keys(_gather_tokens(k_rows, last_block[:, None] + jnp.arange(r)), **quantize)
    k_window = _serve_dequantized(_gather_tokens(k_rows, ring), block, last_block, n, n >= r)
    return QuantizedLayerCache(
        keys=quantize_keys(k_rows, **quantize), values=quantize_values(v_rows, **quantize),
        k_window=k_window, v_window=_gather_tokens(v_rows, ring),
    )  # fmt: skip


def select_channels(query: jax.Array, k_absmax: jax.Array, num_channels: int) -> jax.Array:
    """query [B, 1, Hq, hd], k_absmax [B, Hkv, hd] -> int32 [B, Hkv, num_channels]: the channels
    with the largest |mean over the GQA group of q_i| * max|K_i|."""
    b, _, hq, hd = query.shape
    hkv = k_absmax.shape[1]
    group_mean = query[:, 0].reshape(b, hkv, hq // hkv, hd).mean(axis=2)
    return jax.lax.top_k(jnp.abs(group_mean) * k_absmax, num_channels)[1].astype(jnp.int32)


def token_scores(q_channels: jax.Array, channel_rows: jax.Array, mode: str) -> jax.Array:
    """q_channels [B, Hkv, G, C] (a KV group's queries at its chosen channels), channel_rows
    [B, Hkv, C, P] (those channels of every prompt key) -> float32 [B, Hkv, P] partial scores,
    one per KV head and token (see ``TailorKVConfig.token_score``)."""
    rows = channel_rows.astype(jnp.float32)
    if mode == "group_mean":
        return jnp.einsum("bhc,bhcp->bhp", q_channels.astype(jnp.float32).mean(axis=2), rows)
    return jnp.einsum("bhgc,bhcp->bhgp", q_channels.astype(jnp.float32), rows).max(axis=2)


def _sparse_layer(config, cfg: ModelConfig, k, v, start, prompt_len: int) -> SparseLayerCache:
    b, h, size, hd = k.shape
    k_prompt, v_prompt = k[:, :, :prompt_len], v[:, :, :prompt_len]
    real = jnp.arange(prompt_len)[None, :] >= start[:, None]  # [B, P]
    k_absmax = jnp.max(jnp.where(real[:, None, :, None], jnp.abs(k_prompt.astype(jnp.float32)), 0.0), axis=2)
    sink_slots = start[:, None] + jnp.arange(config.sink)[None, :]
    recent_slots = jnp.broadcast_to(prompt_len - config.recent + jnp.arange(config.recent), (b, config.recent))
    slots = jnp.concatenate([sink_slots, recent_slots], axis=1)  # [B, W]
    window_mask = jnp.concatenate(
        [sink_slots < prompt_len, (recent_slots >= start[:, None] + config.sink) & (recent_slots >= 0)], axis=1
    )
    index = jnp.clip(slots, 0, prompt_len - 1)[:, None, :, None]
    max_new = size - prompt_len
    return SparseLayerCache(
        k_host=_to_host(k_prompt, config), v_host=_to_host(v_prompt, config),
        kt_host=_to_host(k_prompt.swapaxes(2, 3), config), k_absmax=k_absmax,
        k_window=jnp.take_along_axis(k_prompt, index, axis=2), v_window=jnp.take_along_axis(v_prompt, index, axis=2),
        window_mask=window_mask,
        k_gen=jnp.zeros((b, h, max_new, hd), k.dtype), v_gen=jnp.zeros((b, h, max_new, hd), v.dtype),
        channels=jnp.zeros((b, h, config.num_channels), jnp.int32),
    )  # fmt: skip


@flax.struct.dataclass
class TailorKVCache:
    """The decode-time cache; implements :class:`dami_jax.models.model.KVCache` for single-token steps."""

    layers: tuple
    length: jax.Array  # int32 []: slots written (prompt + generated)
    start: jax.Array  # int32 [B]: first real prompt slot per row
    config: TailorKVConfig = flax.struct.field(pytree_node=False)
    prompt_len: int = flax.struct.field(pytree_node=False)
    kernel: str = flax.struct.field(pytree_node=False, default="xla")  # resolved: "xla", "pallas" or "triton"

    def positions(self, num_tokens: int) -> jax.Array:
        return self.length + jnp.arange(num_tokens)[None, :] - self.start[:, None]

    def wants_next_query(self, layer: int) -> bool:
        return layer > 0 and layer not in self.config.quantized_layers

    def attend(self, layer: int, q, k, v, next_query=None):
        if q.shape[1] != 1:
            raise ValueError("TailorKVCache decodes one token per step; prefill runs on the dense cache")
        cache = self
        if next_query is not None:  # lookahead: pick layer+1's channels from its predicted query
            upcoming = self.layers[layer + 1]
            chosen = select_channels(next_query, upcoming.k_absmax, self.config.num_channels)
            cache = self._with_layer(layer + 1, upcoming.replace(channels=chosen))
        state = cache.layers[layer]
        if isinstance(state, QuantizedLayerCache):
            out, state = cache._attend_quantized(state, q, k, v)
        else:
            channels = state.channels if self.wants_next_query(layer) else select_channels(
                q, state.k_absmax, self.config.num_channels
            )
            out, state = cache._attend_sparse(state, q, k, v, channels)
        return out, cache._with_layer(layer, state)

    def _with_layer(self, layer: int, state) -> "TailorKVCache":
        return self.replace(layers=self.layers[:layer] + (state,) + self.layers[layer + 1 :])

    def _attend_quantized(self, state: QuantizedLayerCache, q, k, v):
        """Append the token to the ring (and its value codes to the store), attend, then quantize
        the R-block holding the token; its keys are served quantized once the block is whole."""
        config = self.config
        r, window = config.residual, config.residual + 1
        quantize = dict(bits=config.bits, group=config.group, scale_dtype=jnp.dtype(config.scale_dtype))
        n = self.length + 1 - self.start  # [B] tokens per row, this one included
        k_new, v_new = k.swapaxes(1, 2).astype(state.k_window.dtype), v.swapaxes(1, 2).astype(state.v_window.dtype)
        fresh = (jnp.arange(window)[None, :] == ((n - 1) % window)[:, None])[:, None, :, None]
        k_window, v_window = jnp.where(fresh, k_new, state.k_window), jnp.where(fresh, v_new, state.v_window)
        values = state.values.update(quantize_values(v_new, **quantize), n - 1)
        mask_quant = jnp.arange(values.num_tokens)[None, None, :] < (n - window)[:, None, None]
        mask_ring = (_ring_slots(n, window) >= 0)[:, None, :]
        out = self._quantized_attention(q, state.keys, values, k_window, v_window, mask_quant, mask_ring)
        block_start = (n - 1) // r * r
        block = quantize_keys(_gather_tokens(k_window, (block_start[:, None] + jnp.arange(r)) % window), **quantize)
        keys = state.keys.update(block, block_start)  # a partial block is rewritten until it is whole
        k_window = _serve_dequantized(k_window, block, block_start, n, n % r == 0)
        return out, state.replace(keys=keys, values=values, k_window=k_window, v_window=v_window)

    def _attend_sparse(self, state: SparseLayerCache, q, k, v, channels):
        config, prompt_len = self.config, self.prompt_len
        generated = self.length - prompt_len
        k_gen = jax.lax.dynamic_update_slice(state.k_gen, k.swapaxes(1, 2).astype(state.k_gen.dtype), (0, 0, generated, 0))
        v_gen = jax.lax.dynamic_update_slice(state.v_gen, v.swapaxes(1, 2).astype(state.v_gen.dtype), (0, 0, generated, 0))
        b, _, hq, hd = q.shape
        hkv = state.k_absmax.shape[1]
        window_mask = jnp.broadcast_to(state.window_mask[:, None, :], (b, hkv, state.window_mask.shape[1]))
        segments = [(state.k_window, state.v_window, window_mask)]  # (k, v [B, Hkv, S, hd], mask [B, Hkv, S])
        top_k = min(config.top_k, prompt_len)
        if top_k:
            # Approximate scores of every prompt token from the chosen channels only.
            channel_rows = _host_take(state.kt_host, channels[..., None], axis=2, config=config)  # [B, Hkv, C, P]
            q_channels = jnp.take_along_axis(q[:, 0].reshape(b, hkv, hq // hkv, hd), channels[:, :, None, :], axis=3)
            approx = self._token_scores(q_channels, channel_rows)
            slots = jnp.arange(prompt_len)
            eligible = (slots >= self.start[:, None] + config.sink) & (slots < prompt_len - config.recent)
            approx = jnp.where(eligible[:, None, :], approx, -jnp.inf)
            scores, chosen = jax.lax.top_k(approx, top_k)  # [B, Hkv, top_k]
            segments.append((
                _host_take(state.k_host, chosen[..., None], axis=2, config=config),
                _host_take(state.v_host, chosen[..., None], axis=2, config=config),
                scores > -jnp.inf,
            ))  # fmt: skip
        segments.append((k_gen, v_gen, jnp.broadcast_to(jnp.arange(k_gen.shape[2]) <= generated, (b, hkv, k_gen.shape[2]))))
        return self._attend_segments(q, segments), state.replace(k_gen=k_gen, v_gen=v_gen)

    # The kernel choice (``kernel``, resolved when the cache was built; Pallas on CPU is interpreted).

    def _quantized_attention(self, *args) -> jax.Array:
        if self.kernel == "xla":
            return quantized_attention(*args)
        if self.kernel == "triton":  # triton is an optional (GPU) dependency: imported when chosen
            return importlib.import_module("dami_kernels.triton_attention").quantized_attention(*args)
        return pallas_quant.quantized_attention(*args, interpret=jax.default_backend() == "cpu")

    def _token_scores(self, q_channels: jax.Array, channel_rows: jax.Array) -> jax.Array:
        if self.kernel == "xla":
            return token_scores(q_channels, channel_rows, self.config.token_score)
        return pallas_scores.token_scores(q_channels, channel_rows, self.config.token_score,
                                          interpret=jax.default_backend() == "cpu")  # fmt: skip

    def _attend_segments(self, q: jax.Array, segments: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
        """Attention over the sparse layer's segments (window, top-k rows, generated tokens)."""
        if self.kernel != "xla":
            return pallas_attention.segment_attention(q, segments, interpret=jax.default_backend() == "cpu")
        dtype = segments[-1][0].dtype
        keys = jnp.concatenate([k.astype(dtype) for k, _, _ in segments], axis=2)
        values = jnp.concatenate([v.astype(dtype) for _, v, _ in segments], axis=2)
        mask = jnp.concatenate([m for _, _, m in segments], axis=2)[:, :, None, :]  # [B, Hkv, T=1, S]
        return attention(q, keys, values, mask)

    def advance(self, num_tokens: int) -> "TailorKVCache":
        return self.replace(length=self.length + num_tokens)


def bytes_moved_per_step(cfg: ModelConfig, config: TailorKVConfig, batch: int, prompt_len: int, itemsize: int = 4) -> int:
    """Host -> device bytes per decode step: channel rows for scoring plus the top-k K and V rows,
    summed over sparse layers."""
    sparse = cfg.num_layers - len(config.quantized_layers)
    per_layer = batch * cfg.num_kv_heads * (config.num_channels * prompt_len + 2 * min(config.top_k, prompt_len) * cfg.head_dim)
    return sparse * per_layer * itemsize
