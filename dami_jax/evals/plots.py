"""Every figure dami-jax saves: the sweep's accuracy-vs-tokens frontier, the path diagnostics, the
TailorKV layer profile, cache costs, the needle-in-a-haystack heat maps and per-length lines, and
the engine's slot occupancy.

Figures are built with matplotlib's object API (``Figure``, no pyplot), so saving a plot never
switches the backend of a notebook or leaves a figure open; :func:`save_figure` writes atomically.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from dami_jax.dami.diagnostics import Connectivity, Continuity
from dami_jax.evals.frontier import SweepPoint, pareto_frontier
from dami_jax.files import write_atomic
from dami_jax.tailorkv.profiling import LayerProfile


def save_figure(fig: Figure, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Render ``fig`` as PNG into ``path`` (parents created; the file appears whole or not at all)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig_kwargs)
    return write_atomic(path, buffer.getvalue())


# --------------------------------------------------------------------------- sweeps


def plot_frontier(
    points: Sequence[SweepPoint], path: str | Path, title: str = "DAMI lambda sweep", marks: Sequence[tuple[str, float, float]] = ()
) -> Path:
    """Accuracy vs mean generated tokens, one labelled dot per lambda, frontier as a line;
    ``marks``: (label, mean tokens, accuracy) of other methods (routers), drawn as labelled stars."""
    return plot_frontier_panels([(title, points, marks)], path)


def plot_frontier_panels(panels: Sequence[tuple[str, Sequence[SweepPoint], Sequence[tuple[str, float, float]]]], path: str | Path) -> Path:
    """:func:`plot_frontier`'s figure for several sweeps side by side (e.g. two pairs on one
    benchmark), one panel per (title, points, marks); every panel keeps its own axes' ranges."""
    fig = Figure(figsize=(6 * len(panels), 4.2), layout="tight")
    lams = [p.lam for _, points, _ in panels for p in points]
    color_range = {"vmin": min(0.0, *lams), "vmax": max(1.0, *lams)}  # one colour per lambda in every panel
    for i, (title, points, marks) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        xs, ys = [p.mean_tokens for p in points], [100 * p.accuracy for p in points]
        scatter = ax.scatter(xs, ys, c=[p.lam for p in points], cmap="viridis", zorder=3, **color_range)
        frontier = pareto_frontier(points)
        for p in frontier_labels(points, frontier):
            ax.annotate(f"{p.lam:g}", (p.mean_tokens, 100 * p.accuracy), textcoords="offset points", xytext=(6, -3), fontsize=8)
        ax.plot([p.mean_tokens for p in frontier], [100 * p.accuracy for p in frontier], "--", color="gray", zorder=2, label="Pareto frontier")
        for (label, tokens, accuracy), color in zip(marks, ("tab:red", "tab:orange", "tab:purple", "tab:brown")):
            ax.scatter([tokens], [100 * accuracy], marker="*", s=160, color=color, zorder=4, label=label)
        fig.colorbar(scatter, ax=ax, label="lambda (0 = Instruct, 1 = Thinking)")
        ax.set_xlabel("mean generated tokens")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)


def frontier_labels(points: Sequence[SweepPoint], frontier: Sequence[SweepPoint], spacing: float = 0.05) -> list[SweepPoint]:
    """Points that get a lambda label: frontier points first, then the rest, skipping any within
    ``spacing`` (fraction of each axis' range) of a label already placed: the colour bar tells
    the lambda of crowded dots without labels printed over each other."""
    x_range = (max(p.mean_tokens for p in points) - min(p.mean_tokens for p in points)) or 1.0
    y_range = (max(p.accuracy for p in points) - min(p.accuracy for p in points)) or 1.0
    placed: list[SweepPoint] = []
    for p in [*frontier, *(q for q in points if q not in frontier)]:
        if all(abs(p.mean_tokens - q.mean_tokens) / x_range > spacing or abs(p.accuracy - q.accuracy) / y_range > spacing for q in placed):
            placed.append(p)
    return placed


def plot_sensitivity(rows: Sequence[dict[str, Any]], points: Sequence[SweepPoint], path: str | Path) -> Path:
    """DAMI-Conf's hyperparameter settings (``rows``: accuracy, mean_tokens, accept_below, ...) as
    dots coloured by their acceptance threshold, over the fixed-lambda frontier."""
    fig = Figure(figsize=(6.5, 4.2), layout="tight")
    ax = fig.add_subplot()
    frontier = pareto_frontier(points)
    ax.plot([p.mean_tokens for p in frontier], [100 * p.accuracy for p in frontier], "--", color="gray", label="fixed-lambda frontier")
    dots = ax.scatter([r["mean_tokens"] for r in rows], [100 * r["accuracy"] for r in rows], c=[r["accept_below"] for r in rows],
                      cmap="plasma", s=14, alpha=0.8, zorder=3)  # fmt: skip
    fig.colorbar(dots, ax=ax, label="accept_below (draft accepted under this risk)")
    ax.set_xlabel("mean tokens (draft included)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"DAMI-Conf sensitivity ({len(rows)} settings)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)


# --------------------------------------------------------------------------- path diagnostics


def plot_diagnostics(continuity: Continuity, connectivity: Connectivity, path: str | Path) -> Path:
    """CKA to the next lambda and (to Instruct - to Thinking) per layer, and the loss along the path."""
    fig = Figure(figsize=(14, 4), layout="tight")
    axes = fig.subplots(1, 3)
    for ax, data, title in (
        (axes[0], continuity.next_cka, f"CKA(theta(lam), theta(lam+{continuity.delta:g}))"),
        (axes[1], continuity.instruct_cka - continuity.thinking_cka, "CKA to Instruct - CKA to Thinking"),
    ):
        image = ax.imshow(data.T, aspect="auto", origin="lower", cmap="viridis",
                          extent=(continuity.lambdas[0], continuity.lambdas[-1], -0.5, data.shape[1] - 0.5))  # fmt: skip
        fig.colorbar(image, ax=ax)
        ax.set_xlabel("lambda")
        ax.set_ylabel("layer (0 = embeddings)")
        ax.set_title(title, fontsize=10)
    ax = axes[2]
    ax.plot(connectivity.lambdas, connectivity.losses, "o-", label="held-out loss of theta(lam)")
    ax.plot(connectivity.lambdas, connectivity.linear, "--", color="gray", label="straight line between endpoints")
    ax.set_xlabel("lambda")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"connectivity: barrier {connectivity.barrier:+.3f}", fontsize=10)
    ax.legend()
    return save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------- TailorKV layer profile


def plot_profile(profile: LayerProfile, path: str | Path) -> Path:
    """Bar per layer coloured by class, tau as a horizontal line."""
    dense = set(profile.dense_layers)
    colors = ["tab:orange" if i in dense else "tab:blue" for i in range(profile.num_layers)]
    fig = Figure(figsize=(max(5.0, 0.25 * profile.num_layers + 2), 3.6), layout="tight")
    ax = fig.add_subplot()
    ax.bar(range(profile.num_layers), profile.scores, color=colors, zorder=3)
    ax.axhline(profile.tau, color="black", linestyle="--", linewidth=1, zorder=4)
    handles = [
        Patch(color="tab:orange", label="dense: quantized KV"),
        Patch(color="tab:blue", label="sparse: offload + top-k"),
        Line2D([], [], color="black", linestyle="--", label=f"tau = {profile.tau:g}"),
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mass outside top {100 * profile.alpha:g}%")
    ax.set_title(f"TailorKV dense preference: {profile.model or 'model'} ({profile.num_tokens} tokens)", fontsize=10)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    return save_figure(fig, path, dpi=120)


def plot_occupancy(runs: dict[str, tuple[Sequence[tuple[float, int, int]], int]], path: str | Path,
                   title: str = "Slot occupancy") -> Path:  # fmt: skip
    """Busy slots at every decode step, one line per run: ``runs`` maps a label to (timeline,
    slots), a timeline being :class:`dami_jax.engine.engine.EngineStats`' (seconds, busy slots,
    steps) per decode call; dashed lines mark each run's slot count. Steps, not seconds, on the
    x axis: compilations would otherwise show as idle stretches."""
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    for (label, (timeline, slots)), color in zip(runs.items(), ("C0", "C1", "C2", "C3")):
        steps = np.cumsum([0] + [n for _, _, n in timeline])
        busy = [b for _, b, _ in timeline]
        ax.stairs(busy, steps, color=color, label=label)
        ax.axhline(slots, color=color, linestyle="--", linewidth=0.8)
    ax.set_xlabel("decode step")
    ax.set_ylabel("busy slots")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(loc="lower center")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_cache_costs(costs: Sequence[dict[str, Any]], path: str | Path, title: str = "KV cache cost") -> Path:
    """Device-resident KV MB (host-offloaded MB stacked above, hatched) and ms per generated token,
    one bar per cache config, each labelled with its ratio to the first config (the baseline).
    ``costs``: dicts with ``config``, ``device_bytes``, ``host_bytes`` and ``seconds`` (per token)."""
    names = [c["config"] for c in costs]
    device = np.array([c["device_bytes"] for c in costs]) / 1e6
    host = np.array([c["host_bytes"] for c in costs]) / 1e6
    ms = np.array([c["seconds"] for c in costs]) * 1e3
    fig = Figure(figsize=(9, 3.6), layout="tight")
    memory, time = fig.subplots(1, 2)
    x = np.arange(len(costs))
    memory.bar(x, device, color="tab:blue", zorder=3, label="on the device")
    memory.bar(x, host, bottom=device, color="none", edgecolor="tab:gray", hatch="//", zorder=3, label="offloaded to host")
    for i, mb in enumerate(device):  # labels above the stack: name the device part
        memory.annotate(f"device {mb:.1f} MB" + (f"\n{device[0] / mb:.1f}x smaller" if i else ""), (i, mb + host[i]),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)  # fmt: skip
    memory.set_ylabel("KV cache MB")
    memory.set_title("KV cache memory", fontsize=10)
    memory.legend(fontsize=8, loc="upper left")
    time.bar(x, ms, color="tab:green", zorder=3)
    for i, t in enumerate(ms):
        time.annotate(f"{t:.1f} ms\n{t / ms[0]:.2f}x" if i else f"{t:.1f} ms", (i, t), textcoords="offset points",
                      xytext=(0, 3), ha="center", fontsize=8)  # fmt: skip
    time.set_ylabel("ms per generated token")
    time.set_title("decode time", fontsize=10)
    for ax, top in ((memory, (device + host).max()), (time, ms.max())):
        ax.set_xticks(x, names, fontsize=9)
        ax.set_ylim(0, 1.4 * top)
        ax.grid(axis="y", alpha=0.3, zorder=0)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=120)


# --------------------------------------------------------------------------- needle in a haystack


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot_niah(
    records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], path: str | Path, config_order: Sequence[str] = (),
    subtitle: str = "",
) -> Path:
    """Top: a depth x length accuracy heat map per cache config (in ``config_order``, then by name).
    Bottom: per length, one line per config, of accuracy, top-1 agreement and mean KL(dense ||
    config) (log scale; dense's zero is left out), from ``rows`` (one per config and length:
    config, length, accuracy, top1, kl)."""
    order = {c: i for i, c in enumerate(config_order)}
    configs = sorted({r["config"] for r in records}, key=lambda c: (order.get(c, len(order)), c))
    lengths = sorted({int(r["length"]) for r in records})
    depths = sorted({round(float(r["depth"]), 6) for r in records})
    panels = max(len(configs), 1)
    width = max(1.2 + (0.8 + 0.7 * len(lengths)) * panels, 10.0)
    maps_height, lines_height = 1.6 + 0.4 * len(depths), 2.8
    fig = Figure(figsize=(width, maps_height + lines_height), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[maps_height, lines_height])
    axes = top.subplots(1, panels, squeeze=False, sharey=True)
    image = None
    for ax, config in zip(axes[0], configs):
        grid = np.full((len(depths), len(lengths)), np.nan)
        cells: dict[tuple[int, int], list[bool]] = defaultdict(list)
        for r in records:
            if r["config"] == config:
                cell = (depths.index(round(float(r["depth"]), 6)), lengths.index(int(r["length"])))
                cells[cell].append(bool(r["correct"]))
        for (i, j), hits in cells.items():
            grid[i, j] = np.mean(hits)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                label = f"{value:.0%}" if len(cells[(i, j)]) > 1 else ("hit" if value else "miss")
                ax.text(j, i, label, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        found = sum(sum(hits) for hits in cells.values())
        ax.set_title(f"{config}: {found}/{sum(len(h) for h in cells.values())}", fontsize=9)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    if image is not None:
        top.colorbar(image, ax=axes[0].tolist(), fraction=0.05, pad=0.02, label="accuracy")
    top.suptitle("Needle in a haystack: accuracy" + (f" ({subtitle})" if subtitle else ""), fontsize=10)
    colors = {c: f"C{i % 10}" for i, c in enumerate(configs)}
    for ax, field, label in zip(bottom.subplots(1, 3), ("accuracy", "top1", "kl"),
                                ("accuracy", "top-1 agreement (forced)", "mean KL(dense || config)")):  # fmt: skip
        for config in configs:
            points = [(lengths.index(r["length"]), r[field]) for r in rows if r["config"] == config]
            if field == "kl":
                points = [(x, y) for x, y in points if y > 0]
            if points:
                ax.plot(*zip(*points), "o-", color=colors[config], label=config, markersize=4)
        if field == "kl" and ax.lines:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize=8)
        ax.set_xlim(-0.3, len(lengths) - 0.7)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    bottom.legend(handles=[Line2D([], [], color=colors[c], marker="o", label=c) for c in configs], loc="outside right upper", fontsize=8)
    return save_figure(fig, path, dpi=120, bbox_inches="tight")
