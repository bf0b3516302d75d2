"""Checkpoint loading: clear errors on bad input, sharded files, round trips, mesh placement."""

from __future__ import annotations

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import VARIANTS, random_tokens, rel_err
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

import dami_jax as dj
from dami_jax.models.params import iter_paths
from dami_jax.models.sharding import AXIS, param_shardings

pytestmark = pytest.mark.usefixtures("highest_precision")


def edit_config(folder, **changes):
    path = folder / "config.json"
    hf = json.loads(path.read_text())
    hf.update(changes)
    path.write_text(json.dumps(hf))
    return path


# --------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        dj.load_checkpoint(missing)


def test_missing_config(make_tiny):
    tiny = make_tiny("llama")
    (tiny.path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        dj.load_checkpoint(tiny.path)


def test_config_not_json(make_tiny):
    tiny = make_tiny("llama")
    (tiny.path / "config.json").write_text("{not json")
    with pytest.raises(dj.ConfigError, match=re.escape(str(tiny.path / "config.json"))):
        dj.load_checkpoint(tiny.path)


def test_config_missing_field(make_tiny):
    tiny = make_tiny("llama")
    hf = json.loads((tiny.path / "config.json").read_text())
    del hf["hidden_size"]
    (tiny.path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(dj.ConfigError, match=r"config\.json.*hidden_size"):
        dj.load_checkpoint(tiny.path)


def test_missing_safetensors(make_tiny):
    tiny = make_tiny("llama")
    (tiny.path / "model.safetensors").unlink()
    with pytest.raises(dj.CheckpointError, match=re.escape(str(tiny.path)) + ".*model.safetensors"):
        dj.load_checkpoint(tiny.path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(make_tiny, damage):
    tiny = make_tiny("llama")
    file = tiny.path / "model.safetensors"
    if damage == "garbage":
        file.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(dj.CheckpointError, match=re.escape(str(file))):
        dj.load_checkpoint(tiny.path)


def test_sharded_checkpoint_loads_and_matches(make_tiny):
    tiny = make_tiny("qwen2", max_shard_size="40KB")
    shards = sorted(p.name for p in tiny.path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tiny.path / "model.safetensors.index.json").is_file()
    assert not (tiny.path / "model.safetensors").exists()
    cfg, params = dj.load_checkpoint(tiny.path)
    tokens = random_tokens(2, 40)
    assert rel_err(dj.forward(params, cfg, jnp.asarray(tokens)), tiny.torch_logits(tokens)) < 1e-4


def test_index_names_missing_shard(make_tiny):
    tiny = make_tiny("llama", max_shard_size="40KB")
    shard = sorted(tiny.path.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(dj.CheckpointError, match=re.escape(shard.name)) as info:
        dj.load_checkpoint(tiny.path)
    assert "model.safetensors.index.json" in str(info.value)


def test_shape_disagrees_with_config(make_tiny):
    tiny = make_tiny("llama")
    edit_config(tiny.path, intermediate_size=96)
    with pytest.raises(dj.CheckpointError) as info:
        dj.load_checkpoint(tiny.path)
    msg = str(info.value)
    assert "model.safetensors" in msg
    assert re.search(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", msg), msg
    assert re.search(r"layers/\d+/mlp/(gate|up|down)", msg), msg


def test_too_few_layers_in_config(make_tiny):
    tiny = make_tiny("llama")
    edit_config(tiny.path, num_hidden_layers=1)
    with pytest.raises(dj.CheckpointError, match=r"model\.layers\.1\."):
        dj.load_checkpoint(tiny.path)


def test_unsupported_architecture(make_tiny):
    tiny = make_tiny("llama")
    path = edit_config(tiny.path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(dj.ConfigError, match=re.escape(str(path)) + ".*GPT2LMHeadModel"):
        dj.load_checkpoint(tiny.path)


@pytest.mark.parametrize("style", ["v5", "v4"])
def test_unsupported_rope_type(make_tiny, style):
    tiny = make_tiny("llama", style)
    if style == "v5":
        path = edit_config(tiny.path, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    else:
        path = edit_config(tiny.path, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(dj.ConfigError, match=re.escape(str(path)) + ".*(yarn|dynamic)"):
        dj.load_checkpoint(tiny.path)


@pytest.mark.parametrize("field", [{"hidden_act": "gelu"}, {"mlp_bias": True}, {"num_key_value_heads": 3}])
def test_unsupported_options(make_tiny, field):
    tiny = make_tiny("llama")
    edit_config(tiny.path, **field)
    with pytest.raises(dj.ConfigError, match=next(iter(field))):
        dj.load_checkpoint(tiny.path)


def test_missing_tensor(make_tiny):
    tiny = make_tiny("qwen3")
    file = tiny.path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(dj.CheckpointError, match="layers/1/attn/k_norm") as info:
        dj.load_checkpoint(tiny.path)
    assert str(tiny.path) in str(info.value)


def test_unknown_tensor(make_tiny):
    tiny = make_tiny("llama")
    file = tiny.path / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(dj.CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        dj.load_checkpoint(tiny.path)


def test_tied_checkpoint_with_explicit_head_and_inv_freq(make_tiny):
    """Some exporters write the tied lm_head and rotary inv_freq buffers: both are ignored."""
    tiny = make_tiny("llama_tied")
    file = tiny.path / "model.safetensors"
    tensors = load_file(file)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    cfg, params = dj.load_checkpoint(tiny.path)
    assert "lm_head" not in params
    tokens = random_tokens(1, 20)
    assert rel_err(dj.forward(params, cfg, jnp.asarray(tokens)), tiny.torch_logits(tokens)) < 1e-4


def test_generation_config_eos_ids_are_merged(make_tiny):
    tiny = make_tiny("llama")
    (tiny.path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    cfg, _ = dj.load_checkpoint(tiny.path)
    assert cfg.eos_token_ids == (2, 7)
    assert cfg.pad_token_id == 0


def test_config_is_hashable_and_static(make_tiny):
    cfg, _ = dj.load_checkpoint(make_tiny("llama3_rope").path)
    assert hash(cfg) == hash(dj.ModelConfig.from_json(json.loads(json.dumps(cfg.to_json()))))
    assert cfg.rope.type == "llama3" and cfg.rope.factor == 8.0 and cfg.rope.original_max_position_embeddings == 64


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["qwen3", "llama_tied"])
def test_orbax_round_trip(make_tiny, tmp_path, name):
    cfg, params = dj.load_checkpoint(make_tiny(name).path)
    out = dj.save_checkpoint(tmp_path / "orbax", cfg, params)
    cfg2, params2 = dj.load_checkpoint(out)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params2, params, strict=True)
    cfg3, params16 = dj.load_checkpoint(out, dtype=jnp.bfloat16)
    assert cfg3 == cfg
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("name", ["llama3_rope", "qwen2_tied", "qwen3_attn_bias", "llama_attn_bias"])
def test_hf_export_round_trip(make_tiny, tmp_path, name):
    tiny = make_tiny(name, "v4")
    cfg, params = dj.load_checkpoint(tiny.path)
    out = dj.save_hf_checkpoint(tmp_path / "export", cfg, params)
    cfg2, params2 = dj.load_checkpoint(out)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params2, params, strict=True)
    model = getattr(transformers, VARIANTS[name].cls).from_pretrained(out).eval()
    tokens = random_tokens(2, 100, seed=4)
    with torch.no_grad():
        got = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, tiny.torch_logits(tokens), rtol=0, atol=1e-5)


def test_hf_export_refuses_bfloat16(make_tiny, tmp_path):
    cfg, params = dj.load_checkpoint(make_tiny("llama").path, dtype=jnp.bfloat16)
    with pytest.raises(dj.CheckpointError, match="bfloat16"):
        dj.save_hf_checkpoint(tmp_path / "export", cfg, params)


# --------------------------------------------------------------------------- sharding


def expected_spec(path: str, shape, cfg, size: int) -> P:
    """Independent statement of the tensor-parallel layout (whole heads only)."""
    name = path.rsplit("/", 1)[-1]
    heads = {"q": cfg.num_heads, "q_bias": cfg.num_heads, "o": cfg.num_heads, "k": cfg.num_kv_heads,
             "v": cfg.num_kv_heads, "k_bias": cfg.num_kv_heads, "v_bias": cfg.num_kv_heads}  # fmt: skip
    if name in heads:
        if heads[name] % size:
            return P()
        return {"q": P(None, AXIS), "k": P(None, AXIS), "v": P(None, AXIS), "o": P(AXIS, None)}.get(name, P(AXIS))
    if "/experts/" in path:  # whole experts per device
        return P(AXIS, None, None) if cfg.num_experts % size == 0 else P()
    if name in ("gate", "up"):
        return P(None, AXIS) if cfg.intermediate_size % size == 0 else P()
    if name == "down":
        return P(AXIS, None) if cfg.intermediate_size % size == 0 else P()
    return P()


def _spec(s: NamedSharding) -> tuple:
    spec = tuple(s.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


@pytest.fixture(scope="module")
def mesh():
    """4-way mesh: the default devices when there are 4 (CPU under conftest's XLA_FLAGS),
    else the 4 virtual CPU devices (e.g. on a one-GPU machine)."""
    devices = jax.devices()
    if len(devices) != 4:
        devices = jax.devices("cpu")
    if len(devices) != 4:
        pytest.skip(f"needs 4 devices, found {len(devices)}")
    return dj.make_mesh(devices)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("llama", {}),  # 4 q heads split, 2 kv heads replicated
        ("llama_tied", {}),  # 4 kv heads: k/v split too
        ("qwen2", {}),  # q bias split
        ("qwen3", {}),  # head_dim 32 != hidden / heads
        ("qwen3_moe", {}),  # 8 experts: 2 whole experts per device; the router replicated
        ("qwen3_moe_sparse_step", {}),  # 6 experts do not divide by 4: replicated
        # 6 heads of 16: 96 q columns divide by 4 devices, but whole heads do not: q stays replicated.
        ("llama_attn_bias", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2}),
    ],
)
def test_sharded_load_and_forward(make_tiny, mesh, name, overrides):
    tiny = make_tiny(name, **overrides)
    cfg, params = dj.load_checkpoint(tiny.path)
    cfg_s, sharded = dj.load_checkpoint(tiny.path, mesh=mesh)
    placed = dj.shard_params(params, cfg, mesh)
    assert cfg_s == cfg
    size = mesh.shape[AXIS]
    split = 0
    for (path, leaf), (_, leaf2) in zip(iter_paths(sharded), iter_paths(placed)):
        for x in (leaf, leaf2):
            assert isinstance(x.sharding, NamedSharding), path
            assert x.sharding.mesh.shape == mesh.shape
            assert _spec(x.sharding) == _spec(NamedSharding(mesh, expected_spec(path, x.shape, cfg, size))), path
        split += _spec(leaf.sharding) != ()
    assert split >= 3 * cfg.num_layers  # gate/up/down at least
    chex.assert_trees_all_equal(sharded, params, strict=True)
    tokens = jnp.asarray(random_tokens(2, 48))
    ref = np.asarray(dj.forward(params, cfg, tokens))
    assert rel_err(dj.forward(sharded, cfg, tokens), ref) < 1e-5
    assert rel_err(dj.forward(placed, cfg, tokens), ref) < 1e-5
    prompts = [[5, 9, 33, 7, 81, 12], [44, 3]]
    want = dj.generate(params, cfg, prompts, max_new_tokens=12, stop_tokens=[]).token_lists()
    assert dj.generate(sharded, cfg, prompts, max_new_tokens=12, stop_tokens=[]).token_lists() == want


def test_param_shardings_match_param_shapes(mesh):
    from dami_jax.models.config import ModelConfig

    cfg = ModelConfig("qwen2", 64, 32, 48, 1, 4, 4, 8)
    shardings = param_shardings(cfg, mesh)
    shapes = dj.param_shapes(cfg)
    assert jax.tree.structure(shardings) == jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple))


def test_orbax_restore_onto_mesh(make_tiny, tmp_path, mesh):
    cfg, params = dj.load_checkpoint(make_tiny("qwen3").path)
    out = dj.save_checkpoint(tmp_path / "orbax", cfg, params)
    _, restored = dj.load_checkpoint(out, mesh=mesh)
    chex.assert_trees_all_equal(restored, params, strict=True)
    q = restored["layers"][0]["attn"]["q"]
    assert _spec(q.sharding) == (None, AXIS)


# --------------------------------------------------------------------------- content fingerprints


def test_fingerprint_sees_every_bit_and_ignores_placement():
    from dami_jax.models.config import ModelConfig

    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)  # fmt: skip
    params = dj.init_params(cfg, jax.random.key(0))
    print_ = dj.fingerprint(params)
    assert len(print_) == 16 and dj.fingerprint(jax.tree.map(jnp.array, params)) == print_
    one_bit = jax.tree.map(lambda x: x, params)
    bits = np.asarray(params["layers"][1]["mlp"]["up"]).view(np.uint32).copy()
    bits[3, 5] ^= 1  # the lowest mantissa bit of one weight
    one_bit["layers"][1]["mlp"]["up"] = jnp.asarray(bits.view(np.float32))
    assert dj.fingerprint(one_bit) != print_
    assert dj.fingerprint(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)) != print_
    mesh = dj.make_mesh(jax.devices()[:4])
    assert dj.fingerprint(dj.shard_params(params, cfg, mesh)) == print_  # integer sums: order-free
