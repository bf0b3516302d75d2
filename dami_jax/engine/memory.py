"""How many slots of how many tokens the engine's KV cache takes, from the memory that is free.

Every slot reserves its rows for ``max_len`` tokens (a decode step reads only the live ones, but
the memory is held). What is free: the device's ``bytes_limit - bytes_in_use`` (the pair is
loaded by then), or the host's available memory on a CPU. Interpolated thetas the engine may keep
come off it first; the KV cache may take ``KV_SHARE`` of the rest (activations, transfers and
fragmentation need the remainder).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax

from dami_jax.engine.cache import RowLayout
from dami_jax.errors import InputError
from dami_jax.models.config import ModelConfig

KV_SHARE = 0.8
DEFAULT_SLOTS = 8
MIN_CONTEXT = 2048  # with neither slots nor max_len given, slots halve until rows hold this much (or the model's context)


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """K and V of one token in every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def free_memory(device: jax.Device | None = None) -> tuple[int, str]:
    """(free bytes, where): the device's unused memory, or the host's available memory where the
    device reports no limit (a CPU)."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.device_kind} memory"
    return host_available(), "host memory"


def host_available() -> int:
    """The host's available memory (Linux' MemAvailable counts reclaimable page cache; free pages
    alone would not), or its free pages elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclasses.dataclass(frozen=True)
class Sizing:
    """The engine's slots and tokens per slot, and what they take."""

    slots: int
    max_len: int
    kv_bytes: int  # on the device
    budget: int  # what the KV cache may take
    free: int
    where: str
    host_bytes: int = 0  # in host memory (TailorKV's prompt stores)

    def describe(self) -> str:
        host = f" + {gigabytes(self.host_bytes)} in host memory" if self.host_bytes else ""
        return (f"{self.slots} slots x {self.max_len} tokens: {gigabytes(self.kv_bytes)} of KV cache{host} "
                f"({gigabytes(self.budget)} may go to it, {gigabytes(self.free)} of {self.where} free)")  # fmt: skip


SlotBytes = Callable[[int], tuple[int, int]]  # max_len -> (device bytes, host bytes) one slot takes


def dense_slot_bytes(cfg: ModelConfig, itemsize: int, layout: RowLayout = RowLayout()) -> SlotBytes:
    """A dense slot: K and V of every layer for each slot of its row."""
    per_token = kv_bytes_per_token(cfg, itemsize)
    return lambda max_len: (layout.capacity(max_len) * per_token, 0)


def size_engine(
    cfg: ModelConfig, itemsize: int, theta_bytes: int, slots: int | None, max_len: int | None,
    layout: RowLayout = RowLayout(), most_slots: int = DEFAULT_SLOTS, free: tuple[int, str] | None = None,
    slot_bytes: SlotBytes | None = None,
) -> Sizing:  # fmt: skip
    """Fill in what is not given (``slots``: ``most_slots``, fewer when that many rows of
    ``max_len`` tokens, or of ``MIN_CONTEXT`` when ``max_len`` is not given either, do not fit;
    ``max_len``: what fits, at most the model's context), and refuse a configuration that does
    not fit with :class:`InputError` naming the numbers. ``theta_bytes``: the interpolated thetas
    the engine may keep. ``slot_bytes``: what one slot takes (default: a dense row); where the
    device has memory of its own, host bytes are checked against the host's available memory."""
    free_bytes, where = free or free_memory()
    budget = int(KV_SHARE * (free_bytes - theta_bytes))
    shared = where == "host memory"  # a CPU: the device's memory is the host's
    host_budget = budget if shared else int(KV_SHARE * host_available())
    cost = slot_bytes or dense_slot_bytes(cfg, itemsize, layout)

    def fits(n: int, length: int) -> bool:
        device, host = cost(length)
        if shared:
            return n * (device + host) <= budget
        return n * device <= budget and n * host <= host_budget

    def fitting_len(n: int) -> int:  # the longest row that n slots can have (costs grow with length)
        low, high = 0, cfg.max_position_embeddings
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(n, middle) else (low, middle - 1)
        return low

    if max_len is None:
        if slots is None:
            slots = most_slots
            while slots > 1 and fitting_len(slots) < min(MIN_CONTEXT, cfg.max_position_embeddings):
                slots //= 2
        max_len = fitting_len(slots)
    elif slots is None:
        slots = max([1] + [n for n in range(1, most_slots + 1) if fits(n, max_len)])
    device, host = cost(max(1, max_len))
    if max_len < 2 or not fits(slots, max_len):
        host_part = f" and {gigabytes(slots * host)} of host memory" if host else ""
        raise InputError(
            f"slots={slots} x max_len={max_len}: the KV cache needs {gigabytes(slots * device)}{host_part} "
            f"({gigabytes(device + host)} per slot), more than the {gigabytes(max(0, budget))} it may take "
            f"({KV_SHARE:.0%} of the {gigabytes(free_bytes)} of {where} free, less {gigabytes(theta_bytes)} "
            "for interpolated thetas): lower max_len or slots"
        )
    return Sizing(slots, max_len, slots * device, budget, free_bytes, where, slots * host)
