"""Train a DAMI-Pref router from sweep records (``dami-jax train-router``).

Only problems on the training side of :func:`dami_jax.evals.router_data.router_split` are used;
a fifth of them (by hash) decide early stopping: the epoch whose routing answers them best
(accuracy first, then tokens) is kept. Features come from the Instruct model's prefill
of each query rendered with the Instruct model's own chat template (System 1 sees the query
first), and are kept in ``<router folder>/features`` for reruns and evaluations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dami_jax.dami.features import FeatureSpec, FeatureStore, query_features
from dami_jax.dami.pair import ModelPair
from dami_jax.dami.pref_router import PrefRouter, RouterInfo, TrainConfig, train_pref_router
from dami_jax.dami.preferences import mean_tokens_per_lambda, outcome_table, preference_pairs
from dami_jax.errors import InputError
from dami_jax.evals.benchmarks import Problem
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.evals.router_data import read_sweeps, router_split, validation_split

FEATURES_DIR = "features"
PROMPT_TEMPLATE = "instruct"


def router_features(pair: ModelPair, problems: Sequence[Problem], style: str, spec: FeatureSpec, folder: str | Path,
                    fingerprint: str, *, progress: bool = False):  # fmt: skip
    """float32 [N, F] prefill features of ``problems``, from (and added to) ``folder``'s store;
    ``fingerprint`` is the Instruct model's (the caller has it: hashing the weights again costs a
    pass over them)."""
    store = FeatureStore(Path(folder) / FEATURES_DIR, fingerprint, spec)
    tokenizer = pair.tokenizers[PROMPT_TEMPLATE]
    by_id = {p.id: p for p in problems}

    def compute(ids):
        prompts = [prompt_tokens(tokenizer, by_id[i], style) for i in ids]
        return query_features(pair.instruct, pair.cfg, prompts, spec, progress=progress)

    return store.get([p.id for p in problems], compute)


def train_router(
    pair: ModelPair,
    folders: Sequence[str | Path],
    out_dir: str | Path,
    *,
    spec: FeatureSpec = FeatureSpec(),
    config: TrainConfig = TrainConfig(),
    margin: float = 0.1,
    token_weight: float = 1.0,
    progress: bool = True,
) -> PrefRouter:
    """Train (or resume, or load when finished) the router in ``out_dir`` from the sweep
    ``folders``; ``margin`` is :func:`dami_jax.dami.preferences.prefer`'s near-tie margin and
    ``token_weight`` the weight of a pair two right answers make (:func:`preference_pairs`)."""
    data = read_sweeps(folders)
    fingerprints = pair.fingerprints()
    for side in ("instruct", "thinking"):
        if data.settings.get(f"{side}_weights") != fingerprints[side]:
            raise InputError(f"the sweep records were made with another {side} model ({data.settings.get(f'{side}_weights')}, "
                             f"this one is {fingerprints[side]})")  # fmt: skip
    train_ids, _ = router_split(list(data.problems))
    fit_ids, val_ids = validation_split(train_ids)
    if not fit_ids:
        raise InputError(f"only {len(train_ids)} problems on the router-training side; sweep more problems")
    problems = [data.problems[i] for i in train_ids]
    features = router_features(pair, problems, data.settings["style"], spec, out_dir, fingerprints["instruct"], progress=progress)
    pairs = preference_pairs([data.rollouts[i] for i in train_ids], data.grid, margin, token_weight)
    row = {pid: i for i, pid in enumerate(train_ids)}
    info = RouterInfo(
        grid=data.grid, spec=spec, fingerprint=fingerprints["instruct"],
        prompt={"template": PROMPT_TEMPLATE, "style": data.settings["style"]},
        token_costs=tuple(float(x) for x in mean_tokens_per_lambda({i: data.rollouts[i] for i in train_ids}, data.grid)),
        in_dim=features.shape[1],
    )  # fmt: skip
    validation = (np.asarray([row[i] for i in val_ids], np.int32), outcome_table([data.rollouts[i] for i in val_ids], data.grid))
    return train_pref_router(
        features, pairs.subset([row[i] for i in fit_ids]), pairs.subset([row[i] for i in val_ids]), info, out_dir, config,
        validation=validation if val_ids else None, data_id=f"{data.digest}/margin={margin}/token_weight={token_weight}", progress=progress,
    )  # fmt: skip
