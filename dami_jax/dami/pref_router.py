"""DAMI-Pref: a router trained on preference pairs to pick each query's Reasoning Intensity (ours).

The paper says "preference learning that encodes accuracy and efficiency criteria"; the rest is
ours. A small Flax NNX MLP maps a query's prefill features (:mod:`dami_jax.dami.features`) to one
score s(q, lam) per lambda of a fixed grid. It is trained with the Bradley-Terry loss
-log sigmoid(s(q, lam_win) - s(q, lam_lose)) on the pairs of :mod:`dami_jax.dami.preferences`
(AdamW, warmup + cosine schedule, gradient clipping; one jitted step), with early stopping on the
validation pairwise accuracy (the loss breaks ties) and the best epoch's weights kept. lambda(q) is the argmax of s over the grid
(or its softmax expectation).

``cost_weight`` trades accuracy for tokens at inference without retraining: the scores are
lowered by ``cost_weight`` times each lambda's mean token count in the training rollouts
(relative to the largest), so a larger weight moves queries towards cheaper lambdas.

A router folder holds ``router.json`` (grid, feature spec, the Instruct model's fingerprint, how
prompts were rendered, training settings and history), ``checkpoints/`` (orbax: weights and
optimizer state after each epoch, so training resumes after an interruption) and ``best/`` (the
kept weights). Loading it for another model or grid is an error that says so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from dami_jax.dami.features import FeatureSpec
from dami_jax.dami.preferences import OutcomeTable, PreferencePairs
from dami_jax.errors import InputError
from dami_jax.files import read_json, write_atomic

META_FILE = "router.json"


class RouterMismatchError(InputError):
    """A router folder that does not fit what it is asked to serve or resume."""


class FeatureStat(nnx.Variable):
    """Standardization statistics of the training features: saved with the router, never trained."""


class ScoreNet(nnx.Module):
    """features float32 [N, F] -> scores float32 [N, G], one per grid lambda."""

    def __init__(self, in_dim: int, grid_size: int, hidden: int, *, rngs: nnx.Rngs):
        self.mean = FeatureStat(jnp.zeros((in_dim,)))
        self.scale = FeatureStat(jnp.ones((in_dim,)))
        self.hidden = nnx.Linear(in_dim, hidden, rngs=rngs) if hidden else None  # hidden=0: a linear scorer
        self.out = nnx.Linear(hidden or in_dim, grid_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = (x - self.mean[...]) / self.scale[...]
        return self.out(x if self.hidden is None else nnx.gelu(self.hidden(x)))


def bradley_terry_loss(s_win: jax.Array, s_lose: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Mean of -log sigmoid(s_win - s_lose) over pairs [N], weighted by ``weight`` [N] if given."""
    losses = jax.nn.softplus(s_lose - s_win)
    return jnp.mean(losses) if weight is None else jnp.sum(weight * losses) / jnp.sum(weight)


def _pair_scores(net: ScoreNet, x: jax.Array, win: jax.Array, lose: jax.Array) -> tuple[jax.Array, jax.Array]:
    scores = net(x)
    pick = lambda idx: jnp.take_along_axis(scores, idx[:, None], axis=1)[:, 0]
    return pick(win), pick(lose)


@nnx.jit
def _train_step(net: ScoreNet, optimizer: nnx.Optimizer, x, win, lose, weight) -> jax.Array:
    def loss_fn(net):
        return bradley_terry_loss(*_pair_scores(net, x, win, lose), weight)

    loss, grads = nnx.value_and_grad(loss_fn)(net)
    optimizer.update(net, grads)
    return loss


@nnx.jit
def _evaluate(net: ScoreNet, x, win, lose, weight) -> tuple[jax.Array, jax.Array]:
    """(weighted Bradley-Terry loss, pairwise accuracy: share of pairs with s_win > s_lose)."""
    s_win, s_lose = _pair_scores(net, x, win, lose)
    return bradley_terry_loss(s_win, s_lose, weight), jnp.mean((s_win > s_lose).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    hidden: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2
    max_epochs: int = 300
    batch_size: int = 512
    warmup_epochs: int = 5
    clip_norm: float = 1.0
    patience: int = 30  # epochs without a better validation score before stopping
    seed: int = 0

    def __post_init__(self):
        if self.hidden < 0 or min(self.max_epochs, self.batch_size, self.patience) < 1 or self.learning_rate <= 0:
            raise ValueError(f"TrainConfig: sizes, epochs and learning rate must be positive, got {self}")


@dataclasses.dataclass(frozen=True)
class RouterInfo:
    """What a router was trained for and on: checked when it is loaded or resumed."""

    grid: tuple[float, ...]
    spec: FeatureSpec
    fingerprint: str  # the Instruct model's content hash (the features come from its prefill)
    prompt: dict[str, Any]  # how queries were rendered for the prefill (template, style)
    token_costs: tuple[float, ...]  # mean generated tokens per grid lambda in the training rollouts
    in_dim: int

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "grid": list(self.grid), "spec": self.spec.to_json(), "token_costs": list(self.token_costs)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RouterInfo":
        return cls(tuple(data["grid"]), FeatureSpec.from_json(data["spec"]), data["fingerprint"], data["prompt"],
                   tuple(data["token_costs"]), data["in_dim"])  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PrefRouter:
    """A trained DAMI-Pref router: scores and lambdas from query features."""

    net: ScoreNet
    info: RouterInfo
    history: tuple[dict[str, float], ...] = ()  # per epoch: train/val loss and pairwise accuracy
    best_epoch: int = 0  # the epoch whose weights these are (best validation pairwise accuracy)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """float32 [N, G]: s(q, lam) for each query and grid lambda."""
        return np.asarray(_scores(self.net, jnp.asarray(features, jnp.float32)))

    def lambdas(self, features: np.ndarray, cost_weight: float = 0.0, expectation: bool = False) -> np.ndarray:
        """float32 [N]: lambda(q), the argmax over the grid of the cost-adjusted scores (or their
        softmax expectation, which may fall between grid points)."""
        costs = np.asarray(self.info.token_costs, np.float32)
        adjusted = self.scores(features) - cost_weight * costs / np.nanmax(costs)
        grid = np.asarray(self.info.grid, np.float32)
        if expectation:
            return np.asarray(jax.nn.softmax(adjusted, axis=-1) @ grid)
        return grid[np.argmax(adjusted, axis=-1)]

    def check_fits(self, fingerprint: str, grid: Sequence[float] | None = None, where: str = "router") -> None:
        """Raise :class:`RouterMismatchError` unless the router was trained on the Instruct model
        with ``fingerprint`` (and, when given, on ``grid``)."""
        if fingerprint != self.info.fingerprint:
            raise RouterMismatchError(
                f"{where} was trained on features of the Instruct model {self.info.fingerprint}, not of this one "
                f"({fingerprint}); train a router for this model (dami-jax train-router)"
            )
        if grid is not None and (len(grid) != len(self.info.grid) or not np.allclose(grid, self.info.grid)):
            raise RouterMismatchError(f"{where} scores the lambda grid {list(self.info.grid)}, not {list(grid)}")


@nnx.jit
def _scores(net: ScoreNet, x: jax.Array) -> jax.Array:
    return net(x)


def _new_net(info: RouterInfo, config: TrainConfig) -> ScoreNet:
    return ScoreNet(info.in_dim, len(info.grid), config.hidden, rngs=nnx.Rngs(config.seed))


def _optimizer(net: ScoreNet, config: TrainConfig, steps_per_epoch: int) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, min(config.warmup_epochs, config.max_epochs - 1) * steps_per_epoch,
        config.max_epochs * steps_per_epoch,
        end_value=0.1 * config.learning_rate,
    )  # fmt: skip
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adamw(schedule, weight_decay=config.weight_decay))
    return nnx.Optimizer(net, tx, wrt=nnx.Param)


def _pure(module: Any) -> dict:
    return nnx.to_pure_dict(nnx.state(module))


def _restore_into(module: Any, pure: dict) -> None:
    state = nnx.state(module)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)


def _manager(folder: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(folder.absolute() / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=1))


def train_pref_router(
    features: np.ndarray,
    train_pairs: PreferencePairs,
    val_pairs: PreferencePairs,
    info: RouterInfo,
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    validation: tuple[np.ndarray, OutcomeTable] | None = None,
    data_id: str = "",
    progress: bool = True,
) -> PrefRouter:
    """Train on ``train_pairs`` (indices into ``features`` float32 [Q, F]), save into ``out_dir``
    after every epoch; rerunning resumes from the last saved epoch, and a finished folder is
    loaded rather than retrained. ``data_id`` names the training data (e.g. a hash of the
    records); resuming with other data or settings is refused.

    Early stopping keeps the epoch that routes best: with ``validation`` = (feature rows [V],
    their outcomes at every grid lambda), the routed accuracy of those queries, then their mean
    tokens (accuracy first, then cost: the order the preferences encode); without it, the
    pairwise accuracy on ``val_pairs`` (or on ``train_pairs`` when there are none), then the loss."""
    if len(train_pairs) == 0:
        raise InputError("no training pairs: every query's answers were all wrong or near-ties; sweep more queries or lambdas")
    if features.shape[1] != info.in_dim:
        raise ValueError(f"features have {features.shape[1]} columns; info.in_dim is {info.in_dim}")
    folder = Path(out_dir)
    settings = {"info": info.to_json(), "config": dataclasses.asdict(config), "data": data_id}
    meta = _read_meta(folder)
    if meta is not None and meta["settings"] != json.loads(json.dumps(settings)):
        raise RouterMismatchError(f"{folder} holds a router trained with other settings or data; use another folder")
    if meta is not None and meta["done"]:
        return load_pref_router(folder)

    net = _new_net(info, config)
    mean, scale = features.mean(axis=0), features.std(axis=0)
    net.mean[...] = jnp.asarray(mean)
    net.scale[...] = jnp.asarray(np.where(scale > 1e-6, scale, 1.0))
    steps_per_epoch = -(-len(train_pairs) // config.batch_size)
    optimizer = _optimizer(net, config, steps_per_epoch)
    best = _pure(net)
    record = {"epoch": 0, "history": [], "best_epoch": 0, "best": None}
    with _manager(folder) as manager:  # closing waits for the last save to land, on Ctrl-C too
        if manager.latest_step() is not None:
            restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
                state=ocp.args.StandardRestore({"net": _pure(net), "optimizer": _pure(optimizer), "best": best}),
                record=ocp.args.JsonRestore(),
            ))  # fmt: skip
            _restore_into(net, restored["state"]["net"])
            _restore_into(optimizer, restored["state"]["optimizer"])
            best, record = restored["state"]["best"], restored["record"]
        write_atomic(folder / META_FILE, json.dumps({"settings": settings, "done": False}, indent=1) + "\n")

        x_all = jnp.asarray(features, jnp.float32)
        on_device = lambda pairs: tuple(jnp.asarray(a) for a in (pairs.query, pairs.win, pairs.lose, pairs.weight))
        train, val = on_device(train_pairs), on_device(val_pairs)  # (query, win, lose, weight), copied once
        bar = tqdm(total=config.max_epochs, initial=record["epoch"], desc="train-router", unit="epoch", disable=not progress)
        with bar:
            while record["epoch"] < config.max_epochs and record["epoch"] - record["best_epoch"] < config.patience:
                epoch = record["epoch"] + 1
                order = np.random.default_rng([config.seed, epoch]).permutation(len(train_pairs))
                for lo in range(0, len(order), config.batch_size):
                    idx = order[lo : lo + config.batch_size]
                    q, win, lose, weight = (a[idx] for a in train)
                    _train_step(net, optimizer, x_all[q], win, lose, weight)
                train_loss, train_acc = _evaluate(net, x_all[train[0]], *train[1:])
                row = {"epoch": epoch, "train_loss": float(train_loss), "train_accuracy": float(train_acc)}
                if len(val_pairs):
                    val_loss, val_acc = _evaluate(net, x_all[val[0]], *val[1:])
                    row.update(val_loss=float(val_loss), val_accuracy=float(val_acc))
                if validation is not None:
                    choice = np.argmax(np.asarray(_scores(net, x_all[validation[0]])), axis=-1)
                    row["routed_accuracy"], row["routed_tokens"] = validation[1].routed(choice)
                    monitored = [-row["routed_accuracy"], row["routed_tokens"]]
                else:
                    split = "val" if len(val_pairs) else "train"
                    monitored = [-row[f"{split}_accuracy"], row[f"{split}_loss"]]
                if record["best"] is None or monitored < record["best"]:
                    best, record["best_epoch"], record["best"] = _pure(net), epoch, monitored
                record["epoch"] = epoch
                record["history"].append(row)
                manager.save(epoch, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"net": _pure(net), "optimizer": _pure(optimizer), "best": best}),
                    record=ocp.args.JsonSave(record),
                ))  # fmt: skip
                bar.set_postfix_str(", ".join(f"{k} {row[k]:.3f}" for k in ("val_accuracy", "routed_accuracy") if k in row))
                bar.update(1)
    _restore_into(net, best)
    with ocp.StandardCheckpointer() as checkpointer:
        target = (folder / "best").absolute()
        checkpointer.save(target, _pure(net), force=True)
    write_atomic(folder / META_FILE, json.dumps({"settings": settings, "done": True, **record}, indent=1) + "\n")
    return PrefRouter(net, info, tuple(record["history"]), record["best_epoch"])


def _read_meta(folder: Path) -> dict[str, Any] | None:
    return read_json(folder / META_FILE)


def load_pref_router(folder: str | Path, fingerprint: str | None = None, grid: Sequence[float] | None = None) -> PrefRouter:
    """The router saved in ``folder`` (its best epoch); with ``fingerprint`` / ``grid``, refuse a
    router trained for another Instruct model or lambda grid."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        raise InputError(f"{folder} is not a router folder (no {META_FILE}); train one with dami-jax train-router")
    if not meta["done"]:
        raise InputError(f"{folder}: the router's training did not finish; rerun the same train-router command to resume")
    info = RouterInfo.from_json(meta["settings"]["info"])
    config = TrainConfig(**meta["settings"]["config"])
    net = _new_net(info, config)
    with ocp.StandardCheckpointer() as checkpointer:
        _restore_into(net, checkpointer.restore((folder / "best").absolute(), _pure(net)))
    router = PrefRouter(net, info, tuple(meta["history"]), meta["best_epoch"])
    if fingerprint is not None:
        router.check_fits(fingerprint, grid, where=str(folder))
    return router
