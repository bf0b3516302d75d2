"""TailorKV (Yao et al., ACL Findings 2025): a hybrid KV cache, one policy per layer, every row
at its own length (so that :func:`dami_jax.generate` and the engine's slots run the same code).

Rows are row-local: row b's tokens sit at slots 0..length[b]-1 of its stores, its prompt
first (``prompt_len[b]`` tokens), RoPE positions are slots, and left padding never enters a
store. Every layer keeps each row's prompt K/V in full precision in a :class:`PromptStore`
(host memory, ``pinned_host``, when ``offload``): prompt pieces are written there and read back
(the engine prefills long prompts in pieces), and a row's decode-time state is built from it
once its prompt is complete (:meth:`TailorKVCache.start_rows`). Then:

- Quantized layers (dense attention; layer 0 for most models): every token is kept as KIVI
  codes (keys per channel in token groups, values per token in channel groups) with the
  reference code's full-precision schedule (R = ``residual``): keys keep the newest n % R
  tokens exact and quantize R at once when R are exact (1..R exact keys at each step); values
  keep a sliding window of the last R tokens plus the current one (R + 1 exact). One ring of
  R + 1 full-precision tokens serves both: a ring key whose token is already quantized holds
  its dequantized value, so each token has one split for K and V and attention stays one
  :func:`quantized_attention` call.
- Sparse layers (attention on a few dominant tokens): the device keeps sink + recent prompt
  tokens, every generated token and the per-channel max |K| of the prompt. Each decode step
  predicts the layer's query from the previous layer's input (lookahead), scores channels
  s_i = |mean_group q_i| * max|K_i|, estimates attention over the row's prompt tokens from the
  top ``num_channels`` channels, and brings only the top-k tokens' rows to the device. Nothing
  is evicted. The estimate reads the prompt stores in blocks of ``PROMPT_BLOCK`` tokens, each
  decoding row as far as its own prompt reaches and idle rows not at all, so a step moves what
  its decoding rows' prompts hold, not what the stores were sized for (one top-k then runs over the estimates on the device; merging a
  running top-k block by block instead was 1.8x slower for TailorKV-2 on CPU). How a KV group's query
  heads turn into one token score is ``TailorKVConfig.token_score``: ``"group_mean"`` (the
  reference code: the group-mean query at the chosen channels) or ``"head_max"`` (ours: each
  query head's partial dot product, max over the group).

The prompt stores and their host-side reads and writes: :mod:`~dami_jax.tailorkv.prompt_store`;
the layers' state: :mod:`~dami_jax.tailorkv.layers`. Per sparse layer, decoding row and step that moves Hkv * (num_channels * P + 2 * top_k
* hd) elements for a prompt of P tokens (:func:`bytes_moved_per_step`). Prefill runs in full
precision (as the paper does); :meth:`TailorKVConfig.after_prefill` builds this cache from
:func:`dami_jax.generate`'s dense, left-padded prefill.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dami_jax.decoding.cache import DenseKVCache, replace_layer, write_slots
from dami_jax.models.attention import attention_over_reads
from dami_jax.models.config import ModelConfig
from dami_jax.tailorkv.kernel_choice import quantized_attention_by, segment_attention_by
from dami_jax.tailorkv.layers import (
    QuantizedLayerCache, SparseLayerCache, gather_tokens, largest, ring_slots, select_channels, serve_dequantized, start_quantized,
    start_sparse, token_scores,
)
from dami_jax.tailorkv.prompt_store import PROMPT_BLOCK, PromptStore, host_zeros, over_units, prompt_capacity, row_local, unit_rows
from dami_jax.tailorkv.quant import quantize_keys, quantize_values
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

    @property
    def quantize_options(self) -> dict:
        """quantize_keys' / quantize_values' keywords."""
        return dict(bits=self.bits, group=self.group, scale_dtype=jnp.dtype(self.scale_dtype))

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
        """The decode-time cache of :func:`dami_jax.generate`'s batch: ``dense`` holds the
        left-padded prompts in its first ``prompt_len`` slots; each row moves to its own stores,
        row-local, and is started there as the engine starts a slot."""
        self.validate(cfg)
        rows = dense.start.shape[0]
        cache = TailorKVCache.create(cfg, self, rows, prompt_len, dense.size - prompt_len,
                                     dense.k[0].dtype, max_len=dense.size, zeros=jnp.zeros)  # fmt: skip
        prompts = tuple(
            store.filled(row_local(k, dense.start, store.capacity), row_local(v, dense.start, store.capacity), self.offload)
            for store, k, v in zip(cache.prompts, dense.k, dense.v)
        )  # fmt: skip
        count = prompt_len - dense.start
        cache = cache.replace(prompts=prompts, length=count)
        return cache.start_rows(jnp.arange(rows, dtype=jnp.int32))


TAILORKV_1 = TailorKVConfig(bits=1, budget=192, sink=8, recent=56, num_channels=8)
TAILORKV_2 = TailorKVConfig(bits=2, budget=1024, sink=64, recent=64, num_channels=12)
PRESETS = {"TailorKV-1": TAILORKV_1, "TailorKV-2": TAILORKV_2}


@flax.struct.dataclass
class TailorKVCache:
    """Per-row TailorKV state; implements :class:`dami_jax.models.model.KVCache` for one-token
    decode steps. ``layers`` (the device part) and the per-row arrays have R rows; ``prompts``
    have B >= R: a decode of rows 0..R-1 runs on :meth:`narrow` (R) and is put back with
    :meth:`widen`."""

    layers: tuple  # per layer: QuantizedLayerCache | SparseLayerCache, on the device
    prompts: tuple  # per layer: PromptStore
    length: jax.Array  # int32 [R]: tokens held per row (prompt + generated)
    prompt_len: jax.Array  # int32 [R]: the row's prompt tokens (set when the row starts)
    active: jax.Array  # bool [R]: rows a decode step serves; the others neither advance nor read from the host
    config: TailorKVConfig = flax.struct.field(pytree_node=False)
    kernel: str = flax.struct.field(pytree_node=False, default="xla")  # resolved: "xla", "pallas" or "triton"
    head_mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)  # the mesh its heads are split over (:func:`largest`)

    @classmethod
    def create(cls, cfg: ModelConfig, config: TailorKVConfig, rows: int, prompt_tokens: int, max_generated: int,
               dtype, *, max_len: int, zeros=None, head_mesh: Mesh | None = None) -> "TailorKVCache":  # fmt: skip
        """An empty cache of ``rows`` rows, each holding a prompt of up to ``prompt_tokens`` tokens
        (its store: :func:`prompt_capacity`) and ``max_len`` tokens in all, ``max_generated`` of
        them generated. ``zeros(shape, dtype)`` allocates the prompt stores (default: in host
        memory when offloaded, never staged through the device); ``head_mesh``: the mesh the heads
        are split over, if any."""
        config.validate(cfg)
        zeros = zeros or (lambda shape, dtype: host_zeros(shape, dtype, config.offload))
        hkv, hd, r = cfg.num_kv_heads, cfg.head_dim, config.residual
        capacity = prompt_capacity(prompt_tokens, config.residual)
        quantized_capacity = -(-max_len // r) * r
        quantize = config.quantize_options
        window = config.sink + config.recent

        def device(*shape, dtype=dtype):
            return jnp.zeros(shape, dtype)

        def store(kind):  # a buffer of its own for every leaf: the engine donates the cache
            zeroed = kind.zeros(rows, hkv, quantized_capacity, hd, **quantize)
            return zeroed.replace(zero=jnp.zeros_like(zeroed.zero))

        def layer(i: int):
            if i in config.quantized_layers:
                state = QuantizedLayerCache(
                    keys=store(QuantizedKeys), values=store(QuantizedValues),
                    k_window=device(rows, hkv, r + 1, hd), v_window=device(rows, hkv, r + 1, hd),
                )  # fmt: skip
                return state, PromptStore(zeros((rows, hkv, capacity, hd), dtype), zeros((rows, hkv, capacity, hd), dtype), None)
            state = SparseLayerCache(
                k_absmax=device(rows, hkv, hd, dtype=jnp.float32), k_window=device(rows, hkv, window, hd),
                v_window=device(rows, hkv, window, hd), window_mask=device(rows, window, dtype=bool),
                k_gen=device(rows, hkv, max(1, max_generated), hd), v_gen=device(rows, hkv, max(1, max_generated), hd),
                channels=device(rows, hkv, config.num_channels, dtype=jnp.int32),
            )  # fmt: skip
            return state, PromptStore(*(zeros(shape, dtype) for shape in ((rows, hkv, capacity, hd),) * 2 + ((rows, hkv, hd, capacity),)))

        layers, prompts = zip(*(layer(i) for i in range(cfg.num_layers)))
        return cls(layers=tuple(layers), prompts=tuple(prompts), length=device(rows, dtype=jnp.int32),
                   prompt_len=device(rows, dtype=jnp.int32), active=jnp.ones((rows,), bool), config=config,
                   kernel=config.kernel_for(cfg), head_mesh=head_mesh)  # fmt: skip

    # ------------------------------------------------------------------ rows

    def write_prompt(self, layer: int, k: jax.Array, v: jax.Array, rows: jax.Array, slots: jax.Array) -> "TailorKVCache":
        """Prompt tokens k, v [R, T, Hkv, hd] of ``layer`` into the prompt store at (rows, slots)
        int32 [R, T] (a row past the last drops the token)."""
        store = self.prompts[layer].write(k, v, rows, slots, self.config.offload)
        return self.replace(prompts=replace_layer(self.prompts, layer, store))

    def prompt_attention(self, layer: int, q: jax.Array, first_row: jax.Array, query_slots: jax.Array) -> jax.Array:
        """Full-precision attention of q [R, T, Hq, hd] (rows first_row.., at query_slots [R, T])
        over their rows' prompt tokens so far, read from the store block by block as far as the
        queries reach (a prompt's later pieces)."""
        store, rows = self.prompts[layer], q.shape[0]

        def read(start, size: int):
            return store.read(first_row, rows, start, size, self.config.offload)

        return attention_over_reads(q, read, query_slots, capacity=store.capacity, window=PROMPT_BLOCK, block=PROMPT_BLOCK)

    def start_rows(self, rows: jax.Array) -> "TailorKVCache":
        """Rows int32 [n] whose prompts are complete (``length`` of them in the prompt stores)
        get their decode-time state: quantized layers' codes and rings, sparse layers' key
        ranges and windows. A row index past the last is ignored. Reads only those rows' prompts."""
        safe = jnp.minimum(rows, self.length.shape[0] - 1)
        count = jnp.where(rows < self.length.shape[0], self.length[safe], 0)
        config = self.config
        layers = tuple(
            start_quantized(state, store, rows, safe, count, residual=config.residual, quantize=config.quantize_options,
                            offload=config.offload)
            if isinstance(state, QuantizedLayerCache)
            else start_sparse(state, store, rows, safe, count, sink=config.sink, recent=config.recent, offload=config.offload)
            for state, store in zip(self.layers, self.prompts)
        )  # fmt: skip
        return self.replace(layers=layers, prompt_len=self.prompt_len.at[rows].set(count, mode="drop"))

    def narrow(self, rows: int) -> "TailorKVCache":
        """The cache of rows 0..rows-1 (the device part sliced; the prompt stores whole)."""
        head = functools.partial(jax.tree.map, lambda x: x[:rows])
        return self.replace(layers=head(self.layers), length=head(self.length), prompt_len=head(self.prompt_len), active=head(self.active))

    def widen(self, narrowed: "TailorKVCache") -> "TailorKVCache":
        """This cache with :meth:`narrow`'s rows put back."""

        def put(full, part):
            return jax.tree.map(lambda x, y: x.at[: y.shape[0]].set(y), full, part)

        return self.replace(layers=put(self.layers, narrowed.layers), prompts=narrowed.prompts, length=put(self.length, narrowed.length),
                            prompt_len=put(self.prompt_len, narrowed.prompt_len), active=put(self.active, narrowed.active))  # fmt: skip

    # ------------------------------------------------------------------ decode steps (KVCache)

    def positions(self, num_tokens: int) -> jax.Array:
        return self.length[:, None] + jnp.arange(num_tokens)[None, :]

    def wants_next_query(self, layer: int) -> bool:
        return layer > 0 and layer not in self.config.quantized_layers

    def attend(self, layer: int, q, k, v, next_query=None):
        if q.shape[1] != 1:
            raise ValueError("TailorKVCache decodes one token per step; prompts go through write_prompt / start_rows")
        cache = self
        if next_query is not None:  # lookahead: pick layer+1's channels from its predicted query
            upcoming = self.layers[layer + 1]
            chosen = select_channels(next_query, upcoming.k_absmax, self.config.num_channels, self.head_mesh)
            cache = self._with_layer(layer + 1, upcoming.replace(channels=chosen))
        state = cache.layers[layer]
        if isinstance(state, QuantizedLayerCache):
            out, state = cache._attend_quantized(state, q, k, v)
        else:
            channels = state.channels if self.wants_next_query(layer) else select_channels(
                q, state.k_absmax, self.config.num_channels, self.head_mesh
            )
            out, state = cache._attend_sparse(state, self.prompts[layer], q, k, v, channels)
        return out, cache._with_layer(layer, state)

    def _with_layer(self, layer: int, state) -> "TailorKVCache":
        return self.replace(layers=replace_layer(self.layers, layer, state))

    def _attend_quantized(self, state: QuantizedLayerCache, q, k, v):
        """Append the token to the ring (and its value codes to the store), attend, then quantize
        the R-block holding the token; its keys are served quantized once the block is whole."""
        config = self.config
        r, window = config.residual, config.residual + 1
        quantize = config.quantize_options
        n = self.length + 1  # [B] tokens per row, this one included
        k_new, v_new = k.swapaxes(1, 2).astype(state.k_window.dtype), v.swapaxes(1, 2).astype(state.v_window.dtype)
        fresh = (jnp.arange(window)[None, :] == ((n - 1) % window)[:, None])[:, None, :, None]
        k_window, v_window = jnp.where(fresh, k_new, state.k_window), jnp.where(fresh, v_new, state.v_window)
        values = state.values.update(quantize_values(v_new, **quantize), n - 1)
        mask_quant = jnp.arange(values.num_tokens)[None, None, :] < (n - window)[:, None, None]
        mask_ring = (ring_slots(n, window) >= 0)[:, None, :]
        out = quantized_attention_by(self.kernel, q, state.keys, values, k_window, v_window, mask_quant, mask_ring)
        block_start = (n - 1) // r * r
        block = quantize_keys(gather_tokens(k_window, (block_start[:, None] + jnp.arange(r)) % window), **quantize)
        keys = state.keys.update(block, block_start)  # a partial block is rewritten until it is whole
        k_window = serve_dequantized(k_window, block, block_start, n, n % r == 0)
        return out, state.replace(keys=keys, values=values, k_window=k_window, v_window=v_window)

    def _attend_sparse(self, state: SparseLayerCache, store: PromptStore, q, k, v, channels):
        """Attention over the row's sink + recent window, its top-k prompt tokens (estimated from
        ``channels``, fetched from the store) and its generated tokens (this one appended)."""
        generated = jnp.where(self.active, self.length - self.prompt_len, 0)  # an idle row writes at 0, in bounds
        k_gen, v_gen = write_slots((state.k_gen, state.v_gen), (k, v), generated)
        b, hkv = q.shape[0], state.k_absmax.shape[1]
        window_mask = jnp.broadcast_to(state.window_mask[:, None, :], (b, hkv, state.window_mask.shape[1]))
        segments = [(state.k_window, state.v_window, window_mask)]  # (k, v [B, Hkv, S, hd], mask [B, Hkv, S])
        if self.config.top_k:
            segments.append(self._top_k_tokens(store, q, channels))
        live = generated + 1  # the generated tokens, this one included
        gen_mask = jnp.broadcast_to(jnp.arange(k_gen.shape[2]) < live[:, None, None], (b, hkv, k_gen.shape[2]))
        return segment_attention_by(self.kernel, q, segments, (k_gen, v_gen, gen_mask), live), state.replace(k_gen=k_gen, v_gen=v_gen)

    def _top_k_tokens(self, store: PromptStore, q: jax.Array, channels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(k, v [B, Hkv, top_k, hd], mask [B, Hkv, top_k]) of each row's top-k prompt tokens by
        the channel estimate. Only decoding rows read, each as far as its own prompt reaches: the
        estimate's units are (row, prompt block), the fetch's are rows (:func:`over_units`); an
        idle row keeps the score -inf and zeros, and moves nothing."""
        config, offload = self.config, self.config.offload
        b, _, hq, hd = q.shape
        hkv = channels.shape[1]
        q_channels = jnp.take_along_axis(q[:, 0].reshape(b, hkv, hq // hkv, hd), channels[:, :, None, :], axis=3)
        blocks_per_row = jnp.where(self.active, -(-self.prompt_len // PROMPT_BLOCK), 0)

        def score(start, size: int, scores):
            rows, blocks = unit_rows(start + jnp.arange(size), blocks_per_row)
            approx = self._token_scores(q_channels[rows], store.channel_blocks(channels[rows], rows, blocks, offload))
            slots = blocks[:, None] * PROMPT_BLOCK + jnp.arange(PROMPT_BLOCK)
            return scores.at[rows[:, None], :, slots].set(approx.swapaxes(1, 2))  # [size, BLOCK, Hkv] at (row, slot)

        unscored = jnp.full((b, hkv, store.capacity), -jnp.inf, jnp.float32)
        approx = over_units(blocks_per_row.sum(), b, score, unscored)
        slots = jnp.arange(store.capacity)
        eligible = (slots[None, :] >= config.sink) & (slots[None, :] < self.prompt_len[:, None] - config.recent)
        scores, chosen = largest(jnp.where(eligible[:, None, :], approx, -jnp.inf), min(config.top_k, store.capacity), self.head_mesh)
        decoding = jnp.nonzero(self.active, size=b, fill_value=b)[0].astype(jnp.int32)  # decoding rows first

        def fetch(start, size: int, kv):
            rows = jax.lax.dynamic_slice(decoding, (start,), (size,))
            return tuple(x.at[rows].set(y) for x, y in zip(kv, store.gather(rows, chosen[rows], offload)))

        empty = jnp.zeros((b, hkv, chosen.shape[2], hd), store.k.dtype)
        return *over_units(self.active.sum(), b, fetch, (empty, empty)), scores > -jnp.inf

    # The kernel choice (``kernel``, resolved when the cache was built; Pallas on CPU is interpreted;
    # attention: dami_jax.tailorkv.kernel_choice).

    def _token_scores(self, q_channels: jax.Array, channel_rows: jax.Array) -> jax.Array:
        if self.kernel == "xla":
            return token_scores(q_channels, channel_rows, self.config.token_score)
        return pallas_scores.token_scores(q_channels, channel_rows, self.config.token_score,
                                          interpret=jax.default_backend() == "cpu")  # fmt: skip

    def advance(self, num_tokens: int) -> "TailorKVCache":
        return self.replace(length=self.length + num_tokens * self.active.astype(jnp.int32))


def bytes_moved_per_step(cfg: ModelConfig, config: TailorKVConfig, batch: int, prompt_len: int, itemsize: int = 4) -> int:
    """Host -> device bytes per decode step of ``batch`` decoding rows whose prompts hold
    ``prompt_len`` tokens: channel rows for scoring (whole ``PROMPT_BLOCK``s) plus the top-k K and
    V rows, summed over sparse layers. Idle rows, in the call or not, add nothing."""
    sparse = cfg.num_layers - len(config.quantized_layers)
    per_layer = batch * cfg.num_kv_heads * (config.num_channels * -(-prompt_len // PROMPT_BLOCK) * PROMPT_BLOCK + 2 * config.top_k * cfg.head_dim)
    return sparse * per_layer * itemsize
