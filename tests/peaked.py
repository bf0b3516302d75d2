"""A model whose attention is peaked on known far-back tokens, for testing KV caches that select
tokens (TailorKV), and the prompts it answers.

The model follows a linked list hidden in a long prompt: link token (i -> j) says "after node i
comes node j". Every layer and KV head looks up, for the current node token i, the one link
that starts at i, and adds the node it points to into an answer subspace of the residual
stream; the head reads that subspace. With links far back (outside a cache's sink and recent
windows), the greedy continuation walks the cycle only if each layer retrieves the right token
at every step.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.models.config import ModelConfig, RopeConfig
from dami_jax.models.params import param_shapes

NODES = 4
PAD, DEFAULT = 0, 1  # DEFAULT: what the model says when it cannot find the link
NODE_TOKENS = 2 + np.arange(NODES)
LINK_TOKENS = 2 + NODES + np.arange(NODES * NODES).reshape(NODES, NODES)  # [from, to]
FIRST_FILLER = 2 + NODES + NODES * NODES
# Residual-stream features.
BIAS = 0
NODE, FROM, TO, ANSWER = (1 + NODES * k + np.arange(NODES) for k in range(4))

CFG = ModelConfig(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=8, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=64, rope=RopeConfig(theta=1e6),
                  max_position_embeddings=4096, pad_token_id=PAD)  # fmt: skip
NOISE = np.arange(1 + 4 * NODES, CFG.hidden_size)  # fillers' random features
HALF = CFG.head_dim // 2
# Channel of node i's lookup in KV head h: the slowest RoPE pairs (c, c + HALF). At theta = 1e6 the
# fastest of them (c = 24) turns by 3.2e-5 rad per token, so a link 2000 tokens back keeps
# cos(0.064) = 0.998 of its query-key product.
LOOKUP_CHANNEL = HALF - 1 - np.arange(CFG.num_kv_heads)[:, None] * NODES - np.arange(NODES)[None, :]  # [Hkv, NODES]
NOISE_CHANNELS = np.r_[: LOOKUP_CHANNEL.min(), HALF : HALF + LOOKUP_CHANNEL.min()]  # pairs free of lookups
CONTRIBUTIONS = CFG.num_layers * CFG.num_heads  # one per (layer, query head)
GAP = 35.0  # link logit minus every other one (at least): the link keeps all but ~2000 * e^-35 of the weight
LOGIT_SCALE = 60.0


def _normed(embedding: np.ndarray) -> float:
    """RMSNorm's gain on a residual row (unit norm weights)."""
    return float(1 / np.sqrt(np.mean(embedding**2) + CFG.rms_norm_eps))


def peaked_model(seed: int = 0) -> dict:
    """The params pytree (see the module docstring); MLPs are zero.

    Per layer and query head (KV head h, node i): q = a at LOOKUP_CHANNEL[h, i] for node token i,
    k = b there for links from i, zero elsewhere for both, so the link's logit is at least GAP
    and every other key's is 0. Fillers' keys and values are random in channels no query reads.
    A link's value is one-hot at channel j (its target); o maps channel j to ANSWER[j] so that
    each (layer, query head) adds 1 / CONTRIBUTIONS there. The head scores node j by ANSWER[j]
    and DEFAULT by BIAS * (1 - 1 / (2 * CONTRIBUTIONS)): node j wins only if every layer and head
    found its link, and losing any one of them hands the token to DEFAULT.
    """
    rng = np.random.default_rng(seed)  # the fillers' random features; the lookups are the same for every seed
    d, hd, hkv, rep = CFG.hidden_size, CFG.head_dim, CFG.num_kv_heads, CFG.q_per_kv
    params = jax.tree.map(lambda shape: np.zeros(shape, np.float32), param_shapes(CFG),
                          is_leaf=lambda x: isinstance(x, tuple))  # fmt: skip
    embed = params["embed"]
    embed[:, BIAS] = 1.0
    embed[NODE_TOKENS, NODE] = 1.0
    for i in range(NODES):
        embed[LINK_TOKENS[i], FROM[i]] = 1.0
        embed[LINK_TOKENS[i], TO] = 1.0  # link i -> j: TO[j]
    embed[FIRST_FILLER:, NOISE] = rng.normal(size=(CFG.vocab_size - FIRST_FILLER, len(NOISE)))
    # RMSNorm gains of a node (at the last layer: the answer holds 2/3 by then) and of a link.
    node_gain = _normed(np.r_[1.0, 1.0, 2 / 3, np.zeros(d - 3)])
    link_gain = _normed(np.r_[np.ones(3), np.zeros(d - 3)])
    a = b = np.sqrt(GAP * np.sqrt(hd) / (node_gain * link_gain))
    for layer in params["layers"]:
        layer["attn_norm"][:] = layer["mlp_norm"][:] = 1.0
        q = layer["attn"]["q"].reshape(d, CFG.num_heads, hd)  # views: writes land in the params
        k, v = (layer["attn"][name].reshape(d, hkv, hd) for name in "kv")
        for h in range(hkv):
            for i in range(NODES):
                q[NODE[i], h * rep : (h + 1) * rep, LOOKUP_CHANNEL[h, i]] = a
                k[FROM[i], h, LOOKUP_CHANNEL[h, i]] = b
            v[TO, h, np.arange(NODES)] = 1.0
            k[NOISE[:, None], h, NOISE_CHANNELS] = rng.normal(scale=0.3, size=(len(NOISE), len(NOISE_CHANNELS)))
            v[NOISE, h, NODES:] = rng.normal(scale=0.3, size=(len(NOISE), hd - NODES))
        o = layer["attn"]["o"].reshape(CFG.num_heads, hd, d)
        o[:, np.arange(NODES), ANSWER] = 1.0 / (CONTRIBUTIONS * link_gain)
    params["final_norm"][:] = 1.0
    params["lm_head"][ANSWER, NODE_TOKENS] = LOGIT_SCALE
    params["lm_head"][BIAS, DEFAULT] = LOGIT_SCALE * (1 - 1 / (2 * CONTRIBUTIONS))
    return jax.tree.map(jnp.asarray, params)


# Links live in [LINKS_FROM, length - LINKS_BEFORE_END) of a prompt by default.
LINKS_FROM, LINKS_BEFORE_END = 1000, 100


def linked_prompt(length: int, successor: list[int], start: int, seed: int, links: bool = True,
                  links_from: int = LINKS_FROM, links_before_end: int = LINKS_BEFORE_END) -> list[int]:
    """Fillers, the links i -> successor[i] in random order over the far part of the prompt, and
    node ``start`` as the last token. ``links=False``: fillers in their places."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(FIRST_FILLER, CFG.vocab_size, length)
    slots = np.linspace(links_from, length - links_before_end, NODES).astype(int)
    if links:
        tokens[rng.permutation(slots)] = LINK_TOKENS[np.arange(NODES), successor]
    tokens[-1] = NODE_TOKENS[start]
    return tokens.tolist()


def walk(successor: list[int], start: int, steps: int) -> list[int]:
    """The node tokens after ``start`` along the cycle."""
    node, tokens = start, []
    for _ in range(steps):
        node = successor[node]
        tokens.append(int(NODE_TOKENS[node]))
    return tokens
