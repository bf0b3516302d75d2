"""One engine over several processes: process 0 decides, every process dispatches the same steps.

On a mesh that spans processes (``jax.distributed``), every process must make the same jitted
calls in the same order. An engine's calls follow from the requests it was given and the tokens
it reads back, and those are replicated, the same in every process. So the leader (process 0,
which takes the requests) shares before each of its steps the commands it applied since the
last one, and every follower applies them to an engine built as the leader's was, then steps
with it: the same plan, the same calls, the same tokens. One broadcast per step (of the byte
count alone while nothing new came), as multi-host serving loops do.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from dami_jax.decoding.sampling import Sampling
from dami_jax.distributed import broadcast
from dami_jax.engine.engine import Engine

STOP = ["stop"]  # the leader's last word: followers return


def portable(options: dict[str, Any]) -> dict[str, Any]:
    """``Engine.submit``'s keywords as JSON values (its sampling as fields, its key as key data)."""
    out = dict(options)
    if "prompt" in out:
        out["prompt"] = [int(t) for t in out["prompt"]]
    if "sampling" in out:
        out["sampling"] = dataclasses.asdict(out["sampling"])
    if out.get("key") is not None:
        out["key"] = np.asarray(jax.random.key_data(out["key"])).tolist()
    if out.get("stop_tokens") is not None:
        out["stop_tokens"] = [int(t) for t in out["stop_tokens"]]
    return out


def native(options: dict[str, Any]) -> dict[str, Any]:
    """:func:`portable`'s inverse."""
    out = dict(options)
    if "sampling" in out:
        out["sampling"] = Sampling(**out["sampling"])
    if out.get("key") is not None:
        out["key"] = jax.random.wrap_key_data(np.asarray(out["key"], np.uint32))
    return out


class Leader:
    """Process 0's side: record what was applied to the engine, share it before each step."""

    def __init__(self) -> None:
        self._applied: list[list[Any]] = []

    def submitted(self, options: dict[str, Any]) -> None:
        """``Engine.submit(**options)`` was accepted."""
        self._applied.append(["submit", portable(options)])

    def cancelled(self, request_id: int) -> None:
        self._applied.append(["cancel", request_id])

    def share(self) -> None:
        """Send the commands applied since the last share (nothing but a zero when none were)."""
        broadcast(json.dumps(self._applied).encode() if self._applied else b"")
        self._applied = []

    def stop(self) -> None:
        """Tell the followers to return."""
        self._applied.append(STOP)
        self.share()


def follow(engine: Engine) -> int:
    """A follower's loop: apply each share of the leader's commands to ``engine``, step when it is
    busy (exactly when the leader's is), until the leader stops. Returns the steps taken."""
    steps = 0
    while True:
        payload = broadcast(None)
        for command in json.loads(payload) if payload else []:
            if command == STOP:
                return steps
            if command[0] == "submit":
                engine.submit(**native(command[1]))
            else:
                engine.cancel(command[1])
        if not engine.idle:
            engine.step()
            steps += 1
