"""Checkpoints in, pytrees out: HF safetensors folders, and our own orbax snapshots.

HF folders are read tensor by tensor from memory-mapped safetensors files and cast straight
to the target dtype, so peak memory is the result plus one tensor. Every error names the file,
the tensor and the parameter path at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dami_jax.errors import InputError
from dami_jax.models.config import ModelConfig, config_to_hf, read_hf_config
from dami_jax.models.params import (
    IGNORED_TENSORS,
    Params,
    get_path,
    hf_name_to_path,
    hf_tensor_names,
    param_shapes,
    path_str,
    set_path,
)
from dami_jax.models.sharding import param_shardings

ORBAX_CONFIG = "dami_config.json"
ORBAX_PARAMS = "params"


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded as asked; the message names what is at fault."""


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_checkpoint(path: str | Path, dtype: Any = None, mesh: jax.sharding.Mesh | None = None) -> tuple[ModelConfig, Params]:
    """Load ``(config, params)`` from an HF folder or a :func:`save_checkpoint` folder.

    ``dtype`` (e.g. ``jnp.bfloat16``) casts every tensor as it is read; ``None`` keeps the stored
    dtype. With ``mesh``, each tensor goes straight to its tensor-parallel sharding
    (:func:`dami_jax.models.sharding.param_shardings`).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if (folder / ORBAX_CONFIG).is_file():
        return _restore_orbax(folder, dtype, mesh)
    cfg = read_hf_config(folder)
    expected = param_shapes(cfg)
    shardings = None if mesh is None else param_shardings(cfg, mesh)
    params: Params = jax.tree.map(lambda _: None, expected, is_leaf=lambda x: isinstance(x, tuple))
    experts: dict[tuple, ExpertStack] = {}  # stacked leaves still missing experts
    for file in _safetensors_files(folder):
        try:
            with safe_open(file, framework="flax") as f:
                for name in f.keys():
                    _load_tensor(f, name, file, cfg, expected, params, dtype, shardings, experts)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from None
    for path, stack in experts.items():
        raise CheckpointError(f"{folder}: checkpoint lacks expert(s) {sorted(stack.missing)[:5]} of parameter {path_str(path)}")
    # None marks a parameter not read; flatten with None as a leaf (jax treats None as an empty subtree).
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0]
    missing = [path_str(p) for p, leaf in flat if leaf is None]
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks parameter(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return cfg, params


class ExpertStack:
    """A stacked experts leaf [E, ...] filled in host memory from the Hub's one tensor per
    expert; it goes to the device once complete (so at most a layer's experts wait on the host)."""

    def __init__(self, shape: tuple[int, ...], dtype):
        self.tensor = np.empty(shape, dtype)
        self.missing = set(range(shape[0]))

    def put(self, expert: int, tensor: jax.Array) -> None:
        self.tensor[expert] = np.asarray(tensor)
        self.missing.discard(expert)


def _load_tensor(f, name, file, cfg, expected, params, dtype, shardings, experts) -> None:
    place = hf_name_to_path(name)
    if place is None:
        if IGNORED_TENSORS.fullmatch(name):
            return
        raise CheckpointError(f"{file}: tensor {name!r} is not part of a {cfg.architecture} model as configured")
    path, transposed, expert = place
    if path == ("lm_head",) and cfg.tie_word_embeddings:
        return  # some exporters write the tied head anyway
    try:
        want = get_path(expected, path)
    except (KeyError, IndexError):
        raise CheckpointError(
            f"{file}: tensor {name!r} (parameter {path_str(path)}) does not fit the config "
            f"(e.g. a layer index beyond num_hidden_layers={cfg.num_layers}, a bias the architecture lacks, "
            f"or an expert tensor in a layer without experts)"
        ) from None
    if expert is not None and not 0 <= expert < want[0]:
        raise CheckpointError(f"{file}: tensor {name!r}: expert {expert} is beyond num_experts={want[0]}")
    want_one = want[1:] if expert is not None else want
    shape = tuple(f.get_slice(name).get_shape())
    stored = shape[::-1] if transposed else shape
    if stored != want_one:
        raise CheckpointError(
            f"{file}: tensor {name!r} has shape {shape}, but parameter {path_str(path)}"
            f"{'' if expert is None else f' (expert {expert})'} needs {want_one[::-1] if transposed else want_one} for this config.json"
        )
    tensor = f.get_tensor(name)
    tensor = tensor.T if transposed else tensor
    tensor = tensor.astype(dtype) if dtype is not None else tensor
    if expert is not None:
        stack = experts.setdefault(path, ExpertStack(want, tensor.dtype))
        stack.put(expert, tensor)
        if stack.missing:
            return
        tensor = jnp.asarray(experts.pop(path).tensor)
    if shardings is not None:
        tensor = jax.device_put(tensor, get_path(shardings, path))
    set_path(params, path, tensor)


def save_hf_checkpoint(path: str | Path, cfg: ModelConfig, params: Params) -> Path:
    """Write an HF folder (``config.json`` + ``model.safetensors``) that transformers loads too."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (tree_path, transposed, expert) in hf_tensor_names(cfg).items():
        leaf = np.asarray(jax.device_get(get_path(params, tree_path)))
        if leaf.dtype == jnp.bfloat16:
            raise CheckpointError(f"save_hf_checkpoint: {path_str(tree_path)} is bfloat16; cast params to float32 first")
        leaf = leaf if expert is None else leaf[expert]
        tensors[name] = np.ascontiguousarray(leaf.T if transposed else leaf)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    return folder


def save_checkpoint(path: str | Path, cfg: ModelConfig, params: Params) -> Path:
    """Save a converted model as an orbax checkpoint (fast reloads via :func:`load_checkpoint`)."""
    folder = Path(path).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(folder / ORBAX_PARAMS, params, force=True)
    (folder / ORBAX_CONFIG).write_text(json.dumps(cfg.to_json(), indent=1))
    return folder


def _restore_orbax(folder: Path, dtype: Any, mesh) -> tuple[ModelConfig, Params]:
    cfg = ModelConfig.from_json(json.loads((folder / ORBAX_CONFIG).read_text()))
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(folder.absolute() / ORBAX_PARAMS).item_metadata.tree
        if mesh is not None:
            shardings = param_shardings(cfg, mesh)
        else:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
        target = jax.tree.map(
            lambda s, m: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=s), shardings, stored
        )
        params = ckptr.restore(folder.absolute() / ORBAX_PARAMS, target)
    return cfg, jax.tree.map(jnp.asarray, params)
