"""Reasoning intensity per request: which lambda serves it.

In order of precedence:
1. ``"lambda": x`` (a number in [0, 1]) in the request body: that lambda.
2. ``"lambda": "auto"``: the server's router picks it (an error without ``--router``).
3. ``reasoning_effort`` (OpenAI's ``minimal`` / ``low`` / ``medium`` / ``high``): the effort map.
4. Neither: the router when the server has one, else the effort map's ``medium``.

The default effort map spreads the levels over the path: minimal 0 (Instruct), low 0.3, medium
0.6, high 1.0 (Thinking). :func:`effort_map_from_summary` derives one from a route-eval
``summary.json`` instead, from the fixed-lambda results on that benchmark: ``minimal`` is the
cheapest fixed lambda, ``high`` the most accurate (fewest tokens among ties), and ``low`` /
``medium`` the cheapest fixed lambdas that reach a third / two thirds of the accuracy gained from
``minimal`` to ``high``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from dami_jax.dami.conf_router import ConfMap, draft_signals
from dami_jax.dami.features import query_features
from dami_jax.dami.pair import ModelPair
from dami_jax.dami.pref_router import load_pref_router
from dami_jax.errors import InputError
from dami_jax.models.tokenizer import chat_tokens
from dami_jax.server.protocol import RequestError

EFFORTS = ("minimal", "low", "medium", "high")
DEFAULT_EFFORT_MAP = {"minimal": 0.0, "low": 0.3, "medium": 0.6, "high": 1.0}
CONF_DRAFT_TOKENS = 32  # DAMI-Conf's draft budget when it routes a request
CONF_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def check_effort_map(mapping: dict[str, Any], source: str) -> dict[str, float]:
    """The four efforts, each a lambda in [0, 1]; :class:`InputError` naming ``source`` otherwise."""
    missing = [e for e in EFFORTS if e not in mapping]
    if missing:
        raise InputError(f"{source}: the effort map needs {', '.join(EFFORTS)}; {', '.join(missing)} missing")
    out = {}
    for effort in EFFORTS:
        value = mapping[effort]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise InputError(f"{source}: {effort} must be a lambda in [0, 1], got {value!r}")
        out[effort] = float(value)
    return out


def effort_map_from_summary(path: str | Path) -> dict[str, float]:
    """An effort map from a route-eval ``summary.json`` (see the module docstring)."""
    try:
        entries = json.loads(Path(path).read_text())
        fixed = sorted((float(e["mean_lambda"]), float(e["accuracy"]), float(e["mean_tokens"])) for e in entries
                       if e["method"] in ("instruct", "thinking") or e["method"].startswith("fixed-"))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a route-eval summary.json ({error})") from None
    if len(fixed) < 2:
        raise InputError(f"{path}: needs at least two fixed-lambda results")
    cheapest = min(fixed, key=lambda f: (f[2], f[0]))
    best = max(fixed, key=lambda f: (f[1], -f[2]))
    gain = best[1] - cheapest[1]

    def reaching(share: float) -> float:
        enough = [f for f in fixed if f[1] >= cheapest[1] + share * gain]
        return min(enough, key=lambda f: (f[2], f[0]))[0]

    return {"minimal": cheapest[0], "low": reaching(1 / 3), "medium": reaching(2 / 3), "high": best[0]}


@dataclasses.dataclass(frozen=True)
class Intensity:
    """How the server turns a request into a lambda. ``router``: a callable from a rendered
    message list to a lambda (None: no router)."""

    effort_map: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_EFFORT_MAP))
    router: Callable[[list[dict[str, str]]], float] | None = None

    def choose(self, requested: Any, effort: str | None, messages: Callable[[], list[dict[str, str]]]) -> float:
        """The lambda for a request's ``lambda`` and ``reasoning_effort`` fields; ``messages``
        gives the request as chat messages (for the router). Raises :class:`RequestError`."""
        if requested is not None:
            if requested == "auto":
                if self.router is None:
                    raise RequestError('"lambda": "auto" needs a server started with --router', "lambda")
                return self.router(messages())
            if isinstance(requested, bool) or not isinstance(requested, (int, float)) or not math.isfinite(requested):
                raise RequestError(f'lambda must be a number in [0, 1] or "auto", got {requested!r}', "lambda")
            if not 0.0 <= requested <= 1.0:
                raise RequestError(f"lambda {requested} is outside [0, 1]", "lambda")
            return float(requested)
        if effort is not None:
            if effort not in self.effort_map:
                raise RequestError(f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {effort!r}", "reasoning_effort")
            return self.effort_map[effort]
        return self.router(messages()) if self.router is not None else self.effort_map["medium"]


def load_router(spec: str, pair: ModelPair) -> tuple[Callable[[list[dict[str, str]]], float], str]:
    """``--router``: ``conf`` (DAMI-Conf, zero-shot) or a DAMI-Pref router folder; returns (the
    routing function over chat messages, its name). Both read the messages through the Instruct
    model's chat template, as they were built."""
    tokenizer = pair.tokenizers["instruct"]
    if spec == "conf":
        conf = ConfMap()

        def route_conf(messages: list[dict[str, str]]) -> float:
            signals = draft_signals(pair, [chat_tokens(tokenizer, messages)], max_draft_tokens=CONF_DRAFT_TOKENS, batch_size=1)
            lambdas, _ = conf.route(signals.confidence, signals.discrepancy, CONF_GRID)
            return float(lambdas[0])

        return route_conf, "dami-conf"
    router = load_pref_router(spec, fingerprint=pair.fingerprints()["instruct"])

    def route_pref(messages: list[dict[str, str]]) -> float:
        features = query_features(pair.instruct, pair.cfg, [chat_tokens(tokenizer, messages)], router.info.spec)
        return float(router.lambdas(features)[0])

    return route_pref, "dami-pref"


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """OpenAI's ``stop``: one string or up to four; empty strings are refused."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4 or any(not isinstance(s, str) or not s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of at most 4 of them", "stop")
    return stops
