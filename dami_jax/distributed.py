"""One job over several processes, with ``jax.distributed``: starting it, and what the processes
must agree on.

Each process runs the same program on its own devices; they meet in collectives (a barrier, a
broadcast, a gather), which every process must enter in the same order. On CPU the collectives
run over gloo (:func:`initialize` selects it), so several processes on one machine, each with
virtual devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), form one job.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from dami_jax.errors import InputError

MIN_PAYLOAD = 64  # bytes: a broadcast payload is padded to a power of two from here (few compilations)


def initialize(coordinator: str, num_processes: int, process_id: int, timeout_s: int = 300) -> None:
    """Join the job of ``num_processes`` processes whose process 0 listens on ``coordinator``
    (host:port). Call before anything touches a device; waits up to ``timeout_s`` for the others."""
    if not 0 <= process_id < num_processes:
        raise InputError(f"process id {process_id}: must be in 0..{num_processes - 1} for {num_processes} processes")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s)


def leader() -> bool:
    """Whether this is process 0: the one that writes shared results and talks to clients."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier called ``name``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def least(value: int) -> int:
    """The smallest of every process's ``value`` (an int64: free bytes, say)."""
    if jax.process_count() == 1:
        return int(value)
    words = np.frombuffer(np.int64(value).tobytes(), np.int32)  # 64-bit values cross as two int32 words
    gathered = np.asarray(multihost_utils.process_allgather(words))
    return int(np.ascontiguousarray(gathered, np.int32).view(np.int64).min())


def broadcast(payload: bytes | None) -> bytes:
    """Process 0's ``payload``, in every process (the others pass None): one collective for the
    length, a second one only when there are bytes to send."""
    if jax.process_count() == 1:
        return payload or b""
    source = leader()
    if source != (payload is not None):
        raise ValueError("broadcast: process 0 sends a payload, the others pass None")
    length = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload) if source else 0)))
    if not length:
        return b""
    width = max(MIN_PAYLOAD, 1 << (length - 1).bit_length())
    buffer = np.zeros(width, np.uint8)
    if source:
        buffer[:length] = np.frombuffer(payload, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:length].tobytes()
