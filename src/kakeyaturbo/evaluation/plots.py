"""Pareto plots of sweep records: compression ratio against KL and against |Δppl|.

matplotlib (the ``eval`` extra) is imported only when a plot is drawn, with the Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.metrics import THRESHOLDS
from kakeyaturbo.evaluation.report import check_record

KAKEYA_PREFIXES = ("kakeya", "v1.")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when maximising ``x`` and minimising ``y``.

    A point is dominated if another has ``x`` at least as large and ``y`` at least as small, one
    of them strictly. Points with a NaN coordinate are never on the front. Equal points are all
    kept. The indices are returned sorted by increasing ``x`` (then increasing ``y``).
    """
    if len(points) == 0:
        return []
    p = np.asarray(points, dtype=np.float64).reshape(len(points), 2)
    x, y = p[:, 0], p[:, 1]
    ok = ~np.isnan(p).any(axis=1)
    ge = (x[None, :] >= x[:, None]) & (y[None, :] <= y[:, None])
    strict = (x[None, :] > x[:, None]) | (y[None, :] < y[:, None])
    dominated = (ge & strict & ok[None, :]).any(axis=1)
    front = np.flatnonzero(ok & ~dominated)
    return [int(i) for i in front[np.lexsort((y[front], x[front]))]]


def is_kakeya(recipe: str) -> bool:
    """Whether a recipe is one of KakeyaTurbo's (name starts with ``kakeya`` or ``v1.``)."""
    return recipe.startswith(KAKEYA_PREFIXES)


def _labels(records: list[dict[str, Any]]) -> list[str]:
    """Recipe names, with mode/ctx appended when those vary across the records."""
    varying = [k for k in ("mode", "ctx") if len({r[k] for r in records}) > 1]
    return [r["recipe"] + (f" ({', '.join(str(r[k]) for k in varying)})" if varying else "") for r in records]


def _positive(y: np.ndarray) -> tuple[np.ndarray, float]:
    """``y`` with zeros (exact recipes) lifted to a floor below the smallest positive value, for log axes."""
    pos = y[y > 0]
    floor = float(pos.min()) / 10.0 if pos.size else 1e-6
    return np.where(y > 0, y, floor), floor


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as a 120-dpi PNG at ``path`` (parents created), close it, return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    pyplot().close(fig)
    return out


def pareto_plot(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write a two-panel PNG: ratio (x, log) vs KL (y, log) and vs |Δppl| % (y, log).

    Baselines are drawn as circles, KakeyaTurbo recipes as stars; the Pareto front (maximise
    ratio, minimise error) is a dashed staircase (the least error reachable at each ratio);
    every point carries its recipe name; the Δppl panel shows the ACCEPT and MARGINAL
    thresholds as horizontal lines. Values of exactly 0 are drawn at a floor below the
    smallest positive value (noted on the axis).

    Raises:
        ConfigError: no records, or a record lacking a contract field.
    """
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()

    if not records:
        raise ConfigError("pareto_plot needs at least one record, got none")
    for i, r in enumerate(records):
        check_record(r, f"records[{i}]")
    ratio = np.array([float(r["ratio"]) for r in records])
    kak = np.array([is_kakeya(r["recipe"]) for r in records])
    labels = _labels(records)
    panels = (
        ("KL(p_ref ‖ p_alt) [nats]", np.array([float(r["kl"]) for r in records])),
        ("|Δppl| [%]", np.abs(np.array([float(r["delta_ppl_pct"]) for r in records]))),
    )
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, (ylabel, raw) in zip(axes, panels):
        y, floor = _positive(raw)
        for mask, marker, name in ((~kak, "o", "baseline"), (kak, "*", "KakeyaTurbo")):
            if mask.any():
                ax.scatter(ratio[mask], y[mask], marker=marker, s=120 if marker == "*" else 50,
                           label=name, zorder=3)
        front = pareto_front(list(zip(ratio, raw)))
        ax.step(ratio[front], y[front], where="pre", ls="--", color="k", lw=1, label="Pareto front",
                zorder=2)
        for xi, yi, text in zip(ratio, y, labels):
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        times = FuncFormatter(lambda v, _: f"{v:g}×")
        ax.xaxis.set_major_formatter(times)
        ax.xaxis.set_minor_formatter(times)
        ax.set_yscale("log")
        ax.set_xlabel("compression ratio vs bf16")
        ax.set_ylabel(ylabel + (f" (0 drawn at {floor:.1e})" if (raw <= 0).any() else ""))
        ax.grid(True, which="both", alpha=0.3)
    for label, style in (("ACCEPT", ":"), ("MARGINAL", "-.")):
        level = THRESHOLDS[label]["abs_delta_ppl_pct"]
        axes[1].axhline(level, ls=style, color="tab:red", lw=1, label=f"{label} |Δppl| ≤ {level:g} %")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def layer_bits_plot(bits: list[list[float | None]], title: str, path: str | Path) -> Path:
    """Write a PNG: the K and V bits of every layer (``[[k, v], ...]``, None for streams without a
    ``bits`` setting, drawn as gaps), as grouped bars with each stream's mean as a line."""
    plt = pyplot()
    arr = np.array([[np.nan if b is None else float(b) for b in layer] for layer in bits], dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or not len(arr):
        raise ConfigError(f"layer_bits_plot: need [[k_bits, v_bits], ...] per layer, got {bits!r}")
    fig, ax = plt.subplots(figsize=(10, 3.6))
    x = np.arange(len(arr))
    for col, (name, colour) in enumerate((("K", "tab:blue"), ("V", "tab:orange"))):
        ax.bar(x + (col - 0.5) * 0.4, arr[:, col], width=0.4, label=f"{name} (mean {np.nanmean(arr[:, col]):.2f})",
               color=colour)
    ax.axhline(float(np.nanmean(arr)), color="black", linestyle="--", linewidth=1,
               label=f"mean {np.nanmean(arr):.3f} bits/elem")
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("bits per element")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)
